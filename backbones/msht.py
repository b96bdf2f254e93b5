"""MSHT: Multi-stage Hybrid Transformer.

Zhang et al., "MSHT: Multi-stage Hybrid Transformer for the ROSE Image Analysis of Pancreatic
Cancer", IEEE JBHI 2023, https://arxiv.org/abs/2112.13513 (reimplemented from the paper's
description; no code copied).

A ResNet body produces four stage maps. Stage 4, after SimAM and a 1x1 conv, becomes the token
stream (the "values"). Each stage also feeds a "focus" module whose max-pooled ("gaze") and
avg-pooled ("glance") tokens become the queries and keys of one decoder block's guided attention,
so the attention map comes from the CNN stage and only the values from the transformer stream.

Variants: ``msht`` (ResNet-50 body, D=768, the paper's model), ``msht_small`` (ResNet-18 body,
D=384) and ``msht_tiny`` (half-width ResNet-18 body, D=192; fast on CPU for tests and demos).
Ablation switches: ``attn_module`` (simam/se/cbam/none), ``class_token`` (False: mean-pool),
``pos_embed`` (False: none), ``focus_stages`` (e.g. (2, 3, 4) for three stages), ``norm``
("bn" or "gn" for the CNN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn

from roseprior.errors import ConfigError, DataError

from ._registry import register_model, remember_num_classes
from .layers import ATTENTION_MODULES, create_attention, create_resnet, resnet_stage_channels, tokens_to_map

__all__ = ["MSHT", "GuidedAttention", "FocusModule", "DecoderBlock"]

STRIDE = 32  # the token grid is the stage-4 grid: one token per 32x32 pixels


# ====== blocks ======


class GuidedAttention(nn.Module):
    """Attention whose map comes from a CNN stage and whose values come from the token stream.

    Hand-written because timm's ``Attention`` projects Q, K and V from one input with a fused qkv
    linear; here Q comes from the stage's gaze tokens, K from its glance tokens and V from the
    stream, so each needs its own D x D projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_attn = False  # set by MSHT.attention_maps(); the map is then kept in .attn_map
        self.attn_map: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        if self.keep_attn:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            self.attn_map = attn.detach()
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(value.shape)
        return self.proj_drop(self.proj(x))


class FocusModule(nn.Module):
    """Turns one CNN stage map into guidance tokens: gaze (max-pool) -> queries, glance (avg-pool) -> keys.

    Pooling with kernel = stride = ``pool`` brings every stage to the stage-4 grid.
    """

    def __init__(
        self, in_chs: int, dim: int, pool: int, attn_module: str = "simam", simam_lambda: float = 1e-4
    ):
        super().__init__()
        self.attn = create_attention(attn_module, in_chs, simam_lambda)
        self.gaze_pool = nn.MaxPool2d(pool, pool) if pool > 1 else nn.Identity()
        self.glance_pool = nn.AvgPool2d(pool, pool) if pool > 1 else nn.Identity()
        self.gaze_proj = nn.Conv2d(in_chs, dim, 1)
        self.glance_proj = nn.Conv2d(in_chs, dim, 1)
        self.gaze_norm = nn.LayerNorm(dim)
        self.glance_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.attn(x)
        gaze = self.gaze_proj(self.gaze_pool(x)).flatten(2).transpose(1, 2)
        glance = self.glance_proj(self.glance_pool(x)).flatten(2).transpose(1, 2)
        return self.gaze_norm(gaze), self.glance_norm(glance)


