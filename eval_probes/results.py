"""Typed probe results: what ``report.json`` holds per checkpoint and condition, serialised once.

The report page, TensorBoard and the demo's summary read these fields (family, shift, domains),
never a condition's name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["METRICS", "PROBES", "ConditionResult", "ProbeScore"]

METRICS = ("balanced_accuracy", "auroc", "f1", "ece")
PROBES = ("knn", "knn_majority", "linear")


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class ProbeScore:
    """One probe's scores on one condition; ``drop`` is reference minus this (positive = worse, except ECE);
    ``ci95``: percentile-bootstrap intervals (whole groups resampled when the data has groups)."""

    balanced_accuracy: float | None
    auroc: float | None
    f1: float | None
    ece: float | None
    n: int
    sensitivity: float | None = None
    specificity: float | None = None
    ci95: dict[str, list[float] | None] | None = None
    drop: dict[str, float | None] | None = None

    @classmethod
    def of(cls, y: np.ndarray, probs: np.ndarray, positive: int, groups: Any = None, seed: int = 0) -> ProbeScore:
        from roseprior.metrics import binary_metrics, bootstrap_intervals

        hit = (np.asarray(y) == positive).astype(int)
        metrics = binary_metrics(hit, probs[:, positive])
        return cls(*(_finite(metrics.get(k)) for k in METRICS), n=len(y), sensitivity=metrics["sensitivity"],
                   specificity=metrics["specificity"],
                   ci95=bootstrap_intervals(hit, probs[:, positive], groups, seed=seed) if len(y) else None)

    def against(self, reference: ProbeScore) -> ProbeScore:
        """This score with its drop from ``reference`` filled in."""
        drop = {k: None if getattr(reference, k) is None or getattr(self, k) is None
                else getattr(reference, k) - getattr(self, k) for k in METRICS}
        return replace(self, drop=drop)


@dataclass
class ConditionResult:
    """Every probe on one test condition of one checkpoint.

    ``family``: clean | stain | scale | domain. ``shift``: whether the images differ from the
    training images' (a domain a->a or the 'typical' subset is not a shift). ``source_domain`` /
    ``target_domain``: the probe's training domain and the test domain (domain transfer), or the
    stain target (re-staining). ``subset``: typical | atypical (the shortcut split).
    """

    name: str
    family: str
    shift: bool
    scores: dict[str, ProbeScore] = field(default_factory=dict)
    value: float | None = None
    source_domain: str | None = None
    target_domain: str | None = None
    subset: str | None = None
    skipped: str | None = None  # why there are no scores
    notes: dict[str, Any] = field(default_factory=dict)

    def balanced_accuracy(self, probe: str) -> float | None:
        score = self.scores.get(probe)
        return score.balanced_accuracy if score is not None else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
