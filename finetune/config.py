"""The finetune config: one dataclass per section; ``configs/finetune/*.yaml`` mirror them.

The defaults are the paper's recipe (Adam, lr 1e-5, weight decay 0.01, cosine down to 0.25×lr,
batch 8, 50 epochs, SAM); the YAML files only choose the backbone, image size and budget. Building
the dataclasses runs the checks, so a config made in Python is validated as one loaded from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from roseprior.config import CheckpointConfig, DataConfig, StageConfig, TrainConfig, check
from roseprior.errors import ConfigError

# rho when ``rho: null``: the SAM paper's 0.05, and 2.0 for ASAM, the value the SAM reference
# implementation (davda54/sam) suggests with adaptive=True: ASAM's perturbation is scaled by |w|,
# so its radius lives on a different scale.
DEFAULT_RHO = {"sam": 0.05, "asam": 2.0}


@dataclass
class OptimConfig:
    """Base optimizer (wrapped by SAM unless ``sam: off``) and a learning rate per part of the model."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9  # sgd only
    # Learning rate of each part of the model; null means ``train.lr``. The users found the CNN
    # stages and the transformer stages differ in learning-rate sensitivity.
    lr_cnn: float | None = None
    lr_transformer: float | None = None
    lr_head: float | None = None
    # < 1 scales each earlier block's lr by layer_decay**(depth from the head); 1.0 is off.
    layer_decay: float = 1.0
    # timm's convention: biases, norms and tokens get no weight decay.
    decay_norm_and_bias: bool = False

    def __post_init__(self) -> None:
        check(0 < self.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]", self.layer_decay)


@dataclass
class AugmentConfig:
    """Training-image augmentation; evaluation images only get the same resize."""

    rotate: bool = True  # any angle, reflection padding: no fill corners, unchanged magnification
    flip: bool = True  # horizontal/vertical flips and 90° turns
    brightness: float = 0.15  # colour jitter, torchvision ColorJitter semantics
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.06
    # HED (stain) jitter strength, 0 is off. On by default (Tellez et al. 2019's "light" 0.05): stains move from
    # slide to slide. CRIC, pretrained, one fine-tune each: clean 0.802 vs 0.789 without, HED-shifted test
    # 0.779-0.788 vs 0.771-0.779 (benchmarks/shift_quality.py, docs/results/shift_quality_hed.json).
    hed: float = 0.05
    # Lost detail, 1 is off: half the images are shrunk by up to this factor and enlarged back, as a field from a
    # weaker objective is once predict brings it up to the training scale (--scale, --mpp). Size is unchanged. 4 by
    # default since 2026-12-01, the zoom-out predict serves: six synthetic classifiers read fields zoomed out 4x at
    # their known scale 0.10 below clean, against 0.20 without it; held-out site c (0.6x) 0.932 against 0.910 (18
    # classifiers); CRIC (3 splits) clean 0.793 against 0.778, zooms with --scale auto level or higher
    # (docs/results.md, "Lost detail", docs/results/lost_detail_synthetic_cric.json).
    resolution: float = 4.0
    # Stain mix-up, 0 is off: this fraction of the training images takes the stain strength of another image of its
    # batch (imageops.random_stain_swap), so the classifier meets every training slide's stain on every cell.
    # Off by default: 0.3 raises the fine-tuned robustness index (0.82 against 0.80, 3 seeds) but costs held-out
    # synthetic sites 2-8 points (2 seeds) and CRIC 1.3 clean
    # (docs/results.md, docs/results/invariance_*stain_swap.json).
    stain_swap: float = 0.0
    # A folder or manifest of unlabelled images (the sites the model will meet) whose stain strengths the swaps
    # take instead of the batch's: stain mix-up toward them, no labels needed (finetune.augment.stain_targets).
    stain_targets: str | None = None

    def __post_init__(self) -> None:
        check(self.resolution >= 1.0, "augment.resolution", "must be >= 1 (1 is off)", self.resolution)
        check(0.0 <= self.stain_swap <= 1.0, "augment.stain_swap", "must be in [0, 1] (0 is off)", self.stain_swap)
        check(self.stain_targets is None or self.stain_swap > 0, "augment.stain_targets",
              "needs augment.stain_swap > 0 (the fraction of images that take a target's stain)", self.stain_targets)


