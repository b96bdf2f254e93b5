"""Parts every method shares: backbone + head as one module, the teacher's mode, a collapse signal."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..teacher import update_teacher

__all__ = ["EmbeddingHead", "MomentumTeacherMethod", "embedding_spread", "set_teacher_mode", "spread_metrics"]


class EmbeddingHead(nn.Module):
    """``head(backbone.forward_embedding(x))``: the student (or teacher) network of a method."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_embedding(x))


class MomentumTeacherMethod(nn.Module):
    """What DINO, BYOL and MoCo share: ``self.teacher`` follows ``self.student`` (both EmbeddingHeads)
    by EMA, stays in teacher mode whatever mode the method is put in, and is what gets exported."""

    has_teacher = True
    student: EmbeddingHead
    teacher: EmbeddingHead

    def train(self, mode: bool = True) -> MomentumTeacherMethod:
        super().train(mode)
        set_teacher_mode(self.teacher)
        return self

    def after_step(self, momentum: float) -> None:
        update_teacher(self.student, self.teacher, momentum)

    def export_backbone(self, which: str = "teacher") -> nn.Module:
        return (self.teacher if which == "teacher" else self.student).backbone


def set_teacher_mode(teacher: nn.Module) -> None:
    """Teacher: no dropout or drop-path (eval), but BatchNorm normalises with batch statistics.

    DINO's teacher runs BatchNorm in train mode; its running statistics are not written here
    (see ``pretrain.teacher``), only averaged from the student's.
    """
    teacher.eval()
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """std over the batch of L2-normalised embeddings, x sqrt(dim): about 1 when healthy, 0 when collapsed.

    The collapse signal of the BYOL/SimSiam literature (Chen & He 2021, Sec. 4.1).
    """
    z = F.normalize(z.detach().float(), dim=-1)
    if z.shape[0] < 2:
        return torch.tensor(1.0, device=z.device)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])


def spread_metrics(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``embedding_spread`` and the collapse flag the loop stops on (spread below 0.05)."""
    spread = embedding_spread(z)
    return {"embedding_spread": spread, "collapsed": (spread < 0.05).float()}
