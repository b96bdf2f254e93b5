"""k-nearest-neighbour search and voting on frozen features, shared by pretrain's monitor and the probes.

Search is exact top-k inner product on L2-normalised float32 features (so inner product is cosine
similarity). Two exact engines give the same neighbours: faiss's flat index and one BLAS matrix product
with a partial sort (what scikit-learn's brute force does). Which is faster depends on the processor and
the shapes (faiss was 0.4x scikit-learn at 10k x 256 on one Intel machine, 1.3-3x on AMD), so with
``engine="auto"`` the first search of each size class runs both, keeps the faster for the rest of the
process, and returns its result. The GPU index is used when faiss sees a GPU. Above
``approximate_above`` train rows, an inverted-file index (``ivf_index``: faiss ``IndexIVFFlat``,
sqrt(N) lists, 4% of them probed, at least 12) trades exactness for speed on millions of embeddings.
Voting follows DINO's ``eval_knn.py::knn_classifier``: each of the k neighbours votes for its class with weight
exp(sim / T), T = 0.07; a plain majority vote is offered too. Votes are normalised to class
probabilities so they can be scored like any classifier (AUROC, ECE).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np

__all__ = ["ivf_index", "knn_predict", "knn_search", "knn_vote", "l2_normalize"]

Vote = Literal["weighted", "majority"]
Engine = Literal["auto", "faiss", "blas"]
_FASTER: dict[tuple[int, int, int], str] = {}  # size class -> the exact engine measured faster in this process

_GPU_RESOURCES: Any = None  # one faiss StandardGpuResources per process; creating it is slow


def _as_numpy(x: Any, dtype: Any = np.float32) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def l2_normalize(x: Any, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous), the form faiss's inner-product index needs."""
    x = _as_numpy(x)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def _flat_ip_index(dim: int) -> Any:
    import faiss

    global _GPU_RESOURCES
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return faiss.GpuIndexFlatIP(_GPU_RESOURCES, dim)
    return faiss.IndexFlatIP(dim)


def _faiss_search(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = _flat_ip_index(train.shape[1])
    index.add(train)
    return index.search(query, k)


def _blas_search(train: np.ndarray, query: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """One matrix product per chunk of queries, then a partial sort: memory stays at chunk x N."""
    sims_out = np.empty((len(query), k), np.float32)
    idx_out = np.empty((len(query), k), np.int64)
    for lo in range(0, len(query), chunk):
        sims = query[lo : lo + chunk] @ train.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims, axis=1)
        top = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        sims_out[lo : lo + chunk] = np.take_along_axis(top, order, axis=1)
        idx_out[lo : lo + chunk] = np.take_along_axis(idx, order, axis=1)
    return sims_out, idx_out


_EXACT = {"faiss": _faiss_search, "blas": _blas_search}  # the exact engines, by the name ``engine`` takes


def ivf_index(train: np.ndarray, seed: int = 0) -> Any:
    """faiss ``IndexIVFFlat`` over L2-normalised ``train``: sqrt(N) lists from k-means on a sample of 64 rows
    per list, 4% of the lists (at least 12) probed per query (recall@20 >= 0.95 on clustered embeddings, tests/test_knn.py)."""
    import faiss

    lists = max(1, int(math.sqrt(len(train))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(train.shape[1]), train.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = 64  # faiss subsamples the training rows to this many per list
    index.train(train[np.random.default_rng(seed).permutation(len(train))[: 64 * lists]])
    index.add(train)
    index.nprobe = min(lists, max(12, int(math.ceil(0.04 * lists))))
    return index


def knn_search(train: Any, query: Any, k: int, normalize: bool = True, engine: Engine = "auto",
               approximate_above: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of each query row among the train rows: exact, unless the train set has at
    least ``approximate_above`` rows (then ``ivf_index``; a query whose probed lists hold fewer than k rows
    is searched exactly).

    Returns ``(sims, indices)``, both ``(Q, k')`` with ``k' = min(k, N)``, sorted by decreasing
    similarity; ``sims`` float32, ``indices`` int64 into ``train``.
    """
    train_np = l2_normalize(train) if normalize else _as_numpy(train)
    query_np = l2_normalize(query) if normalize else _as_numpy(query)
    if train_np.shape[1] != query_np.shape[1]:
        raise ValueError(
            f"train and query features differ in dimension: {train_np.shape[1]} vs {query_np.shape[1]}"
        )
    if len(train_np) == 0:
        raise ValueError("knn_search needs at least one train feature")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), len(train_np))
    if approximate_above is not None and len(train_np) >= approximate_above:
        sims, indices = ivf_index(train_np).search(query_np, k)
        short = np.flatnonzero((indices < 0).any(axis=1))  # probed lists held fewer than k rows: search exactly
        if len(short):
            sims[short], indices[short] = _faiss_search(train_np, query_np[short], k)
    elif engine != "auto":
        sims, indices = _EXACT[engine](train_np, query_np, k)
    else:
        sims, indices = _measured_search(train_np, query_np, k)
    return sims.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


def _measured_search(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The engine measured faster for this size class; the first search of a class runs both."""
    import faiss

    if faiss.get_num_gpus() > 0:
        return _faiss_search(train, query, k)
    size = (round(math.log2(len(train))), round(math.log2(len(query))), round(math.log2(train.shape[1])))
    if size in _FASTER:
        return _EXACT[_FASTER[size]](train, query, k)
    times, results = {}, {}
    for name, search in _EXACT.items():
        start = time.perf_counter()
        results[name] = search(train, query, k)
        times[name] = time.perf_counter() - start
    _FASTER[size] = min(times, key=times.get)
    return results[_FASTER[size]]


def knn_vote(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    num_classes: int,
    k: int | None = None,
    temperature: float = 0.07,
    vote: Vote = "weighted",
) -> np.ndarray:
    """Class probabilities ``(Q, num_classes)`` from the first ``k`` neighbours of each query.

    Split from the search so a k grid costs one search at the largest k.
    """
    if vote not in ("weighted", "majority"):
        raise ValueError(f"vote must be 'weighted' or 'majority', got {vote!r}")
    sims = np.asarray(sims, dtype=np.float64)
    neighbour_labels = np.asarray(neighbour_labels, dtype=np.int64)
    if k is not None:
        sims, neighbour_labels = sims[:, :k], neighbour_labels[:, :k]
    if vote == "weighted":
        # Subtracting the row max before exp changes no ratio but keeps exp(1/0.07) finite in sums.
        weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
    else:
        weights = np.ones_like(sims)
    one_hot = np.eye(num_classes, dtype=np.float64)[neighbour_labels]  # (Q, k, C)
    scores = np.einsum("qk,qkc->qc", weights, one_hot)
    return (scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)


def knn_predict(
    train_feats: Any,
    train_labels: Any,
    query_feats: Any,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    vote: Vote = "weighted",
) -> np.ndarray:
    """kNN class probabilities ``(Q, num_classes)`` for each query row (weighted or majority vote)."""
    labels = _as_numpy(train_labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(train_feats):
        raise ValueError(f"{len(train_feats)} train features but {len(labels)} labels")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    sims, indices = knn_search(train_feats, query_feats, k)
    return knn_vote(sims, labels[indices], num_classes, temperature=temperature, vote=vote)

