"""The probe protocol as one typed config: every checkpoint compared runs under exactly these settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from roseprior.config import StageConfig


@dataclass
class StainConditions:
    """Colour shifts of the test images (the slide-to-slide and session-to-session variation)."""

    hed_strengths: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])  # 0 is the clean run
    restain: bool = True  # Macenko re-staining of every test image to each domain's target
    restain_method: Literal["macenko", "reinhard"] = "macenko"
    white_balance: list[list[float]] = field(default_factory=lambda: [[1.1, 1.0, 0.9], [0.9, 1.0, 1.1]])
    brightness: list[float] = field(default_factory=lambda: [-0.1, 0.1])


@dataclass
class ProbeConfig(StageConfig):
    """``python -m eval_probes``: kNN and linear probes of frozen features under shift."""

    out_dir: str = "runs/probes"
    # Checkpoints compared side by side: a folder written by pretrain/finetune, a registry name
    # (random init), ``timm:<name>`` (random init; weights are never downloaded) or a state-dict file.
    checkpoints: list[str] = field(default_factory=lambda: ["msht_tiny", "timm:resnet18"])
    names: list[str] | None = None  # display names, one per checkpoint (default: derived from the spec)
    # Input normalisation for every checkpoint; null follows each checkpoint's own (its backbone.json
    # provenance, else the model's default_cfg, else ImageNet's).
    mean: list[float] | None = None
    std: list[float] | None = None
    batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: str | None = None  # feature cache; null means <out_dir>/../feature_cache
    progress: bool = True

    # Conditions (clean always runs).
    stain: StainConditions = field(default_factory=StainConditions)
    zooms: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.5, 2.0])  # 1.0 is the clean run
    domain_transfer: bool = True  # train on one domain, test on each other (when domains exist)
    shortcut_split: bool = True  # test images whose domain is typical vs atypical for their class

    # kNN probe.
    knn_k: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    knn_temperature: float = 0.07
    # Linear probe: logistic regression, C chosen on validation from this log grid.
    linear_c: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    linear_max_iter: int = 1000
    # Robustness index (needs domain labels).
    robustness_k: list[int] = field(default_factory=lambda: [5, 10, 20, 50])

    # Outputs.
    umap: bool = True  # umap-learn compiles with numba on first use (~40 s): switch off for fast runs
    tensorboard: bool = True
    projector: bool = True  # TensorBoard embedding projector of the clean test features
