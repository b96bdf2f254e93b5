"""Binary N/P classification metrics shared by finetune and the probes (P, label 1, is positive).

Clinical readers want sensitivity, specificity, PPV and NPV next to accuracy and AUROC, and a
calibration figure (ECE, reliability bins) because a ROSE model's confidence is read by a
person. Ratios with an empty denominator are 0.0 rather than NaN or a warning, so reports and
JSON files stay plain numbers even on a tiny or one-class validation split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["binary_metrics", "bootstrap_intervals", "expected_calibration_error", "format_with_intervals",
           "paired_difference", "reliability_bins", "small_class_warnings", "with_intervals"]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _as_labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true).reshape(-1)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold 0 (N) and 1 (P) only, got values {np.unique(y)[:10].tolist()}")
    return y.astype(np.int64)


def binary_metrics(y_true: Any, p_pos: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics for P-probabilities ``p_pos``; a score ``>= threshold`` predicts P.

    Keys: accuracy, specificity, sensitivity, ppv, npv, f1, balanced_accuracy, auroc (None when
    ``y_true`` holds one class only), ece (15 bins), confusion_matrix ``[[TN, FP], [FN, TP]]``, n.
    """
    from sklearn.metrics import roc_auc_score

    y = _as_labels(y_true)
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"y_true has {y.size} values but p_pos has {p.size}")
    pred = (p >= threshold).astype(np.int64)
    # A bincount rather than sklearn's confusion_matrix, which refuses an empty split.
    (tn, fp), (fn, tp) = np.bincount(2 * y + pred, minlength=4).reshape(2, 2).tolist()
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    # sklearn's precision/recall/f1 would warn on empty denominators; the counts give them exactly.
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "specificity": specificity,
        "sensitivity": sensitivity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "auroc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
        "ece": expected_calibration_error(y, p),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "n": int(y.size),
    }


