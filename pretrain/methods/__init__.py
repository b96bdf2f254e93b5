"""SSL methods: one small file each, on top of the shared loop (``pretrain.loop``).

A method is an ``nn.Module`` built from an injected backbone and its own config section, with:

- ``forward(views, epoch) -> (loss, metrics)``: ``views`` is ``{"global": [...], "local": [...]}``,
  ``metrics`` a dict of 0-d tensors (a ``collapsed`` entry > 0 flags a collapsed step);
- ``export_backbone(which) -> nn.Module``: the backbone to save (``"teacher"`` or ``"student"``);
- ``has_teacher``; optional hooks ``after_backward(epoch)`` (e.g. freeze a layer) and
  ``after_step(momentum)`` (e.g. the EMA teacher).

Adding a method: a file here, an entry in ``METHODS``, a config section in ``pretrain/config.py``.
"""

from __future__ import annotations

import torch.nn as nn

from ..config import MethodConfig
from .byol import BYOL
from .dino import DINO
from .mocov2 import MoCoV2
from .simclr import SimCLR

__all__ = ["BYOL", "DINO", "METHODS", "MoCoV2", "SimCLR", "build_method"]

METHODS: dict[str, type[nn.Module]] = {"dino": DINO, "byol": BYOL, "simclr": SimCLR, "mocov2": MoCoV2}


def build_method(cfg: MethodConfig, backbone: nn.Module) -> nn.Module:
    """The method ``cfg.name`` around ``backbone``, configured by its own section ``cfg.<name>``."""
    return METHODS[cfg.name](backbone, getattr(cfg, cfg.name))
