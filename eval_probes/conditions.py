"""The image conditions the test split is seen under: clean, stain shifts and zooms.

Each condition is a batched op from ``roseprior.imageops`` on float images in [0, 1], so the
probes see exactly the shifts the training stages augment with. Random conditions (HED jitter)
draw from a generator seeded by the run seed and the condition name, so a condition is the same
images every run, for every checkpoint (the comparison stays paired).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from roseprior import imageops

CLEAN = "clean"


@dataclass
class Condition:
    """One way of showing the test images: ``apply(x, generator)`` on a (B, 3, H, W) float batch."""

    name: str  # report key: clean, stain/hed_0.05, stain/macenko->site_b, scale/0.5, ...
    family: str  # clean | stain | scale
    value: float | None  # the x coordinate of its curve (HED strength, zoom), None when not on one
    spec: dict[str, Any]  # everything the images depend on: part of the feature cache key
    apply: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = field(repr=False)
    random: bool = False  # draws from the generator: its features depend on the batch order too
    target_domain: str | None = None  # re-staining: the domain whose stain the images are given
    # When set, each test image's own domain picks the op (``by_domain(domain)``; ``None``: an image with none):
    # re-staining maps a site's images by that site's stain, measured once (``imageops.StainNormalizer.fit_source``).
    by_domain: Callable[[str | None], Callable[[torch.Tensor, torch.Generator], torch.Tensor]] | None = field(
        default=None, repr=False)

    @property
    def shift(self) -> bool:
        return self.family != "clean"

    def describe(self) -> dict[str, Any]:
        """The condition as ``report.json`` lists it (everything but the function)."""
        return {"name": self.name, "family": self.family, "value": self.value, "shift": self.shift,
                "target_domain": self.target_domain, "spec": self.spec}

    def generator(self, seed: int, device: torch.device | str = "cpu") -> torch.Generator:
        digest = hashlib.sha256(f"{seed}:{self.name}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _identity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


def clean() -> Condition:
    return Condition(CLEAN, "clean", None, {"op": "identity"}, _identity)


def hed(strength: float) -> Condition:
    return Condition(f"stain/hed_{strength:g}", "stain", float(strength), {"op": "hed_jitter", "strength": strength},
                     lambda x, g: imageops.hed_jitter(x, strength, generator=g), random=True)


def brightness(delta: float) -> Condition:
    return Condition(f"stain/brightness_{delta:+g}", "stain", None, {"op": "brightness_shift", "delta": delta},
                     lambda x, g: imageops.brightness_shift(x, delta))


def white_balance(gains: list[float]) -> Condition:
    gains = [float(v) for v in gains]
    label = "_".join(f"{v:g}" for v in gains)
    return Condition(f"stain/wb_{label}", "stain", None, {"op": "white_balance_shift", "gains": gains},
                     lambda x, g: imageops.white_balance_shift(x, gains))


def restain(domain: str, normalizer: imageops.StainNormalizer, target_ids: list[str],
            site_maps: dict[str, imageops.StainNormalizer] | None = None, source_ids: dict[str, str] | None = None
            ) -> Condition:
    """Every test image re-stained to ``domain``'s target (fitted on a few of its train images).

    With ``site_maps`` (Macenko fitted to the target with each source domain's stain, ``fit_source`` on a few of
    that domain's train images), an image of a listed domain is mapped by its domain's one map, as another
    laboratory's stain would move a whole site: image by image, Macenko would also set every cell's darkest
    nucleus to the target's darkness. An image of an unlisted domain is normalised on its own."""
    def for_domain(source: str | None) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
        mapped = (site_maps or {}).get(source) if source is not None else None
        return (lambda x, g: mapped(x)) if mapped is not None else (lambda x, g: normalizer(x))

    spec = {"op": f"{normalizer.method}_restain", "domain": domain, "targets": target_ids}
    if site_maps:
        spec["sources"] = source_ids or {}
    return Condition(f"stain/{normalizer.method}->{domain}", "stain", None, spec, lambda x, g: normalizer(x),
                     target_domain=domain, by_domain=for_domain if site_maps else None)


def scale(factor: float) -> Condition:
    return Condition(f"scale/{factor:g}", "scale", float(factor), {"op": "zoom", "factor": factor},
                     lambda x, g: imageops.zoom(x, factor))
