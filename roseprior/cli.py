"""The ``roseprior`` command: data tools (synth, split) and the end-to-end demo.

Each subcommand lives beside the code it drives and registers itself through ``add_parser``;
this file only assembles them, so ``roseprior --help`` lists every tool in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from roseprior.errors import RosepriorError

# Modules that each register one subcommand through add_parser(subparsers).
SUBCOMMAND_MODULES = ["roseprior.synth", "roseprior.splits", "roseprior.scale", "roseprior.adequacy", "finetune.adapt", "roseprior.demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roseprior",
        description=(
            "Self-supervised pretraining platform for cytopathology (ROSE) images. Stages: "
            "`python -m pretrain`, `python -m finetune`, `python -m eval_probes`; data tools below."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a stage not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RosepriorError as err:
        # Our own errors carry a message naming the file or key; no traceback for bad input.
        print(f"roseprior {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