class DecoderBlock(nn.Module):
    """Pre-norm: self-attention, FFN, stage-guided attention, FFN, each with a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp1 = Mlp(dim, hidden, act_layer=nn.GELU, drop=proj_drop)
        self.norm3 = nn.LayerNorm(dim)
        self.guided_attn = GuidedAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.norm4 = nn.LayerNorm(dim)
        self.mlp2 = Mlp(dim, hidden, act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, v: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        v = v + self.drop_path(self.attn(self.norm1(v)))
        v = v + self.drop_path(self.mlp1(self.norm2(v)))
        v = v + self.drop_path(self.guided_attn(q, k, self.norm3(v)))
        v = v + self.drop_path(self.mlp2(self.norm4(v)))
        return v


# ====== model ======


class MSHT(nn.Module):
    """Multi-stage hybrid transformer with the ``backbones`` feature API.

    ``forward_features`` returns the final-normed tokens (B, P + h*w, D), P = 1 with the cls token;
    ``forward_embedding`` the pooled (B, D) embedding; ``forward`` the logits when num_classes > 0.
    """

    input_multiple = STRIDE  # image sides the model takes are multiples of this (pretrain checks its view sizes)

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        embed_dim: int = 768,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        img_size: int | Sequence[int] = 384,
        in_chans: int = 3,
        num_classes: int = 0,
        attn_module: str = "simam",
        simam_lambda: float = 1e-4,
        class_token: bool = True,
        pos_embed: bool = True,
        focus_stages: Sequence[int] = (1, 2, 3, 4),
        norm: str = "bn",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cnn_drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if attn_module not in ATTENTION_MODULES:
            raise ConfigError(
                f"attn_module={attn_module!r} is not known; use one of {', '.join(ATTENTION_MODULES)}"
            )
        focus_stages = tuple(int(s) for s in focus_stages)
        if (
            not focus_stages
            or sorted(set(focus_stages)) != list(focus_stages)
            or not set(focus_stages) <= {1, 2, 3, 4}
        ):
            raise ConfigError(
                f"focus_stages={focus_stages} must be increasing stage numbers from 1..4, e.g. (1, 2, 3, 4)"
            )
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % STRIDE or img_size[1] % STRIDE:
            raise ConfigError(f"img_size={img_size} must be a multiple of {STRIDE}")

        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.focus_stages = focus_stages
        self.num_prefix_tokens = 1 if class_token else 0
        self.global_pool = "token" if class_token else "avg"
        self.img_size = img_size
        self.grid_size = (img_size[0] // STRIDE, img_size[1] // STRIDE)  # the native position grid
        self._last_input_hw: tuple[int, int] | None = None

        # CNN: a timm ResNet body; its four stage maps feed the stream (stage 4) and the focus modules.
        self.cnn = create_resnet(block, tuple(layers), tuple(channels), norm, in_chans, cnn_drop_path_rate)
        stage_chs = resnet_stage_channels(self.cnn)

        self.stream_attn = create_attention(attn_module, stage_chs[3], simam_lambda)
        self.stream_proj = nn.Conv2d(stage_chs[3], embed_dim, 1)
        self.focus = nn.ModuleList(
            FocusModule(stage_chs[s - 1], embed_dim, 2 ** (4 - s), attn_module, simam_lambda)
            for s in focus_stages
        )

        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim)) if pos_embed else None

        n = len(focus_stages)
        dpr = [drop_path_rate * i / max(1, n - 1) for i in range(n)]  # plain floats: works on the meta device
        self.decoders = nn.ModuleList(
            DecoderBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, dpr[i])
            for i in range(len(focus_stages))
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 2), module=f"cnn.layer{i + 1}")
                             for i, c in enumerate(stage_chs)] + [dict(num_chs=embed_dim, reduction=STRIDE, module="norm")]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------ setup ------

    def init_weights(self) -> None:
        """timm's ViT init for the transformer parts; the CNN keeps timm ResNet's own init."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("cnn"):
                continue
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        remember_num_classes(self, num_classes)

    def set_input_size(self, img_size: int | Sequence[int]) -> None:
        """Make ``img_size`` the native size: the position embedding is resampled once, here, so a
        forward at that size runs no resampling (an exported graph is then fixed-size and exact)."""
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(v) for v in img_size)
        if size[0] % STRIDE or size[1] % STRIDE:
            raise ConfigError(f"img_size={size} must be a multiple of {STRIDE}")
        grid = (size[0] // STRIDE, size[1] // STRIDE)
        if self.pos_embed is not None and grid != self.grid_size:
            with torch.no_grad():
                self.pos_embed = nn.Parameter(self._resampled_pos_embed(grid).clone())
        self.img_size, self.grid_size = size, grid
        if hasattr(self, "registry_kwargs"):
            self.registry_kwargs = {**self.registry_kwargs, "img_size": size[0] if size[0] == size[1] else list(size)}

    # ------ forward ------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[-2] % STRIDE or x.shape[-1] % STRIDE:
            raise DataError(
                f"MSHT needs (B, C, H, W) images with H and W multiples of {STRIDE}, got {tuple(x.shape)}; "
                "resize or crop the input (e.g. to 224 or 384)"
            )

    def _add_prefix_and_pos(self, tokens: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens if pos is None else tokens + pos

    def _resampled_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        if tuple(grid) == tuple(self.grid_size):  # timm's own early-out is off while exporting: keep the graph exact
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=list(self.grid_size),
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        self._last_input_hw = (x.shape[-2], x.shape[-1])
        stages = self.cnn.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        grid = tuple(stages[3].shape[-2:])
        pos = self._resampled_pos_embed(grid)

        v = self.stream_proj(self.stream_attn(stages[3])).flatten(2).transpose(1, 2)
        v = self._add_prefix_and_pos(v, pos)
        for stage, focus, decoder in zip(self.focus_stages, self.focus, self.decoders, strict=True):
            q, k = focus(stages[stage - 1])
            v = decoder(v, self._add_prefix_and_pos(q, pos), self._add_prefix_and_pos(k, pos))
        return self.norm(v)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False) -> Any:
        """timm's feature API (``timm.create_model("msht", features_only=True)``): maps of the four CNN
        stages (strides 4, 8, 16, 32) and of the final tokens (stride 32, ``embed_dim`` channels)."""
        from timm.models._features import feature_take_indices

        take, _ = feature_take_indices(len(self.feature_info), indices)
        self._check_input(x)
        stages = self.cnn.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        tokens = self.forward_features(x)
        grid = tuple(stages[3].shape[-2:])
        token_map = tokens[:, self.num_prefix_tokens :].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        maps = [*stages, token_map]
        picked = [maps[i] for i in take]
        return picked if intermediates_only else (tokens, picked)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------ parameter groups and explainability ------

    def group_of(self, param_name: str) -> str:
        """'cnn' (the ResNet body, ImageNet-loadable), 'head' (classifier), or 'transformer' (the rest)."""
        if param_name.startswith("cnn."):
            return "cnn"
        if param_name.startswith("head."):
            return "head"
        return "transformer"

    checkpoint_prefixes = ("cnn.",)  # where a plain ResNet state dict lands (see backbones.weights)

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a state dict saved at another native ``img_size`` (resamples ``pos_embed``)."""
        return checkpoint_filter_fn(state_dict, self)

    def cam_target_layers(self) -> dict[str, nn.Module]:
        """Grad-CAM targets: the last block of each CNN stage, and per decoder the norm its tokens pass next.

        For every decoder but the last, that is the next decoder's input norm (its output). The last
        decoder's output reaches the head through the class token alone, so its patch tokens get no
        gradient there; its target is the norm that makes its guided attention's values, which the
        class token reads in proportion to the stage-guided attention, the last place patches matter.
        """
        targets: dict[str, nn.Module] = {
            f"cnn.stage{i}": getattr(self.cnn, f"layer{i}")[-1] for i in range(1, 5)
        }
        out_norms = [d.norm1 for d in self.decoders[1:]] + [self.decoders[-1].norm3]
        for stage, out_norm in zip(self.focus_stages, out_norms, strict=True):
            targets[f"decoder{stage}"] = out_norm
        return targets

    def reshape_transform(self, tensor: torch.Tensor) -> torch.Tensor:
        """Tokens -> (B, D, h, w) for Grad-CAM (drops the cls token); CNN maps pass through."""
        return tokens_to_map(tensor, self.num_prefix_tokens, self._last_input_hw)

    @contextlib.contextmanager
    def _keeping_attention(self) -> Iterator[list[GuidedAttention]]:
        attns = [d.guided_attn for d in self.decoders]
        for a in attns:
            a.keep_attn = True
        try:
            yield attns
        finally:
            for a in attns:
                a.keep_attn, a.attn_map = False, None

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each decoder's guided-attention weights, (B, heads, P + h*w, P + h*w), keyed 'decoder<stage>'."""
        with self._keeping_attention() as attns:
            self.forward_features(x)
            return {f"decoder{s}": a.attn_map for s, a in zip(self.focus_stages, attns, strict=True)}


# ====== checkpoint filter ======


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MSHT) -> dict[str, torch.Tensor]:
    """Resample a saved position embedding to this model's native grid (different ``img_size``)."""
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        n = pos.shape[1] - model.num_prefix_tokens
        side = int(round(n**0.5))
        out["pos_embed"] = resample_abs_pos_embed(
            pos,
            new_size=list(model.grid_size),
            old_size=[side, n // side],
            num_prefix_tokens=model.num_prefix_tokens,
        )
    return out


# ====== default cfgs ======


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # ImageNet mean/std suit ImageNet-initialised CNN weights; a stage may set stain mean/std instead.
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 384, 384),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "cnn.conv1",
        "classifier": "head",
        "paper_ids": "arXiv:2112.13513",
        "paper_name": "MSHT: Multi-stage Hybrid Transformer for the ROSE Image Analysis of Pancreatic Cancer",
        "notes": ("mean/std are ImageNet's; set stain-specific statistics in the data config",),
        **kwargs,
    }


