"""The model registry: one decorated entrypoint per variant, one thin ``create``.

Entrypoints are also registered with timm, so ``timm.create_model("msht_tiny")`` works once
``backbones`` is imported. Either way the built model remembers its registry name and the kwargs it
was built with, which is what ``backbones.save`` writes to ``backbone.json``.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from roseprior.errors import ConfigError

TIMM_PREFIX = "timm:"

# Keys timm's create_model always passes; they say nothing about the architecture.
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name here and in timm; the model it returns is stamped with name + kwargs."""
    import timm.models

    name = fn.__name__

    @functools.wraps(fn)
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ConfigError(
                f"{name}: pretrained=True would download weights; load local weights with "
                "backbones.load(dir) or backbones.load_init(path, model=...) instead"
            )
        model = fn(**kwargs)
        arch_kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_PLUMBING}
        model.registry_name = name
        model.registry_kwargs = arch_kwargs
        return model

    _entrypoints[name] = entrypoint
    timm.models.register_model(entrypoint)
    return entrypoint


def remember_num_classes(model: nn.Module, num_classes: int) -> None:
    """Keep the saved kwargs in step after ``reset_classifier``, so ``backbones.save`` rebuilds the same head."""
    if hasattr(model, "registry_kwargs"):
        model.registry_kwargs = {**model.registry_kwargs, "num_classes": num_classes}


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard (``timm:`` names are open-ended and not listed)."""
    return sorted(n for n in _entrypoints if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.is_model(name[len(TIMM_PREFIX) :])
    return name in _entrypoints


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by registry name or ``timm:<name>``; kwargs that are None mean "model default".

    Examples::

        backbones.create("msht_tiny")                      # CPU-sized MSHT
        backbones.create("msht", attn_module="se", norm="gn", num_classes=2)
        backbones.create("timm:vit_small_patch16_224")     # any timm architecture, random init
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith(TIMM_PREFIX):
        from .timm_wrap import create_timm_backbone

        return create_timm_backbone(name[len(TIMM_PREFIX) :], **kwargs)
    if name not in _entrypoints:
        raise ConfigError(
            f"unknown backbone {name!r}; registered: {', '.join(list_models())}, "
            "or any timm model as 'timm:<name>' (e.g. timm:resnet50)"
        )
    try:
        return _entrypoints[name](**kwargs)
    except TypeError as err:  # an unknown kwarg: say which model and which key
        raise ConfigError(f"backbone {name!r} does not take these arguments {sorted(kwargs)}: {err}") from err
