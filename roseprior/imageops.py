"""Batched stain, colour and geometry ops shared by pretrain views, finetune augmentation and probe shifts.

Value convention: images are ``(B, 3, H, W)`` tensors, RGB, float in ``[0, 1]``. ``uint8`` tensors in
``[0, 255]`` are accepted too; every op then returns ``uint8`` (computed in float32, rounded back).
``float16``/``bfloat16`` inputs are computed in float32 and returned in their own dtype. Results stay
on the input's device. Random ops take an optional ``torch.Generator``; their parameters (a handful of
numbers per image) are drawn on the generator's device and then moved to the images, so one seed gives
the same augmentation on CPU and GPU. A strength of 0 returns the input object itself.

Why tensors and not PIL: the stages augment whole batches, often many views per image (multi-crop SSL)
and often on the GPU. ``F.grid_sample`` with an affine grid (zoom, rotate) and
``torchvision.ops.roi_align`` (many crops at many scales) do a whole batch in one kernel call, with a
different parameter per image, no Python loop over images and no CPU round trip; PIL works one image
at a time on the CPU and fills uncovered pixels with a constant. Reflection padding means a zoom-out
or a rotation never shows constant-fill borders or black corners, which classifiers and CAMs learn to
look at. Stain normalisation (Macenko, Reinhard) comes from torchstain.

References:
    Ruifrok & Johnston 2001, "Quantification of histochemical staining by color deconvolution"
    (the H&E-DAB matrix, as in ``skimage.color.rgb_from_hed``).
    Tellez et al. 2019, "Quantifying the effects of data augmentation and stain color normalization
    in convolutional neural networks for computational pathology", Med. Image Anal. 58
    (HED-light ±0.05, HED-strong ±0.2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from roseprior.errors import ConfigError, DataError

__all__ = [
    "HED_LIGHT",
    "HED_STRONG",
    "StainNormalizer",
    "brightness_shift",
    "crop_resize",
    "dihedral_views",
    "gaussian_blur",
    "hed_jitter",
    "hed_shift",
    "random_brightness",
    "random_flip_rot90",
    "random_resolution",
    "random_rotate",
    "random_stain_swap",
    "random_white_balance",
    "resample",
    "rotate",
    "stain_normalize",
    "stain_strength",
    "stain_swap_factors",
    "white_balance_shift",
    "zoom",
]

HED_LIGHT = 0.05  # Tellez et al. 2019, "HED-light"
HED_STRONG = 0.2  # Tellez et al. 2019, "HED-strong"

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), the values of
# skimage.color.rgb_from_hed; the inverse maps optical density to stain concentrations.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_MIN_INTENSITY = 1e-6  # as skimage: keeps log() finite on black pixels

ScalarOrPerImage = float | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Helpers: value convention, per-image parameters, random draws
# ---------------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor, op: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"imageops.{op}: expected a (B, 3, H, W) image tensor, got {got}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise DataError(f"imageops.{op}: expected uint8 or float images, got {x.dtype}")


def _to_float(x: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.dtype]:
    """Float32-or-wider view of ``x`` in [0, 1], plus the dtype to give back."""
    _check_batch(x, op)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0), torch.uint8
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float(), x.dtype
    return x, x.dtype


def _restore(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return y.to(dtype)


def _per_image(value: ScalarOrPerImage | Sequence[float], x: torch.Tensor, name: str, width: int = 0) -> torch.Tensor:
    """Broadcast a scalar, a (width,) vector or a per-image value to (B,) or (B, width) on x's device."""
    batch = x.shape[0]
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    shape = (batch, width) if width else (batch,)
    if t.ndim == 0 or (width and t.shape == (width,)) or t.shape == shape:
        return t.expand(shape)
    want = f"a number or ({batch},)" if not width else f"a number, ({width},) or ({batch}, {width})"
    raise ConfigError(f"imageops: `{name}` must be {want} for a batch of {batch}, got shape {tuple(t.shape)}")


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """U(low, high) drawn on the generator's device (CPU without one), then moved: same seed, same draw."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return (low + (high - low) * u).to(device=device, dtype=torch.float32)


def _check_strength(strength: float, op: str, upper: float = 1.0) -> None:
    if not 0.0 <= float(strength) <= upper:
        raise ConfigError(f"imageops.{op}: strength must be in [0, {upper}], got {strength}")


# ---------------------------------------------------------------------------------------------
# Colour: HED stain jitter, brightness, white balance
# ---------------------------------------------------------------------------------------------


def hed_shift(x: torch.Tensor, alpha: ScalarOrPerImage | Sequence[float],
              beta: ScalarOrPerImage | Sequence[float]) -> torch.Tensor:
    """Scale and shift the H, E and DAB concentrations: ``hed * alpha + beta`` (per image, per stain).

    Concentrations are in natural-log optical density units (Tellez et al.'s code does not rescale
    them either), so ``beta`` = ±0.05 / ±0.2 are the light / strong shifts the paper meant.
    ``skimage.color.rgb2hed`` divides by ln(1e6) ≈ 13.8 on top: there a beta of 0.2 would be an OD
    shift of 2.8 and blacken the image. Concentrations are not clipped at 0 in between, so alpha=1,
    beta=0 gives the input back.
    """
    xf, dtype = _to_float(x, "hed_shift")
    alpha = _per_image(alpha, xf, "alpha", width=3)
    beta = _per_image(beta, xf, "beta", width=3)
    rgb_from_hed = _RGB_FROM_HED.to(device=xf.device, dtype=xf.dtype)
    hed_from_rgb = _HED_FROM_RGB.to(device=xf.device, dtype=xf.dtype)
    # RGB -> OD -> HED -> (alpha, beta) -> OD -> RGB folded into one per-image 3x3 map plus a bias:
    # OD' = OD @ (hed_from_rgb @ diag(alpha) @ rgb_from_hed) + beta @ rgb_from_hed.
    od_map = hed_from_rgb @ (alpha.unsqueeze(-1) * rgb_from_hed)  # (B, 3, 3)
    od_bias = beta @ rgb_from_hed  # (B, 3)
    od = xf.clamp_min(_MIN_INTENSITY).log_().neg_()  # clamp_min made a copy: in place is safe from here
    od = torch.einsum("bchw,bcd->bdhw", od, od_map).add_(od_bias[:, :, None, None])
    return _restore(od.neg_().exp_().clamp_(0.0, 1.0), dtype)


def stain_strength(images: Sequence[torch.Tensor], max_pixels: int = 4096, min_od: float = 0.15) -> torch.Tensor:
    """(B, 3) root-mean-square H, E and DAB concentration of each image's stained pixels.

    What a stain swap transfers (``pretrain.views``): scaling each concentration by the ratio of two
    images' values renders one in the other's stain strength while glass (concentration 0) stays
    white, which Reinhard-style mean shifts would tint. ``images`` are uint8 or float in [0, 1] (3, H, W), subsampled
    on a grid to about ``max_pixels``; pixels of optical density sum below ``min_od`` are glass
    (all pixels count when fewer than 1% are stained).
    """
    hed_from_rgb = _HED_FROM_RGB.to(torch.float32)
    out = torch.empty(len(images), 3)
    for i, image in enumerate(images):
        step = max(1, int(math.sqrt(image.shape[1] * image.shape[2] / max_pixels)))
        pixels = image[:, ::step, ::step].reshape(3, -1).T
        pixels = pixels.float() if image.is_floating_point() else pixels.float().div_(255.0)
        od = pixels.clamp_min(_MIN_INTENSITY).log_().neg_()  # clamp_min copies: a float image is left as it was
        stained = od.sum(1) > min_od
        if int(stained.sum()) >= max(1, od.shape[0] // 100):
            od = od[stained]
        out[i] = (od.cpu() @ hed_from_rgb).square_().mean(0).sqrt_()
    return out.clamp_min_(1e-4)


def stain_swap_factors(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``hed_shift``'s alpha that renders an image of stain strength ``source`` in strength ``target`` (both
    (..., 3), from ``stain_strength``), at most 3x either way: a faint smear is not inked into a dark one."""
    return (target / source).clamp(1 / 3, 3.0)