@dataclass
class CamConfig:
    """Grad-CAM figures on test images after training."""

    enabled: bool = True
    num_images: int = 8  # images in the figure set
    misclassified: int = 4  # of which up to this many are misclassified ones
    per_figure: int = 4  # rows per PNG


@dataclass
class DecisionConfig:
    """How the classifier calls N or P: calibrated probabilities and a threshold chosen on validation."""

    calibrate: bool = True  # temperature scaling fitted on the validation logits
    target_sensitivity: float = 0.95  # the threshold is the highest one that reaches this on validation
    # The call is the mean of the logits over the field's 8 flips and quarter turns (test-time augmentation; the
    # calibration, the operating point, the test scores, predict and export all read it so). Evaluation costs 8x;
    # per-epoch selection reads one view. On by default since 2026-12-01: CRIC, three fine-tunes, at the operating
    # point, test balanced accuracy 0.738 / 0.714 / 0.746 -> 0.748 / 0.734 / 0.759 and AUROC 0.890 / 0.909 / 0.913
    # -> 0.899 / 0.916 / 0.921 (README, "Symmetric reading"). null: on when augment.flip trains every flip and turn.
    dihedral_mean: bool | None = None

    def __post_init__(self) -> None:
        check(0.0 < self.target_sensitivity <= 1.0, "decision.target_sensitivity", "must be in (0, 1]",
              self.target_sensitivity)


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """How long and how: the paper's batch 8, 50 epochs, lr 1e-5, weight decay 0.01, cosine to 0.25×lr."""

    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-5
    min_lr_ratio: float = 0.25
    weight_decay: float = 0.01
    eval_batch_size: int | None = None  # null: 2 × batch_size
    # Class imbalance: a class-weighted loss, a balanced sampler, or neither.
    balance: Literal["loss", "sampler", "none"] = "loss"


@dataclass
class FinetuneConfig(StageConfig):
    """``python -m finetune``: an N/P classifier on a backbone, trained with SAM."""

    out_dir: str = "runs/finetune"
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=384))
    # A pretrain output folder (backbone.safetensors + backbone.json), a registry or ``timm:``
    # name (random init), or a local state-dict file.
    init: str = "msht_tiny"
    model: dict[str, Any] = field(default_factory=dict)  # kwargs for backbones.create
    # Registry name used when ``init`` is a state-dict file (the file says nothing about its model).
    arch: str | None = None
    drop_rate: float = 0.0  # dropout before the linear head
    # ``false`` is accepted for "off" (YAML 1.1 readers turn a bare ``sam: off`` into false).
    sam: Literal["sam", "asam", "off"] | bool = "sam"
    rho: float | None = None  # null: 0.05 for sam, 2.0 for asam
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    folds: int = 0  # K > 1: K-fold cross-validation on train+val, one shared test split
    cam: CamConfig = field(default_factory=CamConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=200))

    def __post_init__(self) -> None:
        if self.sam is False:
            self.sam = "off"
        elif self.sam is True:
            raise ConfigError("'sam' must be one of sam, asam, off; got true (write sam: sam to enable it)")
        if self.rho is not None and self.rho <= 0:
            raise ConfigError(f"'rho' must be positive (or null for the method's default); got {self.rho}")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"'folds' must be 0 (no cross-validation) or at least 2; got {self.folds}")
        if self.train.precision == "fp16" and self.sam != "off":
            raise ConfigError("'train.precision' fp16 needs loss scaling, which SAM's two-pass step does not "
                              "support; use bf16 or no")
        if self.decision.dihedral_mean is None:
            self.decision.dihedral_mean = self.augment.flip
        elif self.decision.dihedral_mean and not self.augment.flip:
            raise ConfigError("'decision.dihedral_mean' averages a field's 8 flips and quarter turns, which "
                              "augment.flip=false never shows the model; set decision.dihedral_mean=false (or null)")
        if self.data.positive_class not in self.data.classes or len(self.data.classes) != 2:
            raise ConfigError(
                f"'data.classes' must be two classes including data.positive_class "
                f"({self.data.positive_class!r}); got {self.data.classes}"
            )

    @property
    def resolved_rho(self) -> float:
        return self.rho if self.rho is not None else DEFAULT_RHO.get(self.sam, 0.0)
