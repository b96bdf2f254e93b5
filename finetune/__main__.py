"""``python -m finetune --config configs/finetune/X.yaml [key=value ...]`` (or ``accelerate launch -m finetune``)."""

from __future__ import annotations

import argparse
import sys

from roseprior.config import add_config_args, load_config
from roseprior.errors import RosepriorError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description=(
            "Train the N/P classifier on a backbone with SAM/ASAM (or sam=off); select on the validation "
            "split, evaluate the test split once; writes best.safetensors, metrics.json, tb/ and cam/ "
            "to out_dir. Example: python -m finetune --config configs/finetune/msht_tiny_cpu.yaml "
            "data.root=DATA init=runs/pretrain out_dir=runs/ft"
        ),
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        from .config import FinetuneConfig
        from .train import run

        run(load_config(FinetuneConfig, args.config, args.overrides))
    except RosepriorError as err:
        # Bad input (config, data, checkpoint): one line naming the key or file, no traceback.
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
