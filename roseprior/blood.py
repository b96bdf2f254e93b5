"""Where are the red blood cells? A small segmenter for ``blood_fraction`` that reads shape, not colour.

Why a network: red blood cells in real smears are grey-blue, green, pink or brown, so no colour rule
finds them (the one this replaced flagged magenta stains and missed grey-green cells), and in
obscuring blood they overlap into a carpet that defeats blob detection. What they share is shape: discs
of one size, paler than nuclei, with a rim and glass between them, in a hue that is not the nuclei's.
None of the field's libraries segments them in cytology smears, so this module trains its own from the
synthetic generator's ground truth (``roseprior.synth``'s red-blood-cell layer where no cell lies over
it), on grey optical density and on hue relative to the field's nuclei (absolute colour removed), under
augmentation of stain strength, contrast, scale, focus and noise.

The weights ship with the package as safetensors (nothing unpickled); ``python -m roseprior.blood --out
FILE`` trains them again in about 4 minutes on one core. Fields are read at ``WORKING_SIDE`` px on their
shorter side, which puts a red cell at 9-36 px across for the magnifications the generator draws (about
20 px on the real 512-px ROSE examples).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roseprior import imageops

__all__ = ["WEIGHTS", "WORKING_SIDE", "BloodSegmenter", "blood_fraction", "blood_probability", "density_and_hue", "train",
           "visible_red_cells"]

WEIGHTS = Path(__file__).with_name("weights") / "blood_segmenter.safetensors"
WORKING_SIDE = 256  # px on the field's shorter side
OD_UNIT = 3.0  # summed RGB optical density (natural log) that maps to 1.0: the darkest nuclei read about 1


def _conv(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class BloodSegmenter(nn.Module):
    """Per-pixel logit of "red blood cell, not under a cell": a small encoder with dilated context.

    Context reaches about 90 px at the working scale (dilations 2-8 at quarter resolution), a few red
    cells across: enough to see that a disc is one of many of the same size.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv(3, width // 2)
        self.at_half = nn.Sequential(nn.MaxPool2d(2), _conv(width // 2, width), _conv(width, width))
        self.at_quarter = nn.Sequential(nn.MaxPool2d(2), _conv(width, 2 * width), _conv(2 * width, 2 * width, 2),
                                     _conv(2 * width, 2 * width, 4), _conv(2 * width, 2 * width, 8))
        self.head = nn.Sequential(_conv(3 * width, width), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.at_half(self.stem(x))
        context = F.interpolate(self.at_quarter(half), size=half.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([half, context], 1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def density_and_hue(image: np.ndarray) -> torch.Tensor:
    """(1, 3, h, w) at ``WORKING_SIDE`` px on the shorter side: grey density and hue relative to the nuclei.

    Channel 0 is the summed optical density in ``OD_UNIT``; channels 1 and 2 are how far each pixel's red
    and blue share of density lies from that of the field's darkest 5% (its nuclei). Absolute colour is
    left out on purpose: red cells are pink on one slide and green on the next, but never the nuclei's hue.
    """
    x = torch.from_numpy(np.array(image[..., :3], dtype=np.float32)).div_(255.0).permute(2, 0, 1)[None]  # one copy
    x = imageops.resample(x, WORKING_SIDE / min(x.shape[-2:]))
    od_rgb = -torch.log(torch.clamp(x[0], 1 / 255.0, 1.0))
    od = od_rgb.sum(0, keepdim=True)
    share = od_rgb / od.clamp(min=0.15)
    flat = od.flatten()
    darkest = flat >= torch.quantile(flat[::7], 0.95)
    relative = (share - share.flatten(1)[:, darkest].mean(1)[:, None, None]) * (od > 0.15)
    return torch.cat([(od / OD_UNIT).clamp(0, 2), 3 * relative[[0, 2]].clamp(-1, 1)])[None]


@functools.lru_cache(maxsize=1)
def _shipped() -> BloodSegmenter:
    from safetensors.torch import load_file

    model = BloodSegmenter()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def blood_probability(image: np.ndarray, model: BloodSegmenter | None = None) -> np.ndarray:
    """Per-pixel probability of red blood cells, at the working scale, for one (H, W, 3) uint8 field."""
    model = model or _shipped()
    with torch.inference_mode():
        return torch.sigmoid(model(density_and_hue(image)))[0, 0].numpy()


def blood_fraction(image: np.ndarray, model: BloodSegmenter | None = None) -> float:
    """Share of the field covered by red blood cells that no cell lies over."""
    return float((blood_probability(image, model) > 0.5).mean())


# ---------------------------------------------------------------------------------------------
# Training on the generator's ground truth
# ---------------------------------------------------------------------------------------------


def visible_red_cells(scene: Any) -> np.ndarray:
    """(H, W) bool, the ground truth: where a synthetic scene has red blood cells and no cell over them."""
    from roseprior.synth_render import CYTOPLASM, NUCLEUS, RBC

    layers = scene.layers
    return (layers[RBC] > 0.1) & (layers[NUCLEUS] < 0.1) & (layers[CYTOPLASM] < 0.1)


def _training_fields(n_fields: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and visible-red-cell masks of synthetic fields of every site, 40% of them bloody."""
    from roseprior.synth import DOMAIN_PRESETS, render_field

    inputs, masks = [], []
    for index in range(n_fields):
        label = "NP"[index % 2]
        defect = "blood" if index % 5 < 2 else "none"
        image, _, scene = render_field(label, index % 2, index, 256, seed, list(DOMAIN_PRESETS), 0.0, 1.0, defect)
        inputs.append(density_and_hue(np.asarray(image))[0])
        masks.append(torch.from_numpy(visible_red_cells(scene))[None])
    return torch.stack(inputs), torch.stack(masks).float()


def _augmented(x: torch.Tensor, y: torch.Tensor, crop: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random crop at a random scale, flipped, with another stain strength, contrast, focus and noise."""

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high, generator=g))

    size = max(crop, round(x.shape[-1] * math.exp(uniform(math.log(0.5), math.log(2.0)))))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    top, left = (int(torch.randint(0, size - crop + 1, (), generator=g)) for _ in range(2))
    x, y = x[..., top:top + crop, left:left + crop], (y[..., top:top + crop, left:left + crop] > 0.5).float()
    if uniform(0, 1) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if uniform(0, 1) < 0.5:
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    x = torch.cat([x[:, :1].clamp(min=0) ** math.exp(uniform(-0.4, 0.4)) * uniform(0.6, 1.6), x[:, 1:]], 1)
    if uniform(0, 1) < 0.3:  # a little out of focus
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None]) / 16
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    return x + 0.02 * uniform(0, 1) * torch.randn(x.shape, generator=g), y


def train(out: Path, n_fields: int = 800, steps: int = 2000, batch: int = 8, crop: int = 128, seed: int = 1015,
          log_every: int = 200) -> Path:
    """Train the segmenter on ``n_fields`` synthetic fields and write its weights as safetensors."""
    from roseprior.checkpoint import save_safetensors

    torch.manual_seed(seed)
    start = time.perf_counter()
    inputs, masks = _training_fields(n_fields, seed)
    model = BloodSegmenter()
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        picks = torch.randint(0, n_fields, (batch,), generator=g).tolist()
        pairs = [_augmented(inputs[i:i + 1], masks[i:i + 1], crop, g) for i in picks]
        x, y = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            print(f"blood segmenter: step {step + 1}/{steps}, loss {loss.item():.3f}, {elapsed:.0f} s", flush=True)
    return save_safetensors(model.state_dict(), out,
                            {"trained_on": f"{n_fields} synthetic fields, seed {seed}, {steps} steps"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roseprior.blood", description=train.__doc__)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--fields", type=int, default=800)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1015)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"wrote {train(args.out, args.fields, args.steps, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
