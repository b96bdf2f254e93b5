"""The probe's view of the data: clean train/val/test splits, class and domain labels, fingerprints."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval_probes.config import ProbeConfig
from eval_probes.features import data_fingerprint
from roseprior.data import SPLITS, Sample, resolve_root
from roseprior.errors import DataError
from roseprior.splits import group_key, resolve_splits


@dataclass
class ProbeData:
    root: Path
    classes: list[str]
    positive: int  # index of data.positive_class
    splits: dict[str, list[Sample]]
    split_source: str  # how the splits were obtained, for the report
    split_fingerprint: str = ""  # the split's own fingerprint (``roseprior.splits``), as every stage records it
    domains: list[str] = field(default_factory=list)  # sorted; empty when the data has no domain labels
    fingerprints: dict[str, str] = field(default_factory=dict)  # per split, of the image bytes (feature cache)

    def labels(self, split: str) -> np.ndarray:
        return np.array([s.label for s in self.splits[split]], dtype=np.int64)

    def domain_of(self, split: str) -> np.ndarray:
        return np.array([s.domain or "" for s in self.splits[split]])

    def groups(self, split: str, group_by: str | None) -> list[str] | None:
        """Each sample's group (slide, field) for the robustness index, None when the data has none."""
        values = [group_key(s, group_by or "group") for s in self.splits[split]]
        return None if any(v in (None, "") for v in values) else [str(v) for v in values]


def load_probe_data(cfg: ProbeConfig) -> ProbeData:
    """The split every stage resolves for ``cfg.data`` (``resolve_splits``), unreadable images dropped."""
    data_cfg = cfg.data
    classes = list(data_cfg.classes)
    split = resolve_splits(data_cfg).readable(Path(cfg.out_dir), data_cfg.max_unreadable_fraction)
    for name in ("train", "test"):
        present = {s.label for s in split.splits[name]}
        if len(present) < len(classes):
            missing = [c for i, c in enumerate(classes) if i not in present]
            raise DataError(f"the {name} split ({split.source}) has no images of class {', '.join(missing)}; "
                            "the probes need every class in train and test")
    all_samples = [s for name in SPLITS for s in split.splits[name]]
    domains = sorted({s.domain for s in all_samples if s.domain})
    if domains and any(not s.domain for s in all_samples):
        domains = []  # partial domain labels: no domain analysis rather than a misleading one
    return ProbeData(
        root=resolve_root(data_cfg),
        classes=classes,
        positive=classes.index(data_cfg.positive_class),
        splits=split.splits,
        split_source=split.source,
        split_fingerprint=split.fingerprint,
        domains=domains,
        fingerprints={name: data_fingerprint(split.splits[name]) for name in SPLITS},
    )


def class_domain_association(labels: np.ndarray, domains: np.ndarray) -> float:
    """Cramér's V between class and domain in a split: 0 independent, 1 domain gives the class away."""
    classes, domain_values = np.unique(labels), np.unique(domains)
    if len(classes) < 2 or len(domain_values) < 2:
        return 0.0
    table = np.array([[np.sum((labels == c) & (domains == d)) for d in domain_values] for c in classes], float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(np.sum((table - expected) ** 2 / np.where(expected > 0, expected, 1)))
    return math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))


def typical_domain(labels: np.ndarray, domains: np.ndarray) -> dict[int, str]:
    """Each class's most frequent domain in a split: the domain a shortcut would tie to the class."""
    return {int(c): Counter(domains[labels == c]).most_common(1)[0][0] for c in np.unique(labels)}
