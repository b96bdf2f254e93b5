"""The two probes of a frozen representation: kNN (faiss) and a logistic-regression linear probe.

Both are fitted on clean training features and pick their one hyperparameter (k, or the inverse
regularisation C) on clean validation features by balanced accuracy; the test split is never
looked at while fitting, so every condition is scored by the same fitted probe.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss

from roseprior.knn import knn_search, knn_vote


def _balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    with warnings.catch_warnings():  # a val split missing a class is scored, not warned about per k
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y, probs.argmax(axis=1)))


@dataclass
class KnnProbe:
    """Train features plus the k chosen on validation; ``predict_proba`` votes with weighted or majority."""

    train_feats: np.ndarray
    train_labels: np.ndarray
    num_classes: int
    k: int
    temperature: float = 0.07
    val_scores: dict[int, float] = field(default_factory=dict)  # balanced accuracy per k on validation

    def predict_proba(self, feats: np.ndarray, vote: str = "weighted") -> np.ndarray:
        sims, idx = knn_search(self.train_feats, feats, self.k)
        return knn_vote(sims, self.train_labels[idx], self.num_classes, temperature=self.temperature, vote=vote)


def fit_knn(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    k_grid: list[int],
    temperature: float = 0.07,
) -> KnnProbe:
    """Choose k on validation (weighted vote); one search at the largest k serves the whole grid."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    grid = sorted({min(int(k), len(train_feats)) for k in k_grid})
    scores: dict[int, float] = {}
    if len(val_feats):
        sims, idx = knn_search(train_feats, val_feats, max(grid))
        neighbour_labels = train_labels[idx]
        for k in grid:
            probs = knn_vote(sims, neighbour_labels, num_classes, k=k, temperature=temperature)
            scores[k] = _balanced_accuracy(val_labels, probs)
    # Ties go to the larger k: smoother votes, better-calibrated probabilities.
    best = max(grid, key=lambda k: (scores.get(k, 0.0), k)) if scores else grid[-1]
    return KnnProbe(train_feats, train_labels, num_classes, best, temperature, scores)


@dataclass
class LinearProbe:
    """Standardisation plus class-balanced L-BFGS logistic regression at the C chosen on validation."""

    model: Any  # sklearn Pipeline(StandardScaler, LogisticRegression)
    c: float
    val_scores: dict[float, float] = field(default_factory=dict)

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(feats).astype(np.float32)


def make_linear(c: float, max_iter: int = 1000, seed: int = 0) -> Any:
    """The linear probe's estimator; standardising first keeps one C grid meaningful across backbones
    whose feature scales differ by orders of magnitude (and lets L-BFGS converge)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, solver="lbfgs", class_weight="balanced", max_iter=max_iter, random_state=seed),
    )


def fit_linear(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    c_grid: list[float],
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbe:
    """Fit one probe per C on train; keep the best on validation (balanced accuracy, then log loss)."""
    from sklearn.exceptions import ConvergenceWarning

    best: tuple[tuple[float, float], float, Any] | None = None
    scores: dict[float, float] = {}
    labels = np.unique(train_labels)
    for c in c_grid:
        model = make_linear(c, max_iter, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a weakly regularised C may not converge
            model.fit(train_feats, train_labels)
        if len(val_feats):
            probs = model.predict_proba(val_feats)
            scores[c] = _balanced_accuracy(val_labels, probs)  # columns are classes 0..C-1 (all in train)
            rank = (scores[c], -float(log_loss(val_labels, probs, labels=labels)))
        else:
            rank = (0.0, 0.0)
        if best is None or rank > best[0]:
            best = (rank, c, model)
    assert best is not None, "c_grid is empty"
    return LinearProbe(best[2], best[1], scores)
