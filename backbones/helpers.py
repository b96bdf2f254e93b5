"""Per-part parameter groups and explainability hooks that work for every backbone in the zoo."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["GROUPS", "cam_target_layers", "group_of", "input_stats", "param_groups", "reshape_transform",
           "set_input_stats"]

GROUPS = ("cnn", "transformer", "head")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def input_stats(model: nn.Module) -> Stats:
    """The (mean, std) a backbone's inputs are normalised with: what it was trained with when it was
    loaded from a backbone folder (``backbone.json``), else its architecture default (ImageNet's).

    Every stage asks this one function (finetune's classifier, predict, the probes, the kNN monitor),
    and it reads what ``timm.data.resolve_data_config(model=...)`` reads, so timm agrees too.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def set_input_stats(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Record the input statistics a backbone is trained with, where timm and ``input_stats`` look
    (``pretrained_cfg``, and its older alias ``default_cfg``); ``backbones.save`` writes them."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    cfg.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


def group_of(model: nn.Module, param_name: str) -> str:
    """'cnn', 'transformer' or 'head' for one parameter name, so finetune can give each its own lr."""
    own = getattr(model, "group_of", None)
    if callable(own):
        return own(param_name)
    return "head" if param_name.startswith(("head.", "fc.", "classifier.")) else "cnn"


def _block_key(name: str) -> str:
    """The block a parameter belongs to: its path up to the first numbered module (``cnn.layer1.0``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def param_groups(
    model: nn.Module,
    lr: float | Mapping[str, float],
    weight_decay: float,
    layer_decay: float = 1.0,
    decay_norm_and_bias: bool = False,
    part_of: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: a learning rate per part, per-block layer decay, and no weight
    decay on biases, norms and tokens (DINO's ``get_params_groups``, timm's ``no_weight_decay``).

    ``lr`` is one value or one per part (``part_of(name)`` in ``GROUPS``; finetune gives the CNN,
    the transformer and the head their own). With ``layer_decay < 1``, block k of n (parameter
    order, head last) gets ``lr * layer_decay ** (n - 1 - k)``, as in BEiT/MAE fine-tuning. Each
    group keeps ``base_lr`` and ``base_weight_decay``: the training loop multiplies them by its
    per-step schedule factors.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = list(dict.fromkeys(_block_key(n) for n, _ in named))
    no_decay: set[str] = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            no_decay |= {f"{prefix}.{n}" if prefix else n for n in names()}
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in named:
        part = part_of(name) if part_of is not None else "all"
        scale = layer_decay ** (len(blocks) - 1 - blocks.index(_block_key(name))) if part != "head" else 1.0
        decay = 0.0 if not decay_norm_and_bias and (param.ndim <= 1 or name in no_decay) else weight_decay
        base_lr = (lr[part] if isinstance(lr, Mapping) else lr) * scale
        group = groups.setdefault((part, scale, decay), {
            "params": [], "names": [], "part": part, "lr": base_lr, "base_lr": base_lr,
            "weight_decay": decay, "base_weight_decay": decay,
        })
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


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
