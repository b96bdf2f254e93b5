"""Blocks shared by the hybrid families: SimAM, the attention-module switch, and the timm ResNet body.

SimAM: Yang et al., "SimAM: A Simple, Parameter-Free Attention Module for CNNs", ICML 2021
(https://proceedings.mlr.press/v139/yang21o.html). SE and CBAM come from timm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from roseprior.errors import ConfigError

ATTENTION_MODULES = ("simam", "se", "cbam", "none")
NORMS = ("bn", "gn")
BLOCKS = ("basic", "bottleneck")


class SimAM(nn.Module):
    """Parameter-free attention: weights each activation by how much it stands out from its channel.

    Written by hand because neither timm nor torchvision ships it; it is three tensor lines.
    The energy of neuron t in a channel is ``(t - mu)^2 / (4 (var + lambda)) + 0.5``; the output
    is ``x * sigmoid(energy)``.
    """

    def __init__(self, channels: int | None = None, lambda_: float = 1e-4) -> None:
        super().__init__()
        self.lambda_ = lambda_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2] * x.shape[-1] - 1
        d = (x - x.mean(dim=(-2, -1), keepdim=True)).pow(2)
        var = d.sum(dim=(-2, -1), keepdim=True) / max(n, 1)
        energy = d / (4 * (var + self.lambda_)) + 0.5
        return x * torch.sigmoid(energy)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


def create_attention(kind: str, channels: int, simam_lambda: float = 1e-4) -> nn.Module:
    """The paper's ablation switch: SimAM (default), squeeze-excite, CBAM, or nothing."""
    from timm.layers import SEModule
    from timm.layers.cbam import CbamModule

    if kind == "simam":
        return SimAM(channels, lambda_=simam_lambda)
    if kind == "se":
        return SEModule(channels, rd_ratio=1 / 16)
    if kind == "cbam":
        return CbamModule(channels, rd_ratio=1 / 16)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"attn_module={kind!r} is not known; use one of {', '.join(ATTENTION_MODULES)}")


def group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    """GroupNorm with timm's ``norm_layer(channels)`` signature: 32 groups, fewer for narrow layers.

    At least 4 channels per group, so the tiny variants do not degrade into instance norm.
    """
    groups = math.gcd(32, max(1, num_channels // 4))
    return nn.GroupNorm(groups, num_channels, **kwargs)


def norm_layer_for(norm: str) -> Callable[..., nn.Module]:
    """``bn`` couples the samples of a batch; ``gn`` does not (small batches, per-process DDP on CPU)."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return group_norm
    raise ConfigError(f"norm={norm!r} is not known; use one of {', '.join(NORMS)}")


def create_resnet(
    block: str = "bottleneck",
    layers: tuple[int, ...] = (3, 4, 6, 3),
    channels: tuple[int, ...] = (64, 128, 256, 512),
    norm: str = "bn",
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ResNet body without pooling or classifier (7x7/2 stem, max-pool, four stages).

    Its parameter names (``conv1``, ``bn1``, ``layerN.M.convK``, ``downsample.0``) equal
    torchvision's, so ImageNet ResNet state dicts from either library load without renaming.
    """
    from timm.models import FeatureInfo
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    if block not in BLOCKS:
        raise ConfigError(f"block={block!r} is not known; use one of {', '.join(BLOCKS)}")
    if len(layers) != 4 or len(channels) != 4:
        raise ConfigError(f"layers and channels need four stages each, got {layers} and {channels}")
    block_cls = Bottleneck if block == "bottleneck" else BasicBlock
    cnn = ResNet(
        block_cls,
        tuple(layers),
        channels=tuple(channels),
        num_classes=0,
        global_pool="",
        in_chans=in_chans,
        norm_layer=norm_layer_for(norm),
        drop_path_rate=drop_path_rate,
    )
    # timm's FeatureInfo over the four stages (not the stem), as HybridEmbed and feature users expect.
    cnn.feature_info = FeatureInfo(cnn.feature_info, out_indices=(1, 2, 3, 4))
    return cnn


def resnet_stage_channels(cnn: nn.Module) -> list[int]:
    """Output channels of the four stages, read from timm's feature_info."""
    return list(cnn.feature_info.channels())


def tokens_to_map(
    tokens: torch.Tensor, num_prefix_tokens: int, image_hw: tuple[int, int] | None
) -> torch.Tensor:
    """(B, P + h*w, C) tokens -> (B, C, h, w) map, for Grad-CAM on transformer layers.

    The grid's aspect follows the last input image, so non-square inputs reshape correctly.
    4-D tensors (CNN maps) pass through unchanged.
    """
    if tokens.ndim == 4:
        return tokens
    tokens = tokens[:, num_prefix_tokens:]
    n = tokens.shape[1]
    if image_hw is None:
        h = w = int(round(math.sqrt(n)))
    else:
        h = int(round(math.sqrt(n * image_hw[0] / image_hw[1])))
        w = n // max(h, 1)
    if h * w != n:
        raise ValueError(f"cannot reshape {n} tokens to a grid with the input's aspect {image_hw}")
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
