"""BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733): predict the momentum teacher's projection.

Symmetric negative-cosine loss on two global views, lightly's BYOL heads; the teacher follows the
student by EMA of parameters and BatchNorm statistics (``pretrain.teacher``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

from ..config import BYOLConfig
from ..teacher import make_teacher
from ..views import ViewBatch, multicrop_forward
from ._common import EmbeddingHead, MomentumTeacherMethod, spread_metrics

__all__ = ["BYOL"]


class BYOL(MomentumTeacherMethod):

    def __init__(self, backbone: nn.Module, cfg: BYOLConfig) -> None:
        super().__init__()
        self.student = EmbeddingHead(backbone, BYOLProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim))
        self.predictor = BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.teacher = make_teacher(self.student)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views: ViewBatch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pair = views["global"][:2]
        with torch.no_grad():
            t0, t1 = multicrop_forward(self.teacher, pair)
        p0, p1 = (self.predictor(z) for z in multicrop_forward(self.student, pair))
        loss = 0.5 * (self.criterion(p0.float(), t1.float()) + self.criterion(p1.float(), t0.float()))
        return loss, spread_metrics(p0)
