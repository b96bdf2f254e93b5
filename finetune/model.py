"""The N/P classifier: a backbone, the input normalisation, and a linear head; its checkpoint.

The classifier takes images in [0, 1] and normalises them itself, so the training loop, Grad-CAM
and ``finetune.predict`` all feed it the same thing and can never disagree about mean/std.
``best.safetensors`` holds the whole classifier; ``best.json`` says how to rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roseprior.checkpoint import atomic_write_json, save_safetensors
from roseprior.errors import CheckpointError
from roseprior.imageops import dihedral_views  # not in forward, where export would trace it

__all__ = ["Classifier", "load_classifier", "save_classifier"]

class Classifier(nn.Module):
    """``logits = head(dropout(backbone.forward_embedding((x - mean) / std)))`` for x in [0, 1].

    mean/std default to the backbone's own input statistics (``backbones.input_stats``). With ``dihedral_mean``,
    an evaluation call (``eval()``) returns the mean of the logits over the field's flips and quarter turns
    (``roseprior.imageops.dihedral_views``): training rotates and flips every image, so each view is a fair reading
    and their mean is a steadier one (``decision.dihedral_mean``). Training calls see the one view they are given.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        drop_rate: float = 0.0,
        dihedral_mean: bool = False,
    ):
        super().__init__()
        import backbones

        self.backbone = backbone
        own_mean, own_std = backbones.input_stats(backbone)  # what the backbone was trained with
        mean, std = tuple(mean or own_mean), tuple(std or own_std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.dihedral_mean = dihedral_mean

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255.0)
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """One reading of the batch as given."""
        return self.head(self.head_drop(self.backbone.forward_embedding(self.normalize(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dihedral_mean and not self.training:
            views = dihedral_views(x)
            if torch.jit.is_tracing() or torch.compiler.is_exporting():
                # An exported graph holds the backbone once (8 inlined copies took minutes to export): the views
                # pass through it as one batch, and finetune.predict feeds an export a few fields at a time.
                return self.logits(torch.cat(views)).reshape(len(views), -1, self.head.out_features).mean(0)
            return sum(self.logits(view) for view in views) / len(views)  # one view's activations at a time
        return self.logits(x)

    @contextmanager
    def one_view(self) -> Iterator[Classifier]:
        """Evaluation calls read the batch as given for the duration: per-epoch selection (cheap), adapt's
        BatchNorm re-estimation (statistics of the fields as trained) and Grad-CAM (one forward pass whose
        activations the maps are made of)."""
        kept, self.dihedral_mean = self.dihedral_mean, False
        try:
            yield self
        finally:
            self.dihedral_mean = kept


# ---------------------------------------------------------------------------------------------
# Checkpoint: best.safetensors + best.json
# ---------------------------------------------------------------------------------------------


def save_classifier(model: Classifier, out_dir: str | Path, info: dict[str, Any], stem: str = "best") -> Path:
    """Write ``stem.safetensors`` (the whole classifier) and ``stem.json`` (how to rebuild it)."""
    out_dir = Path(out_dir)
    backbone = model.backbone
    meta = {
        "format": "roseprior.finetune.classifier/1",
        "backbone": getattr(backbone, "registry_name", None),
        "backbone_kwargs": getattr(backbone, "registry_kwargs", {}),
        "embed_dim": backbone.embed_dim,
        "num_classes": model.head.out_features,
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "dihedral_mean": model.dihedral_mean,
        **info,
    }
    path = save_safetensors(model.state_dict(), out_dir / f"{stem}.safetensors", {"format": "pt"})
    atomic_write_json(out_dir / f"{stem}.json", meta)
    if stem == "best" and getattr(backbone, "registry_name", None):
        _save_backbone(model, out_dir, info)
    return path


def _save_backbone(model: Classifier, out_dir: Path, info: dict[str, Any]) -> None:
    """The fine-tuned backbone alone, in the stage contract (backbone.safetensors + backbone.json),
    so the probes and a later finetune take this run's folder like any other backbone."""
    import backbones

    backbones.set_input_stats(model.backbone, model.mean.flatten().tolist(), model.std.flatten().tolist())
    backbones.save(model.backbone, out_dir, {"stage": "finetune", **info})


def load_classifier(ckpt: str | Path, stem: str = "best") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a classifier from a finetune output folder (or its ``best.safetensors`` path)."""
    from safetensors.torch import load_file

    import backbones

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt} not found; pass a finetune out_dir (holding {stem}.safetensors + {stem}.json)")
    weights = ckpt / f"{stem}.safetensors" if ckpt.is_dir() else ckpt
    meta_path = weights.with_suffix(".json")
    if not weights.is_file() or not meta_path.is_file():
        raise CheckpointError(
            f"{ckpt}: expected {weights.name} and {meta_path.name} written by `python -m finetune`; "
            "pass the run's out_dir"
        )
    from safetensors import SafetensorError

    try:
        meta = json.loads(meta_path.read_text())
        name = meta["backbone"]
        backbone = backbones.create(name, **meta.get("backbone_kwargs", {}))
        model = Classifier(backbone, meta["num_classes"], meta["mean"], meta["std"],
                           dihedral_mean=bool(meta.get("dihedral_mean", False)))  # runs before 2026-12-01: one view
        model.load_state_dict(load_file(str(weights)))
    except (KeyError, TypeError, json.JSONDecodeError, RuntimeError, SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{weights}: cannot rebuild the classifier ({reason}); it is damaged or not from "
                              "`python -m finetune`: train again or restore the file") from None
    return model.eval(), meta
