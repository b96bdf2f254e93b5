"""DINO: self-distillation with no labels (Caron et al. 2021, https://arxiv.org/abs/2104.14294).

Built on lightly's ``DINOProjectionHead`` and ``DINOLoss`` (the epoch is passed so the teacher
temperature warms up; lightly all-reduces the centre under DDP). The teacher sees the global views,
the student every view; the last head layer is frozen during the first epoch(s).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn as nn
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead

from ..config import DINOConfig
from ..teacher import make_teacher
from ..views import ViewBatch, multicrop_forward
from ._common import EmbeddingHead, MomentumTeacherMethod

__all__ = ["DINO"]


class DINO(MomentumTeacherMethod):

    def __init__(self, backbone: nn.Module, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        def head() -> DINOProjectionHead:
            with warnings.catch_warnings():  # lightly's head uses the deprecated torch weight_norm
                warnings.simplefilter("ignore", FutureWarning)
                return DINOProjectionHead(
                    backbone.embed_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                    batch_norm=cfg.batch_norm, freeze_last_layer=cfg.freeze_last_layer_epochs,
                    norm_last_layer=cfg.norm_last_layer,
                )

        self.student = EmbeddingHead(backbone, head())
        # The head's weight_norm cannot be deep-copied: the teacher gets a fresh head, then the weights.
        self.teacher = make_teacher(self.student, build=lambda: EmbeddingHead(copy.deepcopy(backbone), head()))
        self.criterion = DINOLoss(
            output_dim=cfg.out_dim, warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs, student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )

    def teacher_temperature(self, epoch: int) -> float:
        """The temperature DINOLoss uses at ``epoch`` (its linear warm-up, then constant)."""
        if epoch < self.cfg.warmup_teacher_temp_epochs:
            return float(self.criterion.teacher_temp_schedule[epoch])
        return self.cfg.teacher_temp

    def forward(self, views: ViewBatch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        global_views = views["global"]
        with torch.no_grad():
            teacher_out = multicrop_forward(self.teacher, global_views)
            metrics = self._teacher_metrics(teacher_out, self.teacher_temperature(epoch))
        student_out = multicrop_forward(self.student, global_views + views["local"])
        loss = self.criterion([t.float() for t in teacher_out], [s.float() for s in student_out], epoch=epoch)
        metrics["teacher_temp"] = torch.tensor(self.teacher_temperature(epoch))
        return loss, metrics

    @torch.no_grad()
    def _teacher_metrics(self, teacher_out: list[torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
        """Entropies of the centred, sharpened teacher output, as fractions of log(out_dim).

        Per-sample entropy near 1: the teacher outputs uniform distributions (collapse by
        flatness); entropy of the batch-mean near 0: every sample picks the same dimension
        (collapse by dominance). Either one stops the run (see the loop's collapse guard).
        """
        logits = torch.cat(teacher_out).float()
        probs = torch.softmax((logits - self.criterion.center.view(1, -1)) / temperature, dim=-1)
        log_k = math.log(probs.shape[-1])
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / log_k
        mean_probs = probs.mean(0)
        marginal = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum() / log_k
        collapsed = (entropy > 0.995) | (marginal < 0.02)
        return {"teacher_entropy": entropy, "teacher_marginal_entropy": marginal, "collapsed": collapsed.float()}

    def after_backward(self, epoch: int) -> None:
        self.student.head.cancel_last_layer_gradients(epoch)
