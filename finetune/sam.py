"""Step functions the training loop plugs in: SAM's two-pass step, or one plain pass.

SAM (Foret et al. 2021, https://arxiv.org/abs/2010.01412) and ASAM (Kwon et al. 2021,
https://arxiv.org/abs/2102.11600) come from pytorch-optimizer: ``first_step`` moves the weights to
w + e(w) along the gradient, ``second_step`` restores w and lets the base optimizer step with the
gradient taken at w + e(w). What this file adds is the distributed and BatchNorm care around them:

- the first backward runs under ``accelerator.no_sync``: each process perturbs with its own
  gradient (SAM's m-sharpness, as in the reference DDP recipe), and the all-reduce is paid once;
- BatchNorm running statistics are updated by the first forward only: the second forward sees
  perturbed weights, and counting its batch statistics too would weigh each batch twice.

Every step function has the signature of ``StepFn`` and returns the first pass's loss and logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from roseprior.errors import ConfigError
from roseprior.loop import NonFiniteLoss, check_finite

__all__ = ["NonFiniteLoss", "StepFn", "build_optimizer", "frozen_bn_stats", "plain_step", "sam_step"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


class StepFn(Protocol):
    def __call__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        criterion: Criterion,
        optimizer: Optimizer,
        accelerator,
        clip_grad: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def build_optimizer(
    param_groups: list[dict],
    name: str = "adam",
    sam: str = "sam",
    rho: float = 0.05,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> Optimizer:
    """The base optimizer over ``param_groups`` (each may carry its own lr), SAM-wrapped unless off."""
    if name not in BASE_OPTIMIZERS:
        raise ConfigError(f"'optim.name' must be one of {', '.join(BASE_OPTIMIZERS)}; got {name!r}")
    base = BASE_OPTIMIZERS[name]
    kwargs: dict = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs["momentum"] = momentum
    if sam == "off":
        return base(param_groups, **kwargs)
    if sam not in ("sam", "asam"):
        raise ConfigError(f"'sam' must be one of sam, asam, off; got {sam!r}")
    from pytorch_optimizer import SAM

    return SAM(param_groups, base_optimizer=base, rho=rho, adaptive=sam == "asam", **kwargs)


def step_for(sam: str) -> StepFn:
    """The step function for config value ``sam``."""
    return plain_step if sam == "off" else sam_step


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics alone.

    Momentum 0 keeps running_mean/var, as in the SAM reference repo (and pytorch-optimizer's
    ``disable_running_stats``); we also restore ``num_batches_tracked``, which still counts under
    momentum 0 and is the averaging denominator when a layer's momentum is None. The forward stays
    in train mode: eval mode would normalise with running statistics and change the gradient.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            saved.append((module, module.momentum, module.num_batches_tracked.clone()))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            module.num_batches_tracked.copy_(tracked)


def _raw(optimizer: Optimizer) -> Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (which hides ``first_step``)."""
    return getattr(optimizer, "optimizer", optimizer)


def _clip(accelerator, model: nn.Module, clip_grad: float | None) -> None:
    # clip_grad_norm_ multiplies every gradient by one factor: the direction is kept.
    if clip_grad is not None and clip_grad > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)


def plain_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    criterion: Criterion,
    optimizer: Optimizer,
    accelerator,
    clip_grad: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward-backward pass and one optimizer step (``sam: off``)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(images)
    loss = criterion(logits, targets)
    check_finite(accelerator, loss)
    accelerator.backward(loss)
    _clip(accelerator, model, clip_grad)
    optimizer.step()
    return loss.detach(), logits.detach()


def sam_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    criterion: Criterion,
    optimizer: Optimizer,
    accelerator,
    clip_grad: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM/ASAM: gradient at w (local), climb to w + e(w), gradient there (synced), step from w."""
    sam = _raw(optimizer)
    if not hasattr(sam, "first_step"):
        raise TypeError(f"sam_step needs a SAM optimizer, got {type(sam).__name__}")
    sam.zero_grad(set_to_none=True)

    # Pass 1 at w: BN running statistics update here, gradients stay on this process.
    with accelerator.no_sync(model):
        logits = model(images)
        loss = criterion(logits, targets)
        check_finite(accelerator, loss)
        accelerator.backward(loss)
    # No clipping here: e(w) = rho · g / ||g|| does not depend on the gradient's scale.
    sam.first_step(zero_grad=True)

    # Pass 2 at w + e(w): gradients all-reduced, running statistics untouched.
    with frozen_bn_stats(model):
        perturbed_loss = criterion(model(images), targets)
    check_finite(accelerator, perturbed_loss)
    accelerator.backward(perturbed_loss)
    _clip(accelerator, model, clip_grad)
    sam.second_step(zero_grad=True)
    return loss.detach(), logits.detach()
