"""The model zoo: MSHT and its variants, the hybrid ViT baseline, and any timm model, behind one API.

Every backbone has ``embed_dim``, ``forward_features(x)`` (tokens or maps) and
``forward_embedding(x) -> (B, embed_dim)``; ``num_classes > 0`` adds a classifier for ``forward``.

    import backbones
    model = backbones.create("msht_tiny")           # or "msht", "hybrid_vit", "timm:resnet50"
    emb = model.forward_embedding(images)            # (B, model.embed_dim)
    backbones.save(model, "out/")                    # backbone.safetensors + backbone.json
    model = backbones.load("out/")
"""

from __future__ import annotations

from . import hybrid_vit as _hybrid_vit  # noqa: F401  (registers hybrid_vit)
from . import msht as _msht  # noqa: F401  (registers msht, msht_small, msht_tiny)
from ._registry import TIMM_PREFIX, create, is_model, list_models, register_model
from .helpers import (
    GROUPS,
    cam_target_layers,
    group_of,
    input_stats,
    param_groups,
    reshape_transform,
    set_input_stats,
)
from .weights import LoadReport, init_fingerprint, load, load_init, load_into, load_state_dict_file, save

__all__ = [
    "TIMM_PREFIX",
    "GROUPS",
    "LoadReport",
    "cam_target_layers",
    "create",
    "group_of",
    "init_fingerprint",
    "input_stats",
    "is_model",
    "list_models",
    "load",
    "load_init",
    "load_into",
    "load_state_dict_file",
    "param_groups",
    "register_model",
    "reshape_transform",
    "save",
    "set_input_stats",
]
