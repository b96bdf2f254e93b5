"""The momentum teacher, made right for CNNs: BatchNorm buffers follow the student too.

lightly's ``update_momentum`` averages parameters only. A hybrid CNN-Transformer teacher also has
BatchNorm running statistics; left alone they stay at their initial values (a teacher that
normalises with them is wrong, and the exported teacher backbone is unusable in eval mode). Here:

- parameters: lightly's ``update_momentum`` (EMA);
- floating-point buffers (BatchNorm ``running_mean``/``running_var``): the same EMA, so the
  teacher's statistics are the average of the student's, as its weights are;
- integer buffers (``num_batches_tracked``): copied;
- the teacher's own forward passes never write its BatchNorm statistics (``momentum = 0``): in
  train mode it normalises with batch statistics, as DINO's teacher does, while its running
  statistics stay the EMA above.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from lightly.models.utils import deactivate_requires_grad, update_momentum

__all__ = ["freeze_batchnorm_statistics", "make_teacher", "update_teacher"]


def freeze_batchnorm_statistics(module: nn.Module) -> nn.Module:
    """Batch statistics still normalise in train mode, but running statistics are never written."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return module


def make_teacher(student: nn.Module, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A frozen copy of ``student`` whose BatchNorm statistics only change through ``update_teacher``.

    ``build`` makes a fresh module of the same structure, for students that ``deepcopy`` cannot
    copy (``weight_norm``, as in DINO's head); its weights are then loaded from the student.
    """
    if build is None:
        teacher = copy.deepcopy(student)
    else:
        teacher = build()
        teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    return freeze_batchnorm_statistics(teacher)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, for parameters and buffers."""
    update_momentum(student, teacher, m=momentum)
    for (name, s_buf), (t_name, t_buf) in zip(student.named_buffers(), teacher.named_buffers(), strict=True):
        if name != t_name:
            raise RuntimeError(f"teacher and student buffers differ: {name} vs {t_name}")
        if t_buf.is_floating_point():
            t_buf.mul_(momentum).add_(s_buf.detach().to(t_buf.dtype), alpha=1.0 - momentum)
        else:
            t_buf.copy_(s_buf)