def random_stain_swap(x: torch.Tensor, probability: float, generator: torch.Generator | None = None,
                      targets: torch.Tensor | None = None) -> torch.Tensor:
    """Render each image, with ``probability``, in the stain strength of another image of the batch, or of
    a row of ``targets`` ((N, 3) ``stain_strength`` values, e.g. of a new site's unlabelled images) when given.

    Stain mix-up (Chang et al. 2021) for training batches: the strengths a model meets are those of
    the training slides (or of the slides it will be used on), not a fixed jitter around each image's
    own, so a slide stained darker or lighter than the labelled ones is less new. Glass stays white
    (``stain_strength``).
    """
    _check_batch(x, "random_stain_swap")
    _check_strength(probability, "random_stain_swap")
    batch = x.shape[0]
    pool = batch - 1 if targets is None else len(targets)
    if probability == 0 or pool < 1:
        return x
    xf, dtype = _to_float(x, "random_stain_swap")
    chosen = _uniform((batch,), 0.0, 1.0, generator, xf.device) < probability
    pick = (_uniform((batch,), 0.0, 1.0, generator, xf.device) * pool).long().clamp_(max=pool - 1)
    rows = torch.nonzero(chosen).flatten()  # only these are measured and shifted
    if targets is None:
        target = stain_strength(list(xf[(rows + 1 + pick[rows]) % batch]))  # any image but itself
    else:
        target = targets[pick[rows].cpu()]
    out = xf.clone()
    out[rows] = hed_shift(xf[rows], stain_swap_factors(stain_strength(list(xf[rows])), target).to(xf), 0.0)
    return _restore(out, dtype)


