"""Per-part parameter groups and explainability hooks that work for every backbone in the zoo."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["group_of", "param_groups", "cam_target_layers", "reshape_transform", "GROUPS"]

GROUPS = ("cnn", "transformer", "head")


def group_of(model: nn.Module, param_name: str) -> str:
    """'cnn', 'transformer' or 'head' for one parameter name, so finetune can give each its own lr."""
    own = getattr(model, "group_of", None)
    if callable(own):
        return own(param_name)
    return "head" if param_name.startswith(("head.", "fc.", "classifier.")) else "cnn"


def param_groups(model: nn.Module, trainable_only: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) pairs per part, in GROUPS order; parts with no parameters are left out.

    Names are kept so the caller can also exclude norms and biases from weight decay.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        groups.setdefault(group_of(model, name), []).append((name, param))
    return {g: ps for g, ps in groups.items() if ps}


def cam_target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Named Grad-CAM target layers (CNN stage ends, transformer block output norms)."""
    own = getattr(model, "cam_target_layers", None)
    if not callable(own):
        raise TypeError(
            f"{type(model).__name__} does not name Grad-CAM target layers; build it with backbones.create"
        )
    return own()


def reshape_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``reshape_transform`` to hand pytorch-grad-cam: tokens -> (B, C, h, w), maps unchanged."""
    return model.reshape_transform
