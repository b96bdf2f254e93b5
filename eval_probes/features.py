"""Frozen-feature extraction with an on-disk cache keyed by checkpoint, data content and condition.

Features are computed once per (checkpoint, image list, condition, image size) and reused by every
later run: comparing a new checkpoint against old ones costs only the new one's forward passes.
The key hashes the checkpoint files' bytes (or, for a random init, its spec and seed) and the bytes
of every image, so editing an image, retraining a checkpoint or changing a condition all miss the
cache instead of silently reusing stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval_probes.conditions import Condition
from roseprior.checkpoint import atomic_write, atomic_write_json
from roseprior.data import ImageDataset, Sample
from roseprior.errors import CheckpointError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when extraction itself changes (normalisation, pooling) to drop old entries
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


def checkpoint_fingerprint(spec: str, seed: int) -> str:
    """What a checkpoint's weights depend on: its files' bytes, or its name and the seed for a random init."""
    digest = hashlib.sha256()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("backbone."))
        if not files:
            raise CheckpointError(
                f"checkpoint folder {path} has no backbone.safetensors/backbone.json; point checkpoints at a "
                "folder written by pretrain or finetune"
            )
        for file in files:
            digest.update(file.name.encode())
            _hash_file(file, digest)
    elif path.is_file():
        _hash_file(path, digest)
    else:  # registry or timm name: random init, so the seed decides the weights
        digest.update(f"random-init:{spec}:seed={seed}".encode())
    return digest.hexdigest()[:20]


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """The image bytes and labels, in order: a changed, added or removed image changes it."""
    digest = hashlib.sha256()
    file_digests: dict[str, str] = {}
    for sample in samples:
        if sample.path not in file_digests:
            one = hashlib.blake2b(digest_size=16)
            _hash_file(Path(sample.path), one)
            file_digests[sample.path] = one.hexdigest()
        digest.update(f"{sample.path}\0{sample.label}\0{file_digests[sample.path]}\n".encode())
    return digest.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


class FeatureCache:
    """``root/<key hash>.npy`` float32 features plus ``<key hash>.json`` saying what they are."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_hash(key: dict[str, Any]) -> str:
        text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, key: dict[str, Any]) -> Path:
        return self.root / f"{self.key_hash(key)}.npy"

    def load(self, key: dict[str, Any], rows: int) -> np.ndarray | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            feats = np.load(path)
        except (OSError, ValueError) as err:  # a truncated file from an old crash: recompute it
            log.warning("feature cache %s unreadable (%s); recomputing", path, err)
            return None
        if feats.ndim != 2 or len(feats) != rows:
            return None
        self.hits += 1
        return feats

    def save(self, key: dict[str, Any], feats: np.ndarray) -> Path:
        path = self.path(key)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file handle, so np.save does not append ".npy" to the tmp name
                np.save(fh, np.ascontiguousarray(feats, dtype=np.float32))

        atomic_write(path, write)
        atomic_write_json(path.with_suffix(".json"), {"version": CACHE_VERSION, **key, "shape": list(feats.shape)})
        self.misses += 1
        return path


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


Stats = tuple[tuple[float, ...], tuple[float, ...]]


def provenance_stats(spec: str | None) -> Stats | None:
    """The mean/std a saved checkpoint was trained with, from its backbone.json provenance.

    pretrain records them under ``provenance.config.views``; a top-level ``provenance.mean/std``
    or ``provenance.config.mean/std`` is accepted too.
    """
    if spec is None or not (Path(spec).expanduser() / "backbone.json").is_file():
        return None
    try:
        meta = json.loads((Path(spec).expanduser() / "backbone.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # backbones.load_init reports a broken json with the file's name
    provenance = meta.get("provenance") or {}
    config = provenance.get("config") or {}
    for holder in (provenance, config.get("views") or {}, config):
        if isinstance(holder, dict) and holder.get("mean") and holder.get("std"):
            return tuple(map(float, holder["mean"])), tuple(map(float, holder["std"]))
    return None


def input_stats(model: torch.nn.Module, spec: str | None = None) -> Stats:
    """The normalisation the backbone saw in training: its checkpoint's provenance, else the model's
    default_cfg (timm's pretrained_cfg), else ImageNet's. Features of a backbone fed the wrong
    statistics understate it, so the probes follow each checkpoint's own."""
    from_provenance = provenance_stats(spec)
    if from_provenance is not None:
        return from_provenance
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    mean = tuple(cfg.get("mean") or _IMAGENET_MEAN)
    std = tuple(cfg.get("std") or _IMAGENET_STD)
    return mean, std


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def extract(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    image_size: int,
    condition: Condition,
    seed: int,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "features",
    progress: bool | Any = True,
    stats: Stats | None = None,
) -> np.ndarray:
    """``forward_embedding`` of every sample under ``condition``: float32 ``(N, embed_dim)``, sample order.

    ``stats`` (mean, std) normalise the [0, 1] images after the condition; default ``input_stats(model)``.
    ``progress`` is a bool (a bar of its own) or a shared tqdm bar advanced by images.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.eval().to(device)
    mean, std = stats or input_stats(model)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    loader = DataLoader(ImageDataset(samples, image_size=image_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    generator = condition.generator(seed, device=device)
    out: list[np.ndarray] = []
    shared = progress if hasattr(progress, "update") else None
    bar = shared or tqdm(total=len(samples), desc=desc, unit="img", disable=not progress)
    if shared is not None:
        shared.set_postfix_str(desc, refresh=False)
    try:
        for images, _labels, _index in loader:
            x = images.to(device).float().div_(255.0)
            x = condition.apply(x, generator)
            emb = model.forward_embedding((x - mean_t) / std_t)
            out.append(emb.float().cpu().numpy())
            bar.update(len(images))
    finally:
        if shared is None:
            bar.close()
    if not out:
        return np.zeros((0, getattr(model, "embed_dim", 0)), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def cached_features(
    cache: FeatureCache,
    model_loader: Any,
    ckpt_fp: str,
    samples: Sequence[Sample],
    data_fp: str,
    condition: Condition,
    image_size: int,
    seed: int,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    desc: str = "features",
    progress: bool | Any = True,
    stats: Stats | None = None,
) -> np.ndarray:
    """Features from the cache, or extracted (loading the model lazily via ``model_loader()``) and stored.

    ``stats`` overrides the model's normalisation; it is part of the key, so a different override misses.
    """
    key: dict[str, Any] = {
        "checkpoint": ckpt_fp,
        "normalize": [list(v) for v in stats] if stats else "checkpoint",
        "data": data_fp,
        "condition": condition.name,
        "spec": condition.spec,
        "image_size": image_size,
    }
    if condition.random:  # its draws follow the batch order
        key.update(seed=seed, batch_size=batch_size)
    feats = cache.load(key, rows=len(samples))
    if feats is not None:
        if hasattr(progress, "update"):
            progress.update(len(samples))
        return feats
    feats = extract(model_loader(), samples, image_size, condition, seed, batch_size, num_workers, device,
                    desc=desc, progress=progress, stats=stats)
    cache.save(key, feats)
    return feats
