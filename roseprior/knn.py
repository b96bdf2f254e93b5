"""k-nearest-neighbour search and voting on frozen features, shared by pretrain's monitor and the probes.

Search is faiss's exact inner-product index on L2-normalised float32 features (so inner product is
cosine similarity); the GPU index is used when faiss sees a GPU. Voting follows DINO's
``eval_knn.py::knn_classifier``: each of the k neighbours votes for its class with weight
exp(sim / T), T = 0.07; a plain majority vote is offered too. Votes are normalised to class
probabilities so they can be scored like any classifier (AUROC, ECE).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["knn_predict", "knn_search", "knn_vote", "l2_normalize"]

Vote = Literal["weighted", "majority"]

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


def knn_search(train: Any, query: Any, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of each query row among the train rows.

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
    index = _flat_ip_index(train_np.shape[1])
    index.add(train_np)
    sims, indices = index.search(query_np, k)
    return sims.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


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

