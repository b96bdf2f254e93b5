"""Hybrid ViT: ResNet-50 stage 4 -> 1x1 conv -> ViT encoder (the MSHT paper's "Hybrid1" baseline).

Zhang et al., MSHT, https://arxiv.org/abs/2112.13513 (Hybrid1 comparison);
Dosovitskiy et al., "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929 (R50+ViT hybrid).

Built from timm: ``VisionTransformer`` with a ``HybridEmbed`` patch embedding around the timm ResNet
body (patch size 1 on the stride-32 stage-4 map), ``dynamic_img_size`` for variable input sizes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import HybridEmbed, resample_abs_pos_embed
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from roseprior.errors import ConfigError, DataError

from ._registry import register_model, remember_num_classes
from .layers import create_resnet, tokens_to_map

__all__ = ["HybridViT"]

STRIDE = 32

# ====== model ======


class HybridViT(VisionTransformer):
    """timm VisionTransformer over a timm ResNet body, with the ``backbones`` feature API."""

    input_multiple = STRIDE  # image sides the model takes are multiples of this (pretrain checks its view sizes)

    checkpoint_prefixes = ("patch_embed.backbone.",)  # where a plain ResNet state dict lands

    def __init__(
        self,
        img_size: int = 384,
        block: str = "bottleneck",
        layers: tuple[int, ...] = (3, 4, 6, 3),
        channels: tuple[int, ...] = (64, 128, 256, 512),
        norm: str = "bn",
        in_chans: int = 3,
        **kwargs: Any,
    ) -> None:
        if int(img_size) % STRIDE:
            raise ConfigError(f"img_size={img_size} must be a multiple of {STRIDE}")
        cnn = create_resnet(block, tuple(layers), tuple(channels), norm, in_chans)
        grid = int(img_size) // STRIDE
        # feature_size given, so HybridEmbed does not run a probe forward through the CNN at init.
        embed = partial(HybridEmbed, backbone=cnn, feature_size=grid, feature_ratio=STRIDE)
        kwargs.setdefault("dynamic_img_size", True)
        super().__init__(img_size=img_size, patch_size=1, in_chans=in_chans, embed_layer=embed, **kwargs)
        self._last_input_hw: tuple[int, int] | None = None

    def forward_features(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % STRIDE or x.shape[-1] % STRIDE:
            raise DataError(
                f"hybrid_vit needs (B, C, H, W) images with H and W multiples of {STRIDE}, got {tuple(x.shape)}"
            )
        self._last_input_hw = (x.shape[-2], x.shape[-1])
        return super().forward_features(x, **kwargs)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def group_of(self, param_name: str) -> str:
        if param_name.startswith("patch_embed.backbone."):
            return "cnn"
        if param_name.startswith("head."):
            return "head"
        return "transformer"

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        remember_num_classes(self, num_classes)

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a state dict saved at another native ``img_size`` (resamples ``pos_embed``)."""
        pos = state_dict.get("pos_embed")
        if pos is None or pos.shape == self.pos_embed.shape:
            return state_dict
        n = pos.shape[1] - self.num_prefix_tokens
        side = int(round(n**0.5))
        pos = resample_abs_pos_embed(
            pos, list(self.patch_embed.grid_size), [side, n // side], num_prefix_tokens=self.num_prefix_tokens
        )
        return dict(state_dict, pos_embed=pos)

    def cam_target_layers(self) -> dict[str, nn.Module]:
        """The last block of each CNN stage and the norm applied to each encoder block's output.

        The last block is left out: its output reaches the head through the class token alone, so
        its patch tokens get no gradient (the usual ViT target, ``blocks[-1].norm1``, is ``block{n-1}``).
        """
        cnn = self.patch_embed.backbone
        targets: dict[str, nn.Module] = {f"cnn.stage{i}": getattr(cnn, f"layer{i}")[-1] for i in range(1, 5)}
        for i, block in enumerate(self.blocks[1:], start=1):
            targets[f"block{i}"] = block.norm1
        if self.num_prefix_tokens == 0:  # mean-pooled: every token reaches the head
            targets[f"block{len(self.blocks)}"] = self.norm
        return targets

    def reshape_transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(tensor, self.num_prefix_tokens, self._last_input_hw)


# ====== default cfgs ======


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 384, 384),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.backbone.conv1",
        "classifier": "head",
        "paper_ids": "arXiv:2112.13513",
        **kwargs,
    }


default_cfgs = {"hybrid_vit": _cfg()}


def _create_hybrid_vit(variant: str, **kwargs: Any) -> HybridViT:
    return build_model_with_cfg(
        HybridViT, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


# ====== variants ======


@register_model
def hybrid_vit(**kwargs: Any) -> HybridViT:
    """ResNet-50 stage 4 -> 1x1 conv -> ViT encoder, depth 8, 12 heads, D=768, 384 px."""
    args = dict(embed_dim=768, depth=8, num_heads=12, mlp_ratio=4.0, qkv_bias=True, img_size=384)
    return _create_hybrid_vit("hybrid_vit", **dict(args, **kwargs))
