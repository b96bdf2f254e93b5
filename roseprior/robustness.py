"""The robustness index: does an embedding's neighbourhood follow the class or the domain?

PathoROB (Kömen et al. 2025; de Jong et al. 2025): for each image's k nearest neighbours
(cosine, L2-normalised features; neighbours from the image's own group, e.g. its slide, excluded,
since they share both class and domain trivially), count same-class-other-domain neighbours (SO)
and other-class-same-domain neighbours (OS). RI = sum(SO) / (sum(SO) + sum(OS)): 1.0 means no
neighbour is pulled in by domain alone, 0.5 means domain pulls as hard as class, below 0.5 the
embedding clusters by domain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from roseprior.knn import knn_search


def neighbours_excluding_groups(feats: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(N, k)`` of each row's k nearest other rows outside its own group (-1 where fewer exist)."""
    n = len(feats)
    # Search deep enough that k neighbours survive dropping the row's own group (itself included).
    _, group_sizes = np.unique(groups, return_counts=True)
    depth = min(n, k + int(group_sizes.max()))
    _, idx = knn_search(feats, feats, depth)
    keep = groups[idx] != groups[:, None]
    out = np.full((n, k), -1, dtype=np.int64)
    for row in range(n):
        kept = idx[row][keep[row]][:k]
        out[row, : len(kept)] = kept
    return out


def robustness_index(
    feats: np.ndarray,
    labels: Sequence[int],
    domains: Sequence[str],
    groups: Sequence[str] | None = None,
    ks: Sequence[int] = (5, 10, 20, 50),
) -> dict[str, float | None]:
    """RI for each k (keys ``"5"``, ``"10"``, ...); None where no neighbour is SO or OS at that k."""
    labels_np = np.asarray(labels)
    domains_np = np.asarray([str(d) for d in domains])
    groups_np = np.asarray([str(g) for g in groups]) if groups is not None else np.arange(len(feats)).astype(str)
    out: dict[str, float | None] = {}
    if len(feats) < 2:
        return {str(k): None for k in ks}
    idx = neighbours_excluding_groups(np.asarray(feats, dtype=np.float32), groups_np, max(ks))
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    same_class = (labels_np[safe] == labels_np[:, None]) & valid
    same_domain = (domains_np[safe] == domains_np[:, None]) & valid
    for k in ks:
        so = int((same_class[:, :k] & ~same_domain[:, :k] & valid[:, :k]).sum())
        os_ = int((~same_class[:, :k] & same_domain[:, :k] & valid[:, :k]).sum())
        out[str(k)] = so / (so + os_) if so + os_ else None
    return out


def balanced_robustness_index(
    feats: np.ndarray,
    labels: Sequence[int],
    domains: Sequence[str],
    groups: Sequence[str] | None = None,
    ks: Sequence[int] = (5, 10, 20, 50),
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, object]:
    """RI on class x domain-balanced subsamples, as PathoROB computes it: every (class, domain) cell is
    subsampled to the smallest cell's count, so the index does not move with how many images each
    site contributes; repeated over ``repeats`` seeded draws. Returns, per k, the mean and standard
    deviation over the draws (None for a k above a quarter of the subsample), the images per cell, and
    ``chance``: the index of neighbours drawn at random from a balanced set, ``(D - 1) / D`` for D
    domains (two classes)."""
    labels_np = np.asarray(labels)
    domains_np = np.asarray([str(d) for d in domains])
    cells = {(c, d): np.flatnonzero((labels_np == c) & (domains_np == d))
             for c in np.unique(labels_np) for d in np.unique(domains_np)}
    per_cell = min((len(v) for v in cells.values()), default=0)
    n_domains = len(np.unique(domains_np))
    out: dict[str, object] = {"per_cell": per_cell, "repeats": repeats,
                              "chance": (n_domains - 1) / n_domains if n_domains > 1 else None}
    if per_cell < 2 or n_domains < 2:
        out.update(mean={str(k): None for k in ks}, std={str(k): None for k in ks})
        return out
    rng = np.random.default_rng(seed)
    # A k near the subsample's size makes every image a neighbour: the index then says only how the
    # subsample was composed (it equals the chance level). Such k are reported as None.
    usable = [k for k in ks if k <= per_cell * len(cells) / 4]
    draws: dict[str, list[float]] = {str(k): [] for k in ks}
    for _ in range(repeats if usable else 0):
        rows = np.concatenate([rng.choice(v, per_cell, replace=False) for v in cells.values()])
        ri = robustness_index(feats[rows], labels_np[rows], domains_np[rows],
                              None if groups is None else [groups[i] for i in rows], usable)
        for k, value in ri.items():
            if value is not None:
                draws[k].append(value)
    out["mean"] = {k: float(np.mean(v)) if v else None for k, v in draws.items()}
    out["std"] = {k: float(np.std(v)) if v else None for k, v in draws.items()}
    return out
