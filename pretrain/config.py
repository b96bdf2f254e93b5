"""The pretrain config: one dataclass per section; the YAML files in configs/pretrain mirror it.

Defaults live here only. ``python -m pretrain --config X.yaml key=value`` loads it with
``roseprior.config.load_config``, which refuses unknown keys and names the valid ones; building the
dataclasses runs the checks below, so a config made in Python is validated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from roseprior.config import CheckpointConfig, StageConfig, TrainConfig, check
from roseprior.errors import ConfigError

__all__ = [
    "BYOLConfig",
    "DINOConfig",
    "MethodConfig",
    "MoCoV2Config",
    "ModelConfig",
    "MonitorConfig",
    "PretrainConfig",
    "PretrainTrainConfig",
    "SimCLRConfig",
    "ViewsConfig",
]


@dataclass
class ModelConfig:
    """The backbone (any ``backbones.create`` name) and what gets exported."""

    name: str = "msht_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {norm: gn}
    init: str | None = None  # start from these weights (a backbone folder, or PATH@ARCH); null: random init
    sync_batchnorm: bool = True  # SyncBatchNorm under multi-GPU DDP (PyTorch's works on GPU only)
    export: Literal["auto", "teacher", "student"] = "auto"  # auto: the teacher when the method has one


@dataclass
class DINOConfig:
    """DINO (Caron et al. 2021); defaults as the reference repo's ViT-S recipe, scaled for small data."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    batch_norm: bool = False  # BatchNorm in the head (off in DINO's ViT recipe)
    norm_last_layer: bool = True
    freeze_last_layer_epochs: int = 1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class SimCLRConfig:
    hidden_dim: int = 2048
    out_dim: int = 128
    batch_norm: bool = True  # off for the CPU distributed test: CPU BatchNorm is per process
    temperature: float = 0.1
    # With local views, the share of the loss that their pairs carry (the rest is the two global views'
    # pair). Not the plain mean over pairs: that gives 2 locals 4 of 5 pairs and starves the global pair,
    # the one that teaches views of one image at two magnifications to agree at the probes' input size.
    local_weight: float = 0.5

    def __post_init__(self) -> None:
        check(0.0 <= self.local_weight < 1.0, "method.simclr.local_weight", "must be in [0, 1)", self.local_weight)


@dataclass
class BYOLConfig:
    hidden_dim: int = 4096
    out_dim: int = 256


@dataclass
class MoCoV2Config:
    hidden_dim: int = 2048
    out_dim: int = 128
    temperature: float = 0.2
    memory_bank_size: int = 4096


