"""Training-batch augmentation on the accelerator: rotation, flips, stain swaps and jitter, colour, lost detail.

Rotation is by any angle with reflection padding (``roseprior.imageops.rotate``), so there are
no fill corners, and nothing is cropped: the users found that centre-cropping only the training
images changed the magnification the model saw and hurt results. Evaluation images get no
augmentation, only the resize the dataset already applied.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

from roseprior import imageops
from roseprior.errors import DataError

from .config import AugmentConfig

__all__ = ["TrainAugment", "stain_targets"]


def stain_targets(root: str | Path, image_size: int, max_unreadable_fraction: float = 0.05,
                  max_images: int = 512) -> torch.Tensor:
    """(N, 3) stain strengths (``imageops.stain_strength``) of up to ``max_images`` images under ``root`` (a
    folder or manifest, labels unused), evenly spaced, each seen at ``image_size`` as training images are."""
    from roseprior.data import ImageDataset, filter_readable, load_unlabeled, spread_indices

    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"augment.stain_targets {path} does not exist; give a folder or manifest .csv of the images "
                        "whose stains the swaps should take (e.g. the new site's), or null")
    samples = load_unlabeled(path)
    picked = [samples[i] for i in spread_indices(len(samples), max_images)]
    images = ImageDataset(filter_readable(picked, None, max_unreadable_fraction), image_size=image_size)
    return imageops.stain_strength([images[i][0] for i in range(len(images))])


class TrainAugment:
    """Augments a ``(B, 3, H, W)`` float batch in [0, 1]; seeded, so a run is reproducible."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0, stain_targets: torch.Tensor | None = None):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.stain_targets = stain_targets  # what swaps draw from instead of the batch (``stain_targets``)

    def _factors(self, batch: int, strength: float) -> torch.Tensor:
        # ColorJitter semantics: a factor uniform in [1 - s, 1 + s].
        return 1.0 + (torch.rand(batch, generator=self.generator) * 2 - 1) * strength

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image brightness, contrast, saturation and hue factors.

        torchvision's ``ColorJitter`` draws one set of factors per call (one per batch, from the
        global RNG); calling its functional ops per image with factors from our generator keeps
        the images independent and the run seeded.
        """
        cfg = self.cfg
        if not any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            return x
        batch = x.shape[0]
        brightness = self._factors(batch, cfg.brightness)
        contrast = self._factors(batch, cfg.contrast)
        saturation = self._factors(batch, cfg.saturation)
        hue = (torch.rand(batch, generator=self.generator) * 2 - 1) * cfg.hue
        out = []
        for i in range(batch):
            img = x[i]
            if cfg.brightness:
                img = TF.adjust_brightness(img, float(brightness[i]))
            if cfg.contrast:
                img = TF.adjust_contrast(img, float(contrast[i]))
            if cfg.saturation:
                img = TF.adjust_saturation(img, float(saturation[i]))
            if cfg.hue:
                img = TF.adjust_hue(img, float(hue[i]))
            out.append(img)
        return torch.stack(out).clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        cfg = self.cfg
        if cfg.flip:
            x = imageops.random_flip_rot90(x, self.generator)
        if cfg.rotate:
            x = imageops.random_rotate(x, self.generator)
        if cfg.stain_swap > 0:
            x = imageops.random_stain_swap(x, cfg.stain_swap, self.generator, self.stain_targets)
        if cfg.hed > 0:
            x = imageops.hed_jitter(x, cfg.hed, self.generator)
        if cfg.resolution > 1:
            x = imageops.random_resolution(x, cfg.resolution, self.generator)
        return self.color_jitter(x)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
