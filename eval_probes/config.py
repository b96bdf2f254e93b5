"""The probe protocol as one typed config: every checkpoint compared runs under exactly these settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from roseprior.adequacy import AdequacyThresholds
from roseprior.config import StageConfig, check
from roseprior.probes import ProbeProtocol


@dataclass
class StainConditions:
    """Colour shifts of the test images (the slide-to-slide and session-to-session variation)."""

    hed_strengths: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])  # 0 is the clean run
    restain: bool = True  # re-staining of every test image to each domain's target (Macenko: one map per site)
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
    # Input normalisation for every checkpoint; null follows each checkpoint's own
    # (``backbones.input_stats``: what its backbone.json says it was trained with, else the architecture's).
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
    # Test images scored apart by whether roseprior.adequacy finds them assessable (focus, cells, blood, stain), with
    # the thresholds finetune.predict uses: is a probe right where a pathologist would not judge?
    adequacy_split: bool = True
    adequacy: AdequacyThresholds = field(default_factory=AdequacyThresholds)

    # The kNN and linear probes (k and C chosen on validation): the protocol every stage scores with.
    protocol: ProbeProtocol = field(default_factory=ProbeProtocol)
    # Robustness index (needs domain labels).
    robustness_k: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    robustness_repeats: int = 10  # class x domain-balanced subsamples the index is averaged over
    robustness_reference: bool = True  # also the index of a random-init backbone of each checkpoint's architecture

    # Outputs.
    umap: bool = True  # umap-learn compiles with numba on first use (~40 s): switch off for fast runs
    tensorboard: bool = True
    projector: bool = True  # TensorBoard embedding projector of the clean test features

    def __post_init__(self) -> None:
        check(bool(self.checkpoints), "checkpoints", "must list at least one checkpoint (a folder, msht_tiny, "
              "timm:<name>)", self.checkpoints)
        check(len(self.data.classes) == 2 and self.data.positive_class in self.data.classes, "data.classes",
              "must be two classes including data.positive_class (the probes report binary metrics)",
              self.data.classes)
        check(self.names is None or (len(self.names) == len(self.checkpoints) and len(set(self.names)) == len(
            self.names)), "names", f"must give one distinct name per checkpoint ({len(self.checkpoints)})", self.names)
        stats_ok = (self.mean is None and self.std is None) or (
            self.mean is not None and self.std is not None and len(self.mean) == len(self.std) == 3 and min(self.std) > 0)
        check(stats_ok, "mean", "and std must both be three numbers (std > 0), or both null to use each "
              "checkpoint's own normalisation", (self.mean, self.std))
        check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