def hed_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Tellez et al.'s HED stain augmentation: alpha ~ U(1-s, 1+s), beta ~ U(-s, s) per image and stain.

    ``strength`` 0.05 is "HED-light" (:data:`HED_LIGHT`), 0.2 "HED-strong" (:data:`HED_STRONG`).
    """
    _check_batch(x, "hed_jitter")
    _check_strength(strength, "hed_jitter")
    if strength == 0:
        return x
    batch = x.shape[0]
    alpha = _uniform((batch, 3), 1.0 - strength, 1.0 + strength, generator, x.device)
    beta = _uniform((batch, 3), -strength, strength, generator, x.device)
    return hed_shift(x, alpha, beta)


def brightness_shift(x: torch.Tensor, delta: ScalarOrPerImage) -> torch.Tensor:
    """Add ``delta`` (a number or one per image, in [0, 1] units) to every channel, then clip."""
    xf, dtype = _to_float(x, "brightness_shift")
    delta = _per_image(delta, xf, "delta")
    return _restore((xf + delta[:, None, None, None]).clamp_(0.0, 1.0), dtype)


def white_balance_shift(x: torch.Tensor, gains: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Multiply R, G, B by ``gains`` ((3,) for all images or (B, 3) per image), then clip."""
    xf, dtype = _to_float(x, "white_balance_shift")
    gains = _per_image(gains, xf, "gains", width=3)
    if bool((gains < 0).any()):
        raise ConfigError("imageops.white_balance_shift: `gains` must be non-negative")
    return _restore((xf * gains[:, :, None, None]).clamp_(0.0, 1.0), dtype)


def random_brightness(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness shift with delta ~ U(-strength, strength) per image."""
    _check_batch(x, "random_brightness")
    _check_strength(strength, "random_brightness")
    if strength == 0:
        return x
    return brightness_shift(x, _uniform((x.shape[0],), -strength, strength, generator, x.device))


def random_white_balance(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """White-balance shift with gains ~ U(1 - strength, 1 + strength) per image and channel."""
    _check_batch(x, "random_white_balance")
    _check_strength(strength, "random_white_balance")
    if strength == 0:
        return x
    return white_balance_shift(x, _uniform((x.shape[0], 3), 1.0 - strength, 1.0 + strength, generator, x.device))


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def _blur_radius(sigma: float, height: int, width: int) -> int:
    # 3 sigma each side; reflect padding needs the radius below the image size.
    return max(0, min(math.ceil(3.0 * sigma), height - 1, width - 1))


def gaussian_blur(x: torch.Tensor, sigma: ScalarOrPerImage) -> torch.Tensor:
    """Gaussian blur, sigma in pixels (a number or one per image; 0 leaves an image as it is).

    Kernels reach 3 sigma each side, borders are reflected (as torchvision does).
    """
    xf, dtype = _to_float(x, "gaussian_blur")
    _, _, height, width = xf.shape
    if not isinstance(sigma, torch.Tensor) or sigma.ndim == 0:
        sigma = float(sigma)
        if sigma < 0:
            raise ConfigError(f"imageops.gaussian_blur: sigma must be >= 0, got {sigma}")
        radius = _blur_radius(sigma, height, width)
        if sigma == 0 or radius == 0:
            return x
        return _restore(TF.gaussian_blur(xf, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma]), dtype)
    return _restore(_gaussian_blur_per_image(xf, _per_image(sigma, xf, "sigma")), dtype)


def _gaussian_blur_per_image(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One sigma per image as a grouped separable convolution.

    Written by hand because torchvision's gaussian_blur takes one sigma for the whole batch. Each
    image's kernel is cut at its own 3-sigma radius and renormalised, so it equals torchvision's
    kernel for that sigma.
    """
    batch, channels, height, width = x.shape
    if bool((sigma < 0).any()):
        raise ConfigError("imageops.gaussian_blur: sigma must be >= 0")
    radius = _blur_radius(float(sigma.max()), height, width)
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    own_radius = torch.clamp(torch.ceil(3.0 * sigma), max=radius)
    s = sigma.clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / s) ** 2) * (offsets.abs()[None, :] <= own_radius[:, None])
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 2r+1); sigma 0 gives a unit impulse
    kernel = kernel.repeat_interleave(channels, dim=0)  # one per (image, channel) group
    size = 2 * radius + 1
    y = F.pad(x.reshape(1, batch * channels, height, width), (radius, radius, radius, radius), mode="reflect")
    if y.device.type == "cpu":  # oneDNN's depthwise convolution is about 5x faster channels-last on the CPU
        y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, kernel.view(-1, 1, size, 1), groups=batch * channels)
    y = F.conv2d(y, kernel.view(-1, 1, 1, size), groups=batch * channels)
    return y.view(batch, channels, height, width)  # a strided view on the CPU: callers copy it where they need to


