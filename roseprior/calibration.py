"""Calibrated probabilities and a chosen operating point, both fitted on validation only.

Temperature scaling (Guo et al. 2017, https://arxiv.org/abs/1706.04599) divides the logits by one
scalar T fitted by likelihood on the validation split: the ranking (AUROC) and the argmax are
unchanged, the confidence becomes honest. ROSE then wants a call at a chosen sensitivity rather
than at 0.5: the operating point is the highest threshold on the calibrated P-probability that
still reaches ``target_sensitivity`` on validation (the most specific such rule).
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
    """The T > 0 that minimises the negative log-likelihood of ``labels`` (1-D bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return 1.0  # nothing to fit against: leave the model's own confidence

    def nll(log_t: float) -> float:
        p = apply_temperature(z, math.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def operating_point(y_true: Any, p_pos: Any, target_sensitivity: float) -> dict[str, float]:
    """The highest threshold on ``p_pos`` whose sensitivity (``p >= threshold`` calls P) reaches the
    target on these labels, with the sensitivity and specificity it gives there."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        threshold = 0.5
    else:
        needed = max(1, math.ceil(target_sensitivity * positives.size - 1e-9))
        threshold = float(positives[needed - 1])
    called = p >= threshold
    sens = float(called[y == 1].mean()) if (y == 1).any() else 0.0
    spec = float((~called[y == 0]).mean()) if (y == 0).any() else 0.0
    return {"threshold": threshold, "target_sensitivity": target_sensitivity, "sensitivity": sens, "specificity": spec}
