"""The probe's view of the data: clean train/val/test splits, class and domain labels, fingerprints."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval_probes.config import ProbeConfig
from eval_probes.features import data_fingerprint
from roseprior.data import SPLITS, Sample, filter_readable, load_labelled, resolve_root
from roseprior.errors import ConfigError, DataError
from roseprior.splits import group_key, split_samples


@dataclass
class ProbeData:
    root: Path
    classes: list[str]
    positive: int  # index of data.positive_class
    splits: dict[str, list[Sample]]
    split_source: str  # how the splits were obtained, for the report
    domains: list[str] = field(default_factory=list)  # sorted; empty when the data has no domain labels
    fingerprints: dict[str, str] = field(default_factory=dict)  # per split

    def labels(self, split: str) -> np.ndarray:
        return np.array([s.label for s in self.splits[split]], dtype=np.int64)

    def domain_of(self, split: str) -> np.ndarray:
        return np.array([s.domain or "" for s in self.splits[split]])

    def groups(self, split: str, group_by: str | None) -> list[str] | None:
        """Each sample's group (slide, field) for the robustness index, None when the data has none."""
        values = [group_key(s, group_by or "group") for s in self.splits[split]]
        return None if any(v in (None, "") for v in values) else [str(v) for v in values]


def _manifest_splits(samples: list[Sample]) -> dict[str, list[Sample]] | None:
    values = {s.extra.get("split", "") for s in samples}
    if values and values <= set(SPLITS) and {"train", "test"} <= values:
        return {name: [s for s in samples if s.extra.get("split") == name] for name in SPLITS}
    return None


def _load_domain_folders(root: Path, classes: list[str]) -> list[Sample] | None:
    """``root/<domain>/<class>/...`` (one folder per site or scanner): samples labelled with their folder's domain."""
    if not root.is_dir() or (root / "manifest.csv").is_file() or any((root / c).is_dir() for c in classes):
        return None
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in SPLITS)
    if len(folders) < 2 or not all(all((d / c).is_dir() for c in classes) for d in folders):
        return None
    samples = []
    for folder in folders:
        for sample in load_labelled(folder, classes):
            sample.domain = folder.name
            samples.append(sample)
    return samples


def load_probe_data(cfg: ProbeConfig) -> ProbeData:
    data_cfg = cfg.data
    classes = list(data_cfg.classes)
    if len(classes) != 2:
        raise ConfigError(f"data.classes: the probes report binary metrics and need exactly two classes, got {classes}")
    if data_cfg.positive_class not in classes:
        raise ConfigError(f"data.positive_class {data_cfg.positive_class!r} is not one of data.classes {classes}")
    root = resolve_root(data_cfg)
    if data_cfg.split_dir:
        splits = {s: load_labelled(root, classes, split=s, split_dir=data_cfg.split_dir) for s in SPLITS}
        source = f"split files in {data_cfg.split_dir}"
    elif root.is_dir() and (root / "train").is_dir() and (root / "test").is_dir():
        splits = {s: load_labelled(root, classes, split=s) if (root / s).is_dir() else [] for s in SPLITS}
        source = f"split folders under {root}"
    else:
        samples = _load_domain_folders(root, classes)
        if samples is None:
            samples = load_labelled(root, classes)
        splits = _manifest_splits(samples)
        source = "the manifest's split column"
        if splits is None:
            splits = split_samples(samples, data_cfg.split_ratios, group_by=data_cfg.group_by, seed=cfg.seed)
            source = f"split_samples({data_cfg.split_ratios}, group_by={data_cfg.group_by}, seed={cfg.seed})"
    if not splits["val"]:
        # No validation split: hold out a fifth of train (grouped like the main split) for choosing k and C.
        inner = split_samples(splits["train"], "4:1:0", group_by=data_cfg.group_by, seed=cfg.seed)
        splits["train"], splits["val"] = inner["train"], inner["val"]
        source += "; val carved from train (4:1)"
    # One decoding pass over every split: unreadable files are listed in out_dir/skipped_files.csv.
    readable = {s.path for s in filter_readable([s for name in SPLITS for s in splits[name]], Path(cfg.out_dir),
                                                data_cfg.max_unreadable_fraction)}
    splits = {name: [s for s in splits[name] if s.path in readable] for name in SPLITS}
    for name in ("train", "test"):
        present = {s.label for s in splits[name]}
        if len(present) < len(classes):
            missing = [c for i, c in enumerate(classes) if i not in present]
            raise DataError(f"the {name} split of {root} has no images of class {', '.join(missing)}; "
                            "the probes need every class in train and test")
    all_samples = [s for name in SPLITS for s in splits[name]]
    domains = sorted({s.domain for s in all_samples if s.domain})
    if domains and any(not s.domain for s in all_samples):
        domains = []  # partial domain labels: no domain analysis rather than a misleading one
    return ProbeData(
        root=root,
        classes=classes,
        positive=classes.index(data_cfg.positive_class),
        splits=splits,
        split_source=source,
        domains=domains,
        fingerprints={name: data_fingerprint(splits[name]) for name in SPLITS},
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
