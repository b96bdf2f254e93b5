"""``python -m pretrain --config FILE [--print-config] [key=value ...]`` (also under ``accelerate launch -m pretrain``)."""

from __future__ import annotations

import sys

from roseprior.stage import stage_main

from .config import PretrainConfig


def main(argv: list[str] | None = None) -> int:
    def run(cfg: PretrainConfig) -> None:
        from .loop import run as pretrain  # deferred: `--help` and config errors should not import torch

        pretrain(cfg)

    return stage_main(argv, prog="pretrain", schema=PretrainConfig, run=run, description=(
        "Self-supervised pretraining of a backbone on unlabeled images (DINO, BYOL, SimCLR, MoCo v2). "
        "Several GPUs or machines: accelerate launch [options] -m pretrain --config FILE."))


if __name__ == "__main__":
    sys.exit(main())
