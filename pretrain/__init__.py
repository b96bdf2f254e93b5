"""pretrain: multi-crop, multi-magnification self-supervised pretraining (DINO, BYOL, SimCLR, MoCo v2).

``python -m pretrain --config configs/pretrain/X.yaml [key=value ...]`` on one process, or
``accelerate launch [options] -m pretrain --config ...`` on several GPUs or machines. Writes a
backbone (``backbone.safetensors`` + ``backbone.json``) that ``finetune`` and ``eval_probes`` load.
"""

from __future__ import annotations

from .config import PretrainConfig

__all__ = ["PretrainConfig", "main"]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as _main

    return _main(argv)
