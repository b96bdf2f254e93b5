"""MoCo v2 (Chen et al. 2020, https://arxiv.org/abs/2003.04297): queries against a momentum key encoder.

lightly's ``NTXentLoss`` with a memory bank of past keys (gathered from every process under DDP)
supplies the negatives; the key encoder follows the query encoder by EMA of parameters and
BatchNorm statistics (``pretrain.teacher``). The loss is symmetrised over the two global views.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead

from ..config import MoCoV2Config
from ..teacher import make_teacher
from ..views import ViewBatch, multicrop_forward
from ._common import EmbeddingHead, MomentumTeacherMethod, spread_metrics

__all__ = ["MoCoV2"]


class MoCoV2(MomentumTeacherMethod):

    def __init__(self, backbone: nn.Module, cfg: MoCoV2Config) -> None:
        super().__init__()
        self.student = EmbeddingHead(backbone, MoCoProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim))
        self.teacher = make_teacher(self.student)
        self.criterion = NTXentLoss(
            temperature=cfg.temperature, memory_bank_size=(cfg.memory_bank_size, cfg.out_dim), gather_distributed=True
        )

    def forward(self, views: ViewBatch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pair = views["global"][:2]
        with torch.no_grad():
            k0, k1 = multicrop_forward(self.teacher, pair)
        q0, q1 = multicrop_forward(self.student, pair)
        # One call for both directions: both see the same bank, then both key sets enter it once.
        loss = self.criterion(torch.cat([q0, q1]).float(), torch.cat([k1, k0]).float())
        return loss, spread_metrics(q0)