default_cfgs = {
    "msht": _cfg(),
    "msht_small": _cfg(input_size=(3, 224, 224)),
    "msht_tiny": _cfg(input_size=(3, 224, 224)),
}


def _create_msht(variant: str, **kwargs: Any) -> MSHT:
    return build_model_with_cfg(
        MSHT, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter"), **kwargs  # features_only=True: forward_intermediates
    )


# ====== variants ======


@register_model
def msht(**kwargs: Any) -> MSHT:
    """The paper's MSHT: ResNet-50 body, D=768, 8 heads, four stage-guided decoders, 384 px."""
    args = dict(block="bottleneck", layers=(3, 4, 6, 3), embed_dim=768, num_heads=8, img_size=384)
    return _create_msht("msht", **dict(args, **kwargs))


@register_model
def msht_small(**kwargs: Any) -> MSHT:
    """ResNet-18 body, D=384, 6 heads: a quarter of MSHT's width for mid-size runs."""
    args = dict(block="basic", layers=(2, 2, 2, 2), embed_dim=384, num_heads=6, img_size=224)
    return _create_msht("msht_small", **dict(args, **kwargs))


@register_model
def msht_tiny(**kwargs: Any) -> MSHT:
    """Half-width ResNet-18 body (32..256 channels), D=192, 3 heads: CPU tests and demos."""
    args = dict(
        block="basic",
        layers=(2, 2, 2, 2),
        channels=(32, 64, 128, 256),
        embed_dim=192,
        num_heads=3,
        img_size=224,
    )
    return _create_msht("msht_tiny", **dict(args, **kwargs))
