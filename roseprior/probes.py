"""The probe protocol every number about a frozen representation comes from: pretrain's kNN
monitor, ``eval_probes`` and the benchmarks all fit these probes the same way.

Two probes: kNN (faiss, cosine, temperature-weighted votes as DINO's ``eval_knn``) and a linear
probe (standardised features, class-balanced logistic regression). Both are fitted on training
features and pick their one hyperparameter (k, or the inverse regularisation C) on validation
features by balanced accuracy; the test split is never looked at while fitting, so every test
condition is scored by the same fitted probe.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss

from roseprior.config import check
from roseprior.knn import knn_search, knn_vote

__all__ = ["FittedProbes", "KnnProbe", "LinearProbe", "ProbeProtocol", "fit_knn", "fit_linear", "fit_probes"]


@dataclass
class ProbeProtocol:
    """The probes' settings (``eval_probes``' ``protocol:`` section; the monitor and benchmarks use the defaults)."""

    knn_k: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])  # k chosen on validation from these
    knn_temperature: float = 0.07
    linear_c: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])  # C chosen likewise
    linear_max_iter: int = 1000
    # kNN search is exact below this many training features, an IVF index (roseprior.knn) at or above it
    knn_approximate_above: int = 1_000_000

    def __post_init__(self) -> None:
        check(bool(self.knn_k) and min(self.knn_k) >= 1, "protocol.knn_k", "must be a non-empty list of k >= 1",
              self.knn_k)
        check(self.knn_temperature > 0, "protocol.knn_temperature", "must be > 0", self.knn_temperature)
        check(self.knn_approximate_above >= 1, "protocol.knn_approximate_above", "must be >= 1",
              self.knn_approximate_above)
        check(bool(self.linear_c) and min(self.linear_c) > 0, "protocol.linear_c", "must be a non-empty list of C > 0",
              self.linear_c)


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
    approximate_above: int | None = None  # roseprior.knn.knn_search's switch to an approximate index

    def predict_proba(self, feats: np.ndarray, vote: str = "weighted") -> np.ndarray:
        sims, idx = knn_search(self.train_feats, feats, self.k, approximate_above=self.approximate_above)
        return knn_vote(sims, self.train_labels[idx], self.num_classes, temperature=self.temperature, vote=vote)


def fit_knn(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    k_grid: list[int],
    temperature: float = 0.07,
    approximate_above: int | None = None,
) -> KnnProbe:
    """Choose k on validation (weighted vote); one search at the largest k serves the whole grid."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    grid = sorted({min(int(k), len(train_feats)) for k in k_grid})
    scores: dict[int, float] = {}
    if len(val_feats):
        sims, idx = knn_search(train_feats, val_feats, max(grid), approximate_above=approximate_above)
        neighbour_labels = train_labels[idx]
        for k in grid:
            probs = knn_vote(sims, neighbour_labels, num_classes, k=k, temperature=temperature)
            scores[k] = _balanced_accuracy(val_labels, probs)
    # Ties go to the larger k: smoother votes, better-calibrated probabilities.
    best = max(grid, key=lambda k: (scores.get(k, 0.0), k)) if scores else grid[-1]
    return KnnProbe(train_feats, train_labels, num_classes, best, temperature, scores, approximate_above)


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


@dataclass
class FittedProbes:
    """Both probes fitted on one backbone's training features; ``predict`` gives each probe's probabilities."""

    knn: KnnProbe
    linear: LinearProbe

    def predict(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "knn": self.knn.predict_proba(feats, vote="weighted"),
            "knn_majority": self.knn.predict_proba(feats, vote="majority"),
            "linear": self.linear.predict_proba(feats),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "knn": {"k": self.knn.k, "temperature": self.knn.temperature,
                    "val_balanced_accuracy": {str(k): v for k, v in self.knn.val_scores.items()}},
            "linear": {"C": self.linear.c,
                       "val_balanced_accuracy": {f"{c:g}": v for c, v in self.linear.val_scores.items()}},
        }


def fit_probes(protocol: ProbeProtocol, train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray,
               num_classes: int, seed: int = 0) -> FittedProbes:
    """Both probes, each tuned on the validation features."""
    return FittedProbes(fit_knn(train, y_train, val, y_val, num_classes, protocol.knn_k, protocol.knn_temperature,
                                protocol.knn_approximate_above),
                        fit_linear(train, y_train, val, y_val, protocol.linear_c, protocol.linear_max_iter, seed))
