"""An on-disk cache of frozen features, keyed by checkpoint, data content and condition.

Features (``roseprior.features.extract_features``, the one extractor every stage uses) are computed
once per (checkpoint, image list, condition, image size) and reused by every later run: comparing a
new checkpoint against old ones costs only the new one's forward passes. The key hashes the
checkpoint files' bytes (``backbones.init_fingerprint``; for a random init, its spec and seed) and
the bytes of every image, so editing an image, retraining a checkpoint or changing a condition all
miss the cache instead of silently reusing stale features.
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
from roseprior.data import Sample
from roseprior.features import extract_features

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when extraction itself changes (normalisation, pooling) to drop old entries


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


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
    progress: Any = None,
    stats: tuple[Any, Any] | None = None,
) -> np.ndarray:
    """Features from the cache, or extracted (loading the model lazily via ``model_loader()``) and stored.

    ``stats`` overrides the model's normalisation; it is part of the key, so a different override misses.
    ``progress`` (anything with ``update(n)``) advances by the images served, cached or not.
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
        if progress is not None:
            progress.update(len(samples))
        return feats
    generator = condition.generator(seed, device=device)
    model = model_loader()
    if condition.by_domain is None or not samples:
        feats = extract_features(model, samples, image_size, lambda x: condition.apply(x, generator), batch_size,
                                 num_workers, device, progress, stats)
    else:  # each domain's images through its own op, put back in sample order
        rows_of: dict[str | None, list[int]] = {}
        for i, sample in enumerate(samples):
            rows_of.setdefault(sample.domain, []).append(i)
        parts = {domain: extract_features(model, [samples[i] for i in rows], image_size,
                                          lambda x, op=condition.by_domain(domain): op(x, generator), batch_size,
                                          num_workers, device, progress, stats)
                 for domain, rows in rows_of.items()}
        feats = np.zeros((len(samples), next(iter(parts.values())).shape[1]), dtype=np.float32)
        for domain, rows in rows_of.items():
            feats[rows] = parts[domain]
    cache.save(key, feats)
    return feats
