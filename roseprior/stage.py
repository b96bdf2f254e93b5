"""What every stage's ``python -m <stage>`` does: parse ``--config FILE [key=value ...]``, validate,
run, and turn bad input into one line naming the key or file (never a traceback)."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from typing import Any

from roseprior.config import add_config_args, config_yaml, load_config
from roseprior.errors import RosepriorError


def one_line(err: BaseException) -> str:
    """The error's own message on one line; an error raised in a DataLoader worker arrives wrapped in
    the worker's traceback text, whose last line is the original ``Type: message``."""
    text = str(err).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1].strip()
        text = last.split(": ", 1)[1] if last.startswith(f"{type(err).__name__}: ") else last
    return " ".join(text.split())


def stage_main(argv: list[str] | None, *, prog: str, description: str, schema: type,
               run: Callable[[Any], Any]) -> int:
    """The entry point of one stage: 0 on success, 2 on bad input, 130 when interrupted."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        run(cfg)
    except RosepriorError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume (checkpoint.resume=auto)", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Close the process group a multi-process run opened, while the interpreter is still whole.

    Left to the interpreter's exit, a gloo group that a DDP model still holds is torn down after Python
    has gone and can abort a run that had finished ("terminate called without an active exception";
    4 exits in 50 with two processes under load). So what the run left in reference cycles, DDP models
    among them, is collected first, then the group goes. No barrier: a process that stopped on bad input
    alone must not wait for the others.
    """
    dist = sys.modules.get("torch.distributed")  # never imported: nothing to close, and --help stays fast
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    gc.collect()
    dist.destroy_process_group()


def command_main(prog: str, run: Callable[[], Any]) -> int:
    """A tool's entry (predict, export, adapt): ``run()``'s own code, or 2 and one line for bad input."""
    try:
        return int(run() or 0)
    except RosepriorError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