# ---------------------------------------------------------------------------------------------
# Geometry: zoom, rotation, flips, crops
# ---------------------------------------------------------------------------------------------


def _affine_sample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # align_corners=False: normalised coordinates span pixel edges, so an identity theta samples
    # exact pixel centres; reflection padding mirrors content instead of filling with zeros.
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def zoom(x: torch.Tensor, factor: ScalarOrPerImage, antialias: bool = True) -> torch.Tensor:
    """Change magnification about the centre, keeping the output size (factor > 1 magnifies).

    Meant for factors 0.5-2. Zooming out fills the border with reflected content, never a constant.
    With ``antialias`` a zoom-out first blurs with sigma = (1/factor - 1) / 2 pixels (skimage's rule
    for downscaling), so fine texture does not alias into moiré.
    """
    xf, dtype = _to_float(x, "zoom")
    factor = _per_image(factor, xf, "factor")
    if bool((factor <= 0).any()):
        raise ConfigError("imageops.zoom: factor must be > 0")
    if antialias:
        sigma = ((1.0 / factor - 1.0) / 2.0).clamp_min(0.0)
        if bool((sigma > 0).any()):
            xf = _gaussian_blur_per_image(xf, sigma)
    theta = torch.zeros(xf.shape[0], 2, 3, dtype=xf.dtype, device=xf.device)
    theta[:, 0, 0] = 1.0 / factor
    theta[:, 1, 1] = 1.0 / factor
    return _restore(_affine_sample(xf, theta), dtype)


def resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Every image of ``x`` resized by ``factor`` (sides rounded, at least 1 px), bicubic, antialiased when
    shrinking. The one resampler of the stages: training images to the canonical scale, fields to their
    model's scale at prediction, and the scale estimator's calibration all go through it, so a field is
    resampled alike at training and prediction. Bicubic, not bilinear: its antialiasing keeps a nucleus's
    edge sharp at 0.25x, where bilinear's wider kernel blurs it and the scale estimator reads 28% too large."""
    _check_batch(x, "resample")
    if factor <= 0:
        raise ConfigError(f"imageops.resample: factor must be > 0, got {factor}")
    size = [max(1, round(x.shape[-2] * factor)), max(1, round(x.shape[-1] * factor))]
    if size == list(x.shape[-2:]):
        return x
    xf, dtype = _to_float(x, "resample")
    return _restore(_resize(xf, size), dtype)


def _resize(xf: torch.Tensor, size: list[int]) -> torch.Tensor:
    """``resample``'s kernel on a float batch, to an exact size (bicubic, antialiased when shrinking)."""
    shrinking = size[0] < xf.shape[-2] or size[1] < xf.shape[-1]
    y = F.interpolate(xf, size=size, mode="bicubic", antialias=shrinking, align_corners=False)
    return y.clamp_(0.0, 1.0)  # bicubic overshoots at edges


