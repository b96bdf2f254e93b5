"""Calibrated probabilities and a chosen operating point, both fitted on validation only.

Temperature scaling (Guo et al. 2017, https://arxiv.org/abs/1706.04599) divides the logits by one
scalar T fitted by likelihood (against Platt's targets) on the validation split: the ranking (AUROC) and the argmax are
unchanged, the confidence becomes honest. ROSE then wants a call at a chosen sensitivity rather
than at 0.5: the operating point is the most specific threshold on the calibrated P-probability that
still reaches ``target_sensitivity`` on validation, placed midway between the positive it must keep and the
negative below it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["apply_temperature", "fit_temperature", "operating_point"]


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Class probabilities ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: Any, labels: Any) -> float:
    """The T > 0 that minimises the cross-entropy against Platt's targets (1-D bounded search on log T).

    Platt (1999) fits against (n + 1) / (n + 2) for the true class, n its count on the split, not 1: on a
    validation split the model separates, the plain likelihood keeps rising as T falls, and the fit ended at
    its bound (T 0.05 on a held-out synthetic run): probabilities of exactly 1, and an operating point of
    p >= 1.0 that calls a new slide's P fields N unless they saturate too. With the targets, confidence
    stops where the split's size can vouch for it.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return 1.0  # nothing to fit against: leave the model's own confidence
    counts = np.bincount(y, minlength=z.shape[1])[y]
    true_target = (counts + 1.0) / (counts + 2.0)
    targets = np.repeat(((1.0 - true_target) / (z.shape[1] - 1))[:, None], z.shape[1], axis=1)
    targets[np.arange(len(y)), y] = true_target

    def nll(log_t: float) -> float:
        p = apply_temperature(z, math.exp(log_t))
        return float(-(targets * np.log(np.clip(p, 1e-300, None))).sum(1).mean())

    best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def operating_point(y_true: Any, p_pos: Any, target_sensitivity: float) -> dict[str, float]:
    """The most specific threshold on ``p_pos`` whose sensitivity (``p >= threshold`` calls P) reaches the
    target on these labels, with the sensitivity and specificity it gives there.

    Every threshold between the lowest positive that must be kept and the highest negative below it is as
    specific; this takes the midpoint of the two in log-odds, not the positive's own score. On that score the
    field's own call flipped with float rounding when predict scored it apart from validation, and a new
    slide's positives, which score lower than the training site's, met no margin at all.
    """
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        threshold = 0.5
    else:
        needed = max(1, math.ceil(target_sensitivity * positives.size - 1e-9))
        kept = float(positives[needed - 1])
        below = p[(y == 0) & (p < kept)]
        threshold = kept if below.size == 0 else _midpoint_in_log_odds(float(below.max()), kept)
    called = p >= threshold
    sens = float(called[y == 1].mean()) if (y == 1).any() else 0.0
    spec = float((~called[y == 0]).mean()) if (y == 0).any() else 0.0
    return {"threshold": threshold, "target_sensitivity": target_sensitivity, "sensitivity": sens, "specificity": spec}


def _midpoint_in_log_odds(low: float, high: float) -> float:
    """The probability halfway between ``low`` and ``high`` in log-odds (strictly between them)."""
    log_odds = [math.log(v / (1.0 - v)) for v in np.clip([low, high], 1e-12, 1.0 - 1e-12)]
    middle = 1.0 / (1.0 + math.exp(-(log_odds[0] + log_odds[1]) / 2))
    return middle if low < middle <= high else (low + high) / 2
