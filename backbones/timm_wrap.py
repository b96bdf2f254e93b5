"""Any timm architecture behind the ``backbones`` feature API (``backbones.create("timm:<name>")``).

Weights are never downloaded: the model is built with ``pretrained=False``; local weights load through
``backbones.load_init(path, model="timm:<name>")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from roseprior.errors import ConfigError

from ._registry import TIMM_PREFIX, remember_num_classes
from .layers import tokens_to_map

__all__ = ["TimmBackbone", "create_timm_backbone"]


class TimmBackbone(nn.Module):
    """Wraps ``timm.create_model(name, num_classes=...)``; keeps timm's own classifier as the head.

    ``embed_dim`` is timm's pre-logits width (``head_hidden_size``), so ``forward_embedding`` is
    ``forward_head(forward_features(x), pre_logits=True)``.
    """

    checkpoint_prefixes = ("model.",)  # a plain timm state dict lands under .model

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.embed_dim = int(getattr(model, "head_hidden_size", model.num_features))
        self.num_classes = int(getattr(model, "num_classes", 0))
        self.default_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self._last_input_hw: tuple[int, int] | None = None
        self._body_group = "transformer" if hasattr(model, "pos_embed") or _has_attention(model) else "cnn"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._last_input_hw = (x.shape[-2], x.shape[-1])
        return self.model.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)
        self.num_classes = num_classes
        remember_num_classes(self, num_classes)

    def group_of(self, param_name: str) -> str:
        """'head' for timm's classifier; otherwise 'transformer' for token models, 'cnn' for conv nets."""
        head_names = {f"model.{n}" for n, _ in self._classifier_named_parameters()}
        if param_name in head_names:
            return "head"
        return self._body_group

    def _classifier_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        classifier = self.model.get_classifier()
        if not isinstance(classifier, nn.Module):
            return []
        ids = {id(p) for p in classifier.parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]

    def cam_target_layers(self) -> dict[str, nn.Module]:
        """The module that ends each feature stage (timm's ``feature_info``), e.g. ``layer4`` or ``blocks.11``."""
        targets: dict[str, nn.Module] = {}
        for info in getattr(self.model, "feature_info", []) or []:
            name = info.get("module")
            if name:
                try:
                    targets[name] = self.model.get_submodule(name)
                except AttributeError:
                    continue
        return targets

    def reshape_transform(self, tensor: torch.Tensor) -> torch.Tensor:
        """Tokens -> (B, C, h, w); NHWC maps (Swin) -> NCHW; NCHW maps pass through."""
        if tensor.ndim == 4 and getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return tensor.permute(0, 3, 1, 2)
        return tokens_to_map(tensor, self.num_prefix_tokens, self._last_input_hw)


def _has_attention(model: nn.Module) -> bool:
    return any("attn" in name.rsplit(".", 1)[-1] for name, _ in model.named_modules())


def create_timm_backbone(name: str, num_classes: int = 0, **kwargs: Any) -> TimmBackbone:
    """Build ``timm:<name>``, random init; ViT-style models get ``dynamic_img_size=True`` when they accept it."""
    import timm

    if kwargs.pop("pretrained", False):
        raise ConfigError(
            f"timm:{name}: pretrained=True would download weights; load local files with load_init"
        )
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"timm has no model {name!r}; similar: {', '.join(close) or 'none'}")
    dynamic = "dynamic_img_size" not in kwargs
    try:
        if dynamic:
            try:
                model = timm.create_model(
                    name, pretrained=False, num_classes=num_classes, dynamic_img_size=True, **kwargs
                )
            # The architecture has no dynamic_img_size switch (CNNs, most hierarchical models).
            except TypeError:
                model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"timm:{name} does not take these arguments {sorted(kwargs)}: {err}") from err
    backbone = TimmBackbone(model)
    backbone.registry_name = TIMM_PREFIX + name
    backbone.registry_kwargs = dict(kwargs, num_classes=num_classes) if num_classes else dict(kwargs)
    return backbone
