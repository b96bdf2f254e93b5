"""SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709): contrast two views against all others.

lightly's ``NTXentLoss(gather_distributed=True)`` gathers negatives from every process with gradients,
so 2 processes x batch B see the same negatives as 1 process x batch 2B. The first two global views
are the positive pair; with ``views.n_local > 0`` each local view is also paired with both global views
of its image (multi-crop, Caron et al. 2020), which with ``views.local_magnification`` above the globals'
range ties nuclear detail to its context. The local pairs' mean loss carries ``local_weight`` of the
total, the global pair the rest.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from ..config import SimCLRConfig
from ..views import ViewBatch, multicrop_forward
from ._common import EmbeddingHead, spread_metrics

__all__ = ["SimCLR"]


class SimCLR(nn.Module):
    has_teacher = False

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig) -> None:
        super().__init__()
        head = SimCLRProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, batch_norm=cfg.batch_norm)
        self.student = EmbeddingHead(backbone, head)
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=True)
        self.local_weight = cfg.local_weight

    def forward(self, views: ViewBatch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z0, z1, *local = (z.float() for z in multicrop_forward(self.student, views["global"][:2] + views["local"]))
        loss = self.criterion(z0, z1)
        if local:
            local_loss = torch.stack([self.criterion(z, g) for z in local for g in (z0, z1)]).mean()
            loss = (1.0 - self.local_weight) * loss + self.local_weight * local_loss
        return loss, spread_metrics(z0)

    def export_backbone(self, which: str = "student") -> nn.Module:
        return self.student.backbone
