"""``python -m finetune --config configs/finetune/X.yaml [--print-config] [key=value ...]`` (or ``accelerate launch -m finetune``)."""

from __future__ import annotations

import sys

from roseprior.stage import stage_main

from .config import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    def run(cfg: FinetuneConfig) -> None:
        from .train import run as finetune  # deferred: `--help` and config errors should not import torch

        finetune(cfg)

    return stage_main(argv, prog="finetune", schema=FinetuneConfig, run=run, description=(
        "Train the N/P classifier on a backbone with SAM/ASAM (or sam=off); select on the validation "
        "split, evaluate the test split once; writes best.safetensors, metrics.json, tb/ and cam/ "
        "to out_dir. Example: python -m finetune --config configs/finetune/msht_tiny_cpu.yaml "
        "data.root=DATA init=runs/pretrain out_dir=runs/ft"))


if __name__ == "__main__":
    sys.exit(main())
