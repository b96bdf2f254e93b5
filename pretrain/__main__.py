"""``python -m pretrain --config FILE [key=value ...]`` (also under ``accelerate launch -m pretrain``)."""

from __future__ import annotations

import argparse
import sys

from roseprior.config import add_config_args, load_config
from roseprior.errors import RosepriorError

from .config import PretrainConfig, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Self-supervised pretraining of a backbone on unlabeled images (DINO, BYOL, SimCLR, MoCo v2). "
        "Several GPUs or machines: accelerate launch [options] -m pretrain --config FILE.",
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = validate(load_config(PretrainConfig, args.config, args.overrides))
        from .loop import run  # deferred: `--help` and config errors should not import torch

        run(cfg)
    except RosepriorError as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pretrain: interrupted; resume with the same command (checkpoint.resume=auto)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