@dataclass
class MethodConfig:
    """Which SSL method, the momentum-teacher schedule they share, and each method's own knobs."""

    name: Literal["dino", "byol", "simclr", "mocov2"] = "dino"
    momentum_start: float = 0.996  # teacher EMA momentum, cosine to momentum_end
    momentum_end: float = 1.0
    dino: DINOConfig = field(default_factory=DINOConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    mocov2: MoCoV2Config = field(default_factory=MoCoV2Config)


@dataclass
class ViewsConfig:
    """Multi-crop, multi-magnification views, cut from each decoded image in one batched call.

    ``scale_mode: magnification``: a crop of output size S at magnification m (drawn log-uniformly
    from ``magnification``, relative to the source pixels) covers S / m source pixels, so the
    physical scale varies continuously, as it does between the users' microscopes.
    ``scale_mode: area``: RandomResizedCrop's rule (a fraction of the image area).
    ``local_magnification``: the local views' own range, e.g. higher than the globals' (nuclear detail
    beside the arrangement); null: the same as ``magnification``.
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 6
    scale_mode: Literal["magnification", "area"] = "magnification"
    magnification: list[float] = field(default_factory=lambda: [0.5, 2.0])
    local_magnification: list[float] | None = None
    # Where local views are cut: uniform (anywhere in the image) or nuclei (centred on a point drawn in proportion
    # to how dark each part of the image is: nuclei are the darkest objects in every cytology stain, so the locals
    # show nuclear detail rather than glass or cytoplasm, which hold no diagnosis).
    local_focus: Literal["uniform", "nuclei"] = "uniform"
    global_area: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_area: list[float] = field(default_factory=lambda: [0.05, 0.4])
    aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip_rot90: bool = True  # exact dihedral symmetries: cytology has no up or left
    color_prob: float = 0.8  # probability that a view gets the stain/acquisition jitter
    hed_strength: float = 0.05  # Tellez et al.'s HED-light; 0.2 is HED-strong
    white_balance: float = 0.1
    brightness: float = 0.1
    # Probability that a view is rendered in the stain strength of another training image, of another
    # domain when the data has domains (``views.StainBank``): the pretext task cannot match views by stain.
    stain_swap: float = 0.0
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, locals
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # pixels of the output crop
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    source_max_side: int | None = None  # downscale larger images at decode time (speed), null: keep
    device: Literal["auto", "device", "loader"] = "auto"  # where views are cut: auto = the GPU if any, else the loader
    cpu_threads: int | None = 1  # torch threads while cutting views on the CPU (null: leave as is)

    def __post_init__(self) -> None:
        check(self.n_global >= 1, "views.n_global", "must be >= 1", self.n_global)
        check(self.n_local >= 0, "views.n_local", "must be >= 0", self.n_local)
        check(self.n_global + self.n_local >= 2, "views.n_global", "plus views.n_local must be >= 2 (two views per "
              "image)", self.n_global)
        for key in ("global_size", "local_size"):
            check(getattr(self, key) >= 8, f"views.{key}", "must be at least 8 pixels", getattr(self, key))
        _range(self.magnification, "views.magnification")
        if self.local_magnification is not None:
            _range(self.local_magnification, "views.local_magnification")
        _range(self.global_area, "views.global_area", high=1.0)
        _range(self.local_area, "views.local_area", high=1.0)
        _range(self.aspect_ratio, "views.aspect_ratio")
        check(len(self.blur_sigma) == 2 and 0 <= self.blur_sigma[0] <= self.blur_sigma[1], "views.blur_sigma",
              "must be [low, high] with 0 <= low <= high", self.blur_sigma)
        check(len(self.blur_prob) == 3 and all(0 <= p <= 1 for p in self.blur_prob), "views.blur_prob",
              "must be 3 probabilities (global 1, global 2, locals)", self.blur_prob)
        for key in ("hed_strength", "white_balance", "brightness", "color_prob", "stain_swap"):
            check(0.0 <= getattr(self, key) <= 1.0, f"views.{key}", "must be in [0, 1]", getattr(self, key))
        check(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "views.mean",
              "and views.std must be 3 numbers each, std > 0", (self.mean, self.std))


@dataclass
class PretrainTrainConfig(TrainConfig):
    """Optimisation; ``lr`` is per 256 images of global batch (DINO's linear scaling rule)."""

    epochs: int = 100
    batch_size: int = 64  # per process
    lr: float = 5e-4
    lr_reference_batch: int = 256  # lr * global_batch / this; 0 disables the scaling
    min_lr_ratio: float = 0.002  # DINO: 5e-4 -> 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # cosine from weight_decay to this, as DINO
    clip_grad: float | None = 3.0
    batch_by_domain: bool = False  # every global batch from one domain (Sample.domain): negatives share the site
    # Data that names no site (no domain column, no site folders): cluster the images into this many
    # pseudo-domains by colour (roseprior.data.with_pseudo_domains) for batch_by_domain and stain swaps; 0: off.
    pseudo_domains: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.pseudo_domains == 0 or self.pseudo_domains >= 2, "train.pseudo_domains", "must be 0 (off) or >= 2",
              self.pseudo_domains)


@dataclass
class MonitorConfig:
    tensorboard: bool = True
    progress: bool = True
    # A labelled set (ImageFolder or manifest): every knn_every_epochs, the exported backbone is
    # scored on it with the probes' kNN protocol (k chosen on its val split, scored on its test split).
    knn_root: str | None = None
    knn_every_epochs: int = 1
    knn_max_images: int = 2000  # per split, seeded subsample
    knn_image_size: int = 224
    collapse_patience: int = 50  # stop after this many collapsed steps in a row; 0 disables
    collapse_after_steps: int = 100  # no collapse check before this step (the start is legitimately flat)

    def __post_init__(self) -> None:
        check(self.knn_every_epochs >= 1, "monitor.knn_every_epochs", "must be >= 1", self.knn_every_epochs)
        check(self.knn_max_images >= 2, "monitor.knn_max_images", "must be >= 2", self.knn_max_images)


@dataclass
class PretrainConfig(StageConfig):
    out_dir: str = "runs/pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        """Checks across sections; each message names the key and what to do."""
        name = self.method.name
        if name in ("byol", "simclr", "mocov2") and self.views.n_global < 2:
            raise ConfigError(f"method '{name}' needs views.n_global >= 2 (two views per image)")
        if name == "simclr" and self.train.batch_size < 2:
            raise ConfigError("'train.batch_size' must be >= 2 for simclr (it needs negatives)")
        for key in ("momentum_start", "momentum_end"):
            check(0.0 <= getattr(self.method, key) <= 1.0, f"method.{key}", "must be in [0, 1]",
                  getattr(self.method, key))
        if self.model.export == "teacher" and name == "simclr":
            raise ConfigError("model.export=teacher but method 'simclr' has no teacher; use auto or student")


def _range(values: list[float], key: str, low: float = 0.0, high: float | None = None) -> None:
    if len(values) != 2 or not values[0] <= values[1]:
        raise ConfigError(f"'{key}' must be [low, high] with low <= high, got {values}")
    if values[0] <= low or (high is not None and values[1] > high):
        upper = f" and at most {high}" if high is not None else ""
        raise ConfigError(f"'{key}' values must be above {low}{upper}, got {values}")