def _confidence_and_correct(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of the predicted class and whether it was right.

    ``probs`` is either P-probabilities, shape (n,), or class probabilities, shape (n, K).
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape[0] != y.size:
        raise ValueError(f"probs must have shape (n,) or (n, K) with n = {y.size}, got {probs.shape}")
    predicted = probs.argmax(axis=1)
    return probs.max(axis=1), (predicted == y)


def reliability_bins(y_true: Any, probs: Any, n_bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins for a reliability diagram.

    Bin ``b`` holds confidences in ``(lo, hi]`` (the first also holds 0). Each entry has lo, hi,
    confidence (mean), accuracy and count; an empty bin has count 0 and confidence = accuracy = 0.0.
    """
    confidence, correct = _confidence_and_correct(y_true, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.digitize(confidence, edges[1:-1], right=True)
    bins = []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "confidence": float(confidence[mask].mean()) if count else 0.0,
                "accuracy": float(correct[mask].mean()) if count else 0.0,
                "count": count,
            }
        )
    return bins


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    bins = reliability_bins(y_true, probs, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / n)


# ====== uncertainty ======

SMALL_CLASS = 30  # fewer images of a class than this in a split: its numbers are flagged as unstable
CI_METRICS = ("balanced_accuracy", "auroc", "sensitivity", "specificity")


def bootstrap_intervals(y_true: Any, p_pos: Any, groups: Any = None, threshold: float = 0.5,
                        n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Seeded percentile-bootstrap intervals ``[low, high]`` of balanced accuracy, AUROC, sensitivity
    and specificity; whole groups (slides, fields) are resampled when ``groups`` is given, since
    images of one group are not independent.

    Written by hand because no library the platform uses resamples groups: a resample is a vector of
    counts per group (multinomial), so every metric is a weighted sum over the fixed sample, and all
    ``n_resamples`` resamples run as array operations (AUROC through one sort of the scores and
    cumulative weights). None for a metric a resample cannot define (a class with no images).
    """
    y = _as_labels(y_true)
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    if y.size == 0:
        return {k: None for k in CI_METRICS}
    w = _resample_weights(y.size, groups, n_resamples, seed)
    pos, pred = (y == 1), (p >= threshold)
    sens, spec = _sensitivity_specificity(pos, pred, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = weighted_auroc(y, p, w)
    values = {"balanced_accuracy": (sens + spec) / 2, "auroc": auroc, "sensitivity": sens, "specificity": spec}
    return {key: _percentiles(samples, level) for key, samples in values.items()}


def paired_difference(y_true: Any, calls: Any, reference_calls: Any, groups: Any = None, n_resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Balanced accuracy of ``calls`` minus that of ``reference_calls`` (1 = called positive), both on the same
    labelled images (a shifted copy of a test split against the clean one), with its percentile-bootstrap
    interval: each resample reads both, so what the two share cancels, and the interval of a drop is narrower
    than the two intervals side by side suggest. Whole ``groups`` are resampled, as ``bootstrap_intervals`` does
    (and with the same seed, the same resamples)."""
    y = _as_labels(y_true)
    if y.size == 0:
        return {"difference": None, "ci95": None}
    pos = y == 1
    calls, reference_calls = (np.asarray(c).reshape(-1).astype(bool) for c in (calls, reference_calls))
    w = _resample_weights(y.size, groups, n_resamples, seed)
    ones = np.ones((1, y.size))
    point, resampled = ((np.mean(_sensitivity_specificity(pos, calls, weights), axis=0)
                         - np.mean(_sensitivity_specificity(pos, reference_calls, weights), axis=0))
                        for weights in (ones, w))
    return {"difference": float(point[0]), "ci95": _percentiles(resampled, level)}


def _resample_weights(n: int, groups: Any, n_resamples: int, seed: int) -> np.ndarray:
    """(R, n): how often each of ``n`` images is in each of ``n_resamples`` resamples of whole ``groups``."""
    _, group_index = np.unique(np.asarray(groups if groups is not None else np.arange(n)).astype(str),
                               return_inverse=True)
    n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)
    return counts[:, group_index].astype(np.float64)


def _sensitivity_specificity(pos: np.ndarray, pred: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each resample's sensitivity and specificity (NaN where it holds no image of a class)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * (pos & pred)).sum(1) / (w * pos).sum(1), (w * (~pos & ~pred)).sum(1) / (w * ~pos).sum(1)


def _percentiles(samples: np.ndarray, level: float) -> list[float] | None:
    tail = 100 * (1 - level) / 2
    finite = samples[np.isfinite(samples)]
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))] if finite.size else None


def weighted_auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of each row of weights ``w`` (R, n) over the fixed labels and scores: the probability that
    a positive outscores a negative, ties counting half, from one sort and cumulative negative weights."""
    pos = y == 1
    order = np.argsort(p, kind="stable")
    p_sorted, neg_sorted = p[order], w[:, order] * ~pos[order]
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg_sorted, axis=1)], axis=1)
    starts = np.searchsorted(p_sorted, p_sorted, side="left")  # each tie block's first and past-last index
    ends = np.searchsorted(p_sorted, p_sorted, side="right")
    below, tied = cum[:, starts], cum[:, ends] - cum[:, starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((w[:, order] * pos[order]) * (below + 0.5 * tied)).sum(1) / ((w * pos).sum(1) * (w * ~pos).sum(1))


def small_class_warnings(where: str, y_true: Any, classes: list[str], minimum: int = SMALL_CLASS) -> list[str]:
    """One line per class with fewer than ``minimum`` images in ``where`` ("the test split", "the labelled
    set"): its numbers move a lot from one image to the next."""
    y = np.asarray(y_true).reshape(-1)
    return [f"{where} has {int((y == i).sum())} images of class {name} (fewer than {minimum}): "
            "its numbers are unstable; read them with their intervals" for i, name in enumerate(classes)
            if (y == i).sum() < minimum]


def with_intervals(metrics: dict[str, Any], labels: Any, p_pos: Any, classes: list[str], positive: int, where: str,
                   groups: Any = None, threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """``metrics`` of a labelled set plus what reading them needs: ``ci95`` (``bootstrap_intervals``, whole
    ``groups`` resampled) and ``warnings`` (``small_class_warnings`` for ``where``). One rule for finetune's
    splits, their sites and predict's labelled fields."""
    labels = np.asarray(labels).reshape(-1)
    return {**metrics, "ci95": bootstrap_intervals(labels == positive, p_pos, groups, threshold, seed=seed),
            "warnings": small_class_warnings(where, labels, classes)}


def format_with_intervals(metrics: dict[str, Any], keys: tuple[str, ...] = CI_METRICS) -> str:
    """``balanced accuracy 0.812 [0.754, 0.866], ...``: the ``keys`` that ``metrics`` has, each with its 95%
    interval when it has one; what finetune and predict print."""
    ci = metrics.get("ci95") or {}

    def cell(key: str) -> str:
        value, name = metrics[key], key.replace("_", " ")
        if value is None:
            return f"{name} n/a"
        return f"{name} {value:.3f}" + (f" [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if ci.get(key) else "")

    return ", ".join(cell(key) for key in keys if key in metrics)