def random_resolution(x: torch.Tensor, max_factor: float, generator: torch.Generator | None = None,
                      probability: float = 0.5) -> torch.Tensor:
    """Thin the detail of some images as a weaker objective would, at unchanged size and magnification.

    With ``probability``, an image is shrunk by a factor log-uniform in [1, ``max_factor``] and enlarged back,
    with ``resample``'s kernel: what a field taken through a weaker objective looks like once prediction
    (``finetune.predict --scale``) has brought it up to the training scale. Cells keep their size in pixels;
    only detail is lost.
    """
    _check_batch(x, "random_resolution")
    if max_factor < 1:
        raise ConfigError(f"imageops.random_resolution: max_factor must be >= 1 (1 is off), got {max_factor}")
    if max_factor == 1 or probability <= 0:
        return x
    xf, dtype = _to_float(x, "random_resolution")
    chosen = _uniform((xf.shape[0],), 0.0, 1.0, generator, xf.device) < probability
    factors = torch.exp(_uniform((xf.shape[0],), 0.0, math.log(max_factor), generator, xf.device))
    out = xf.clone()
    height, width = xf.shape[-2:]
    for i in torch.nonzero(chosen).flatten().tolist():
        size = [max(1, round(height / float(factors[i]))), max(1, round(width / float(factors[i])))]
        out[i] = _resize(_resize(xf[i : i + 1], size), [height, width])[0]
    return _restore(out, dtype)


