"""The ``roseprior`` command: data tools (synth, split) and the end-to-end demo.

Each subcommand lives beside the code it drives and registers itself through ``add_parser``;
this file only assembles them, so ``roseprior --help`` lists every tool in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from roseprior.errors import RosepriorError

# Each subcommand and the module that registers it through add_parser(subparsers). A command line that names one
# imports that module alone: finetune.adapt loads torch and torchvision (3-6 s), which `roseprior split` and
# `roseprior synth` never need, and the tests and the demo run those commands as processes dozens of times.
SUBCOMMANDS = {"synth": "roseprior.synth", "split": "roseprior.splits", "scale": "roseprior.scale",
               "adequacy": "roseprior.adequacy", "adapt": "finetune.adapt", "demo": "roseprior.demo"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``roseprior`` parser with every subcommand, or only ``command``'s when it names one."""
    parser = argparse.ArgumentParser(
        prog="roseprior",
        description=(
            "Self-supervised pretraining platform for cytopathology (ROSE) images. Stages: "
            "`python -m pretrain`, `python -m finetune`, `python -m eval_probes`; data tools below."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if command in SUBCOMMANDS and name != command:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a stage not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
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