def rotate(x: torch.Tensor, angle_deg: ScalarOrPerImage) -> torch.Tensor:
    """Rotate counter-clockwise (torchvision's sense) about the centre at unchanged magnification.

    Corners that would fall outside the source are filled by reflection, not black: CAMs were seen
    attending to the black corners of plain rotation.
    """
    xf, dtype = _to_float(x, "rotate")
    _, _, height, width = xf.shape
    angle = torch.deg2rad(_per_image(angle_deg, xf, "angle_deg"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotation in pixel units, expressed in normalised coordinates (x spans W, y spans H).
    theta = torch.zeros(xf.shape[0], 2, 3, dtype=xf.dtype, device=xf.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = sin * width / height
    theta[:, 1, 1] = cos
    return _restore(_affine_sample(xf, theta), dtype)


def random_rotate(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image by an angle drawn uniformly from [0, 360) degrees."""
    _check_batch(x, "random_rotate")
    return rotate(x, _uniform((x.shape[0],), 0.0, 360.0, generator, x.device))


def random_flip_rot90(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image horizontal and vertical flips and a rotation by k·90° (square images): exact, no resampling."""
    _check_batch(x, "random_flip_rot90")
    batch, _, height, width = x.shape
    if height != width:
        raise DataError(f"imageops.random_flip_rot90: needs square images, got {height}x{width}")
    draws = _uniform((batch, 3), 0.0, 1.0, generator, x.device)
    hflip, vflip, quarter_turns = draws[:, 0] < 0.5, draws[:, 1] < 0.5, (draws[:, 2] * 4).long().clamp_(max=3)
    # torch.where over the few candidates keeps it batched and free of host syncs.
    y = torch.where(hflip[:, None, None, None], x.flip(-1), x)
    y = torch.where(vflip[:, None, None, None], y.flip(-2), y)
    out = y
    for k in (1, 2, 3):
        out = torch.where((quarter_turns == k)[:, None, None, None], torch.rot90(y, k, dims=(-2, -1)), out)
    return out


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The batch under every symmetry of its square: the 8 flips and quarter turns (4 of them, the identity, the
    two flips and the half turn, when the images are not square, since a quarter turn would change their shape).
    Exact, no resampling: a cell on a slide has no up or left, so each view is the same field."""
    _check_batch(x, "dihedral_views")
    turns = range(4) if x.shape[-2] == x.shape[-1] else (0, 2)
    views = [torch.rot90(x, k, dims=(-2, -1)) if k else x for k in turns]
    return views + [view.flip(-1) for view in views]


def _boxes_inside(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Slide boxes that stick out back inside the image, keeping their size; cut down only boxes larger than it."""
    box_w = (boxes[:, 3] - boxes[:, 1]).clamp(max=width)
    box_h = (boxes[:, 4] - boxes[:, 2]).clamp(max=height)
    x1 = torch.minimum(boxes[:, 1].clamp_min(0.0), width - box_w)
    y1 = torch.minimum(boxes[:, 2].clamp_min(0.0), height - box_h)
    return torch.stack([boxes[:, 0], x1, y1, x1 + box_w, y1 + box_h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, out_size: int | tuple[int, int],
                sampling_ratio: int = -1) -> torch.Tensor:
    """Cut many boxes from a batch and resize each to ``out_size``, in one ``roi_align`` call.

    ``boxes`` is (K, 5): ``[batch_index, x1, y1, x2, y2]`` in pixels (pixel i spans [i, i+1)), so
    ``[b, 0, 0, W, H]`` is the whole image. Returns (K, 3, out_h, out_w). A box that sticks out of
    the image is moved inside first, keeping its size (so the crop keeps the scale asked for and
    never shows black fill); a box larger than the image is cut down to it. ``sampling_ratio=-1``
    samples ceil(box/out) points per output pixel, i.e. averages the source pixels under it when
    downscaling (anti-aliasing) and reproduces the pixels exactly at scale 1.
    """
    xf, dtype = _to_float(images, "crop_resize")
    batch, _, height, width = xf.shape
    out_hw = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if len(out_hw) != 2 or min(out_hw) < 1:
        raise ConfigError(f"imageops.crop_resize: out_size must be a positive int or (h, w), got {out_size}")
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 5:
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise DataError(f"imageops.crop_resize: boxes must be (K, 5) [batch_index, x1, y1, x2, y2], got {got}")
    boxes = boxes.to(device=xf.device, dtype=xf.dtype)
    index = boxes[:, 0]
    bad = (index < 0) | (index >= batch) | (index != index.round()) | (boxes[:, 3] <= boxes[:, 1]) | (
        boxes[:, 4] <= boxes[:, 2])
    if bool(bad.any()):  # one host sync: roi_align would read out of bounds on a bad batch index
        raise DataError(f"imageops.crop_resize: {int(bad.sum())} of {len(boxes)} boxes have a batch index "
                        f"outside [0, {batch}) or x2 <= x1 / y2 <= y1; first: {boxes[bad][0].tolist()}")
    crops = roi_align(xf, _boxes_inside(boxes, height, width), output_size=out_hw, spatial_scale=1.0,
                      sampling_ratio=sampling_ratio, aligned=True)
    return _restore(crops, dtype)


# ---------------------------------------------------------------------------------------------
# Stain normalisation (torchstain)
# ---------------------------------------------------------------------------------------------


def _lit_fields(batch: torch.Tensor) -> torch.Tensor:
    """Each (3, H, W) image of ``batch`` with the frame outside its lit field of view painted as glass
    (``roseprior.scale.fill_unlit``): black corners are dense, neutral optical density to Macenko, which took 12 real
    ROSE fields under a round vignette to a grey stain vector (0.57, 0.58, 0.58) and up to 3.7x their haematoxylin."""
    from roseprior.scale import fill_unlit

    images = [x.permute(1, 2, 0).cpu().numpy() for x in batch]
    filled = [fill_unlit(image) for image in images]
    if all(f is image for f, image in zip(filled, images, strict=True)):
        return batch
    return torch.stack([torch.from_numpy(f).permute(2, 0, 1) for f in filled]).to(batch.device)


class StainNormalizer:
    """Macenko or Reinhard stain normalisation to a target, applied image by image with torchstain.

    torchstain works on one (3, H, W) image in 0..255 and keeps its constants on the CPU, so images
    are normalised on the CPU and returned on their own device (stain normalisation is preprocessing
    and probe work, not a per-step augmentation). Images it cannot normalise (blank or nearly
    unstained fields, flat colour) come back unchanged; ``num_failed`` counts them and each call
    that meets one warns once.

    Macenko measures each image's own stain (its stain vectors and 99th-percentile concentrations) and maps
    it to the target's. ``fit_source`` measures the source once instead, over a site's images, and maps every
    image of that site by the same linear map of optical density. On a crop of one cell, the per-image rule
    scales the cell's darkest nucleus to the target's darkness whatever it was, erasing hyperchromasia, a sign
    of malignancy; one map per site keeps a dark nucleus darker than a pale one.

    Example:
        >>> normalizer = StainNormalizer("macenko").fit(target_image)
        >>> normalised = normalizer(batch)                              # each image's stain measured alone
        >>> site = StainNormalizer("macenko").fit(target_image).fit_source(site_images)
        >>> normalised = site(batch)                                    # one map for the whole site
    """

    def __init__(self, method: Literal["macenko", "reinhard"] = "macenko", intensity: float = 240.0,
                 od_threshold: float = 0.15, percentile: float = 1.0, min_tissue_pixels: int = 64) -> None:
        import torchstain  # deferred: only stain normalisation needs it

        if method == "macenko":
            self._normalizer = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        elif method == "reinhard":
            self._normalizer = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        else:
            raise ConfigError(f"imageops.StainNormalizer: method must be 'macenko' or 'reinhard', got {method!r}")
        self.method = method
        self.intensity = intensity  # Macenko's Io, the transmitted light
        self.od_threshold = od_threshold  # Macenko's beta: pixels with OD below it are background
        self.percentile = percentile  # Macenko's alpha, robust extremes of the stain angles
        self.min_tissue_pixels = min_tissue_pixels
        self.num_failed = 0
        self.fitted = False
        self.source: tuple[torch.Tensor, torch.Tensor] | None = None  # (stain vectors, max concentrations), fit_source

    def fit(self, target: torch.Tensor) -> StainNormalizer:
        """Learn the target's stain vectors (Macenko) or LAB statistics (Reinhard).

        ``target`` is one image (3, H, W) or a batch (B, 3, H, W) of equal-size images, fitted as one.
        """
        batch = target.unsqueeze(0) if isinstance(target, torch.Tensor) and target.ndim == 3 else target
        if isinstance(batch, torch.Tensor) and batch.ndim == 4 and batch.shape[1] == 3:
            batch = _lit_fields(batch)
        image = self._to_torchstain(batch, "fit")
        image = torch.cat(list(image), dim=-1)  # a batch side by side: one set of statistics
        reason = self._cannot_normalise(image)
        if reason is None:
            try:
                self._fit_one(image)
            except (RuntimeError, IndexError, ValueError) as err:
                reason = f"{type(err).__name__}: {err}"
        if reason is not None:
            raise DataError(f"imageops.StainNormalizer.fit: the {self.method} target cannot be used ({reason}); "
                            "pick a target image with stained tissue")
        self.fitted = True
        return self

    def fit_source(self, images: torch.Tensor) -> StainNormalizer:
        """Measure the stain the images to be normalised come in, once, over ``images`` (a batch of one site's
        equal-size images, fitted as one, as ``fit`` fits a target); every later image is mapped as stained
        so. Macenko only."""
        if self.method != "macenko":
            raise ConfigError("imageops.StainNormalizer.fit_source: a site-wide source is Macenko's; got "
                              f"{self.method!r}")
        site = StainNormalizer("macenko", self.intensity, self.od_threshold, self.percentile, self.min_tissue_pixels)
        try:
            site.fit(images)
        except DataError:
            raise DataError(f"imageops.StainNormalizer.fit_source: the {len(images)} images cannot be measured (too "
                            "little stained tissue); give the site's images with stained cells") from None
        self.source = (site._normalizer.HERef, site._normalizer.maxCRef)
        return self

    def mapping(self, site: StainNormalizer) -> StainNormalizer:
        """A new normaliser to this one's target from the stain ``site`` was fitted to, as ``fit_source`` on
        ``site``'s images would measure it: each site and each target fitted once serve every pair of them."""
        if self.method != "macenko" or site.method != "macenko" or not site.fitted:
            raise ConfigError("imageops.StainNormalizer.mapping: both must be fitted Macenko normalisers")
        mapped = StainNormalizer.from_state_dict(self.state_dict())
        mapped.source = (site._normalizer.HERef, site._normalizer.maxCRef)
        return mapped

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise ConfigError("imageops.StainNormalizer: call .fit(target_image) before normalising")
        xf, dtype = _to_float(x, "StainNormalizer")
        images = self._to_torchstain(xf, "__call__")
        out, failed = [], 0
        for image, original in zip(images, xf, strict=True):
            normalised = None
            if self.source is not None:
                normalised = self._map_from_source(image)
            elif self._cannot_normalise(image) is None:
                try:
                    normalised = self._normalise_one(image)
                except (RuntimeError, IndexError, ValueError):
                    normalised = None
            if normalised is None or not bool(torch.isfinite(normalised).all()):
                failed += 1
                out.append(original)
            else:
                out.append(normalised.to(device=xf.device, dtype=xf.dtype))
        if failed:
            self.num_failed += failed
            warnings.warn(f"StainNormalizer({self.method}): {failed} of {len(images)} images could not be "
                          f"normalised (too little stained tissue, e.g. blank fields) and were returned unchanged "
                          f"({self.num_failed} so far)", RuntimeWarning, stacklevel=2)
        return _restore(torch.stack(out), dtype)

    def state_dict(self) -> dict[str, Any]:
        """The fitted target as plain numbers (JSON-able), for ``load_state_dict`` in another process."""
        if not self.fitted:
            raise ConfigError("imageops.StainNormalizer: nothing to save before .fit(target_image)")
        norm = self._normalizer
        target = ({"HERef": norm.HERef.tolist(), "maxCRef": norm.maxCRef.tolist()} if self.method == "macenko"
                  else {"target_means": norm.target_means.tolist(), "target_stds": norm.target_stds.tolist()})
        if self.source is not None:
            target |= {"HESource": self.source[0].tolist(), "maxCSource": self.source[1].tolist()}
        return {"method": self.method, "intensity": self.intensity, "od_threshold": self.od_threshold,
                "percentile": self.percentile, **target}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StainNormalizer:
        normalizer = cls(state["method"], state["intensity"], state["od_threshold"], state["percentile"])
        norm = normalizer._normalizer
        if state["method"] == "macenko":
            norm.HERef, norm.maxCRef = torch.tensor(state["HERef"]), torch.tensor(state["maxCRef"])
            if "HESource" in state:
                normalizer.source = (torch.tensor(state["HESource"]), torch.tensor(state["maxCSource"]))
        else:
            norm.target_means, norm.target_stds = torch.tensor(state["target_means"]), torch.tensor(state["target_stds"])
        normalizer.fitted = True
        return normalizer

    # torchstain's conventions: (3, H, W) float in 0..255 on the CPU; its outputs are 0..255 ints, HWC.

    def _to_torchstain(self, x: torch.Tensor, op: str) -> torch.Tensor:
        xf, _ = _to_float(x, f"StainNormalizer.{op}")
        return (xf.detach().float().cpu() * 255.0).round_()

    def _cannot_normalise(self, image: torch.Tensor) -> str | None:
        if self.method == "macenko":
            od = -torch.log((image + 1.0) / self.intensity)
            tissue = int((od >= self.od_threshold).all(dim=0).sum())
            if tissue < self.min_tissue_pixels:
                return f"{tissue} stained pixels, need {self.min_tissue_pixels}"
            return None
        from torchstain.torch.utils import lab_split, rgb2lab

        stds = [float(channel.std()) for channel in lab_split(rgb2lab(image / 255.0))]
        if min(stds) < 1e-3:
            return "a LAB channel is constant"
        return None

    def _fit_one(self, image: torch.Tensor) -> None:
        if self.method == "macenko":
            self._normalizer.fit(image, Io=self.intensity, alpha=self.percentile, beta=self.od_threshold)
        else:
            self._normalizer.fit(image)

    def _map_from_source(self, image: torch.Tensor) -> torch.Tensor:
        # Macenko's reconstruction (torchstain's normalize) with the site's stain in place of the image's own.
        # By hand because torchstain measures the source of every image it normalises and has no call that takes
        # one: concentrations by least squares on the source's stain vectors, scaled from the source's 99th
        # percentile to the target's, recomposed with the target's vectors. The optical density the two vectors
        # do not explain is added back as it was: a Pap or Romanowsky stain has more dyes than two (orange G,
        # light green, azure), and projecting onto two erased them, so a site mapped to its own stain came out
        # changed. Kept, a site mapped to itself comes out as it went in.
        stains, max_concentration = self.source
        od = -torch.log((image.reshape(3, -1) + 1.0) / self.intensity)
        concentrations = torch.linalg.lstsq(stains, od).solution
        unexplained = od - stains @ concentrations
        concentrations *= (self._normalizer.maxCRef / max_concentration)[:, None]
        target_od = self._normalizer.HERef @ concentrations + unexplained
        mapped = (self.intensity * torch.exp(-target_od) - 1.0).clamp_(0.0, 255.0)
        return mapped.reshape(image.shape).div_(255.0)

    def _normalise_one(self, image: torch.Tensor) -> torch.Tensor:
        if self.method == "macenko":
            hwc, _, _ = self._normalizer.normalize(image, Io=self.intensity, alpha=self.percentile,
                                                   beta=self.od_threshold, stains=False)
        else:
            hwc = self._normalizer.normalize(image)
        return hwc.permute(2, 0, 1).float().div_(255.0)


def stain_normalize(x: torch.Tensor, target: torch.Tensor,
                    method: Literal["macenko", "reinhard"] = "macenko") -> torch.Tensor:
    """One-off stain normalisation of ``x`` to ``target``; keep a fitted :class:`StainNormalizer` to reuse it."""
    return StainNormalizer(method).fit(target)(x)
