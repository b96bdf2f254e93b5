"""How large an image's cells appear: a physical-scale estimate from the nuclei, relative to a reference set.

A change of magnification rescales every object; nuclei are the objects every cytology field has.
``nucleus_size`` measures them without segmenting each one: the hematoxylin channel (Ruifrok &
Johnston's stain deconvolution, skimage's ``rgb2hed``) is thresholded (Otsu), and the 90th
percentile of the distance transform inside the mask is a size (px) that scales with the nuclei,
robust to touching nuclei and to small debris. Images whose nuclei are tiny are measured upsampled,
so pixel discretisation does not bias them.

The measure is not exactly proportional to magnification: resampling blurs small nuclei and merges
neighbours. ``ScaleReference`` therefore calibrates it on a reference set (e.g. the training images):
the reference is zoomed by known factors as a camera would see it through other objectives
as its images were framed (``zoom_as_framed``), measured at each, and an image's relative scale is read off
that curve (analysis by synthesis). Fields photographed by a camera keep their frame: a stronger objective
fills it with the centre of the field (``camera_zoom``). Crops cut around one cell follow the cell: at any
magnification the crop holds the whole cell and grows with it (a plain resample). ``relative_scale``
2.0 means objects appear twice as large as in the reference. Written here because no library of the stack estimates magnification.

    roseprior scale --images FOLDER --reference FOLDER --out scales.csv
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FRAMINGS", "ScaleReference", "acquisition_folder", "add_parser", "camera_zoom", "fields_scale",
           "fill_unlit", "folder_scale", "is_off_scale", "nucleus_size", "resample", "sampled_scale", "shared_scale",
           "spread_images", "tile_batches", "training_scale", "training_tiles", "typical", "unlit_mask", "windows",
           "zoom_as_framed"]

PERCENTILE = 90
DARK_FLOOR = 0.04  # of full scale: the darkest a channel is taken to be (optical density at most 1.4)
# The measure's version, recorded with every reference: a reference measured otherwise cannot be read with it.
MEASURE_VERSION = 2
WORKING_SIZE = 8.0  # px: a measure below this is repeated on an upsampled copy
# The most pixels one measure looks at, upsampled copy included: a larger field is measured on a reduced copy or
# on windows spread over it (``nucleus_size``), within 4% of the whole field's measure on real ROSE and synthetic
# mosaics of 5-9 MP. Without a bound, a 4000 x 4000 camera field with 3-px nuclei (a weak objective) was
# upsampled 4x whole: 9.7 GB and 38 s for one field (2 s and 1 GB now).
MEASURED_PIXELS = 2048 * 2048
MEASURED_WINDOWS = 16  # windows of a field larger than MEASURED_PIXELS: a grid of 4 x 4 over its extent
UPSAMPLED_WINDOWS = 64  # and for its upsampled measure, whose nuclei are small: a finer grid samples more of it
MIN_WINDOW = 256  # px as measured (upsampled): a window spans at least 20 of the nuclei it measures below 12 px
# Prediction at the training scale: tiles per forward pass, and the most pixels of a field resampled at once
# (``training_tiles``), so that neither the tiles of a large field nor its resampled copy are held whole.
TILE_BATCH = 32
RESAMPLED_PIXELS = 4096 * 4096
# The frame outside the lit field of view (an eyepiece's round field photographed through it, a shutter's edge):
# regions darker than UNLIT of the field's background that touch the frame's border and cover MIN_UNLIT of it,
# with a band of UNLIT_MARGIN of the frame's shorter side around them (the vignette's soft edge, which a dimmed
# field would otherwise read as stain). Measured as it is, the unlit corners read as one huge nucleus: the 12 real
# ROSE fields under a round vignette read 2.5-3.5x of themselves framed whole (1.04-1.08x read as glass).
UNLIT = 0.06
MIN_UNLIT = 0.03
UNLIT_MARGIN = 0.06
# A reference's curve is measured at every calibration scale on CURVE_IMAGES of its images; its level, the size at
# 1.0, on up to REFERENCE_IMAGES. A camera's field holds hundreds of nuclei, but a crop cut around one cell holds
# one: 32 CRIC cells put a split's level 19% above that of its 3,543 training cells (4.73 against 3.97 px), and its
# own test cells then read 0.71x, past SAME_SCALE, and lost 10 points with --scale auto.
CURVE_IMAGES = 32
REFERENCE_IMAGES = 512
# Wide enough for fields 0.5x-2x of the reference zoomed 0.25x-4x: outside it an estimate is clamped.
CALIBRATION_SCALES = tuple(float(s) for s in np.geomspace(1 / 8, 8, 25))
# The slope of log size against log scale below which the curve is taken as flat: there a measure's error of
# 5% would be a scale error of over 20% (the floor where nuclei are a pixel or two grew at 0.1 on synthetic fields).
MIN_GROWTH = 0.25
# The share of a set's values dropped at each end before averaging their logs: the midmean (``typical``).
TRIM = 0.25
# A folder read within this factor of the training scale is taken at it: the estimate's own error on the median
# image reaches 15%, and correcting noise cost CRIC 3 points of balanced accuracy on unshifted test cells.
SAME_SCALE = 1.2
# Fields shown to a model squeezed whole are checked on up to CHECK_FIELDS of each folder (or test split), and
# warned about when read OFF_SCALE or more from the training scale: further than the estimate's error on a folder
# and than malignancy alone moves one (synthetic P fields alone read 1.35x).
CHECK_FIELDS = 32
OFF_SCALE = 1.5
# How a set's images were framed (``data.framing``): "field", a camera's photograph of the smear; "cell", a crop
# cut around one cell.
FRAMINGS = ("field", "cell")


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """(H, W, 3) uint8 resized by ``factor``: ``imageops.resample`` (the one resampler) on a numpy field."""
    import torch

    from roseprior import imageops

    pixels = np.require(image[..., :3], requirements=["C", "W"])  # copies only a read-only or strided field
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    return imageops.resample(x, factor)[0].permute(1, 2, 0).numpy()


def camera_zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` as the same camera would take it through an objective ``factor`` times as strong: above 1
    the centre 1/``factor`` of the field fills the frame (cells at the border are cut, as they are at the
    microscope); below 1 the field shrinks to fewer pixels (the wider field's new content is unknown)."""
    if factor <= 1:
        return resample(image, factor)
    h, w = image.shape[:2]
    crop_h, crop_w = max(1, round(h / factor)), max(1, round(w / factor))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return resample(image[top : top + crop_h, left : left + crop_w], factor)


def zoom_as_framed(image: np.ndarray, factor: float, framing: str = "field") -> np.ndarray:
    """``image`` with its objects ``factor`` times as large, framed as the set it comes from: a camera's
    field keeps its frame (``camera_zoom``); a crop cut around a cell follows the cell and grows with it.

    Which one matters for single cells: CRIC crops resampled whole by 4x read 5.6x against a camera-framed
    reference (whose zoomed-in crops cut the one large nucleus, so its curve grows too slowly) and 4.1x against
    a reference framed like them (tests/test_scale.py)."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    return camera_zoom(image, factor) if framing == "field" else resample(image, factor)


def _starts(length: int, size: int, stride: int) -> np.ndarray:
    """Evenly spaced starts of ``size`` windows over ``length`` px, first and last flush with the ends, at most
    ``stride`` apart."""
    return np.linspace(0, length - size, 1 + -(-(length - size) // stride)).round().astype(int)


def tile_batches(image: np.ndarray, size: int, batch_size: int = TILE_BATCH) -> Iterator[Any]:
    """(T, 3, size, size) float batches in [0, 1] of the tiles covering ``image`` (H, W, 3), at most
    ``batch_size`` at a time: a side shorter than ``size`` is mirrored out to it (never stretched); a longer one
    gets evenly spaced tiles that overlap by at least half, so that anything no larger than half a tile lies
    whole in one of them. (Tiles that only touched cut the centred cell of a zoomed-out CRIC crop in four: 0.652
    against 0.717 balanced accuracy at 0.5×.)"""
    import torch

    h, w = image.shape[:2]
    pad_y, pad_x = max(0, size - h), max(0, size - w)
    if pad_y or pad_x:
        image = np.pad(image, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
                       mode="symmetric")
        h, w = image.shape[:2]
    stride = max(1, size // 2)
    starts = list(itertools.product(_starts(h, size, stride), _starts(w, size, stride)))
    for first in range(0, len(starts), batch_size):
        crops = [image[y : y + size, x : x + size] for y, x in starts[first : first + batch_size]]
        yield torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)


def training_tiles(image: np.ndarray, info: dict[str, Any] | None, scale: float, size: int,
                   batch_size: int = TILE_BATCH) -> Iterator[Any]:
    """``tile_batches`` of a field resampled to the scale its model was trained at, given ``scale``: how many
    times larger its objects appear than in the training fields (known, or a folder's ``shared_scale``).

    A field that would have more than ``RESAMPLED_PIXELS`` once resampled is resampled and tiled block by block:
    native blocks overlapping by a tile's extent, so that every tile-sized window of the field lies whole in one
    block, and memory follows the block rather than the field. (A 4000 x 4000 field at scale 0.5 is 8000 x 8000
    px at the training scale: 16,000 tiles of 128 px, 3 GB as one batch.)"""
    factor = (info or {}).get("input_per_native", 1.0) / float(scale)
    h, w = image.shape[:2]
    if h * w * factor**2 <= RESAMPLED_PIXELS:
        yield from tile_batches(resample(image, factor), size, batch_size)
        return
    tile = int(np.ceil(size / factor))  # a tile's extent in native px
    block = max(2 * tile, int(np.sqrt(RESAMPLED_PIXELS) / factor))
    for top, left in itertools.product(_starts(h, min(block, h), block - tile), _starts(w, min(block, w), block - tile)):
        yield from tile_batches(resample(image[top : top + block, left : left + block], factor), size, batch_size)


def windows(image: np.ndarray, max_pixels: int | None = None, count: int = MEASURED_WINDOWS,
            min_side: int = 1) -> list[np.ndarray]:
    """``image`` whole when it has at most ``max_pixels`` (``MEASURED_PIXELS``), else up to ``count`` (a square
    number) square views of it, no copies, on a grid spread evenly over it, together holding at most
    ``max_pixels`` (fewer and larger when ``min_side`` asks): a sample of its nuclei whose cost does not grow
    with the field."""
    max_pixels = MEASURED_PIXELS if max_pixels is None else max_pixels
    h, w = image.shape[:2]
    if h * w <= max_pixels:
        return [image]
    side = max(1, min(h, w, max(min_side, int(np.sqrt(max_pixels / count)))))
    per_axis = int(np.clip(np.sqrt(max_pixels) // side, 1, round(np.sqrt(count))))
    tops = np.unique(np.linspace(0, h - side, per_axis).round().astype(int))
    lefts = np.unique(np.linspace(0, w - side, per_axis).round().astype(int))
    return [image[top : top + side, left : left + side] for top in tops for left in lefts]


def _raw_size(parts: Sequence[np.ndarray]) -> float:
    """The measure on the pixels of ``parts`` (a field, or windows of one) taken together: one threshold for all
    of them, and the percentile over all their nuclei's distances. A window with no background (inside one
    nucleus) is left out: its distances would run to the window's far side."""
    import cv2
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.util import img_as_float

    # A channel read at 0 says the light fell below the camera's floor, not that the density is infinite: without
    # a floor, a darker exposure's clipped pixels (1.7% of a field) took Otsu's threshold above every nucleus,
    # and a synthetic site under a warmer, darker camera read 0.34x of itself (tests/test_scale.py).
    hematoxylin = [rgb2hed(np.maximum(img_as_float(part[..., :3]), DARK_FLOOR))[..., 0] for part in parts]
    values = np.concatenate([h.ravel() for h in hematoxylin])
    if float(values.max() - values.min()) < 1e-6:
        return float("nan")
    threshold = threshold_otsu(values)
    masks = [h > threshold for h in hematoxylin]
    # OpenCV's exact Euclidean transform (DIST_MASK_PRECISE): the distances of scipy's distance_transform_edt
    # (within 1e-6 px) at a fifth of its time on one thread, which was a quarter of a reference's build.
    inside = [cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[mask]
              for mask in masks if len(masks) == 1 or not mask.all()]
    inside = np.concatenate(inside) if inside else np.empty(0)
    return float(np.percentile(inside, PERCENTILE)) if inside.size else float("nan")


def unlit_mask(image: np.ndarray) -> np.ndarray | None:
    """Where the frame of ``image`` received no light (``UNLIT``: an eyepiece's round field of view, a shutter's
    edge), with its soft edge; None when it has no such part. Found on a copy of at most 1024 px a side, so its
    cost does not grow with the field."""
    from scipy import ndimage as ndi

    h, w = image.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / 1024)))
    thumb = image[::step, ::step]
    # the brightest channel; np.maximum over the three planes is ~10x faster than max(axis=-1) on uint8 pixels,
    # and every stage's reads pass here (roseprior.data.read_during_run)
    brightness = np.maximum(np.maximum(thumb[..., 0], thumb[..., 1]), thumb[..., 2]).astype(np.float32)
    glass = float(np.percentile(brightness, 95))  # the background: the brightest common level of the field
    if glass <= 0:
        return None
    labels, _ = ndi.label(brightness < UNLIT * glass)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    unlit = np.isin(labels, edge[edge > 0])
    if unlit.mean() < MIN_UNLIT:
        return None
    unlit = ndi.distance_transform_edt(~unlit) <= UNLIT_MARGIN * min(unlit.shape)
    if unlit.all():
        return None
    rows = np.minimum(np.arange(h) // step, unlit.shape[0] - 1)
    cols = np.minimum(np.arange(w) // step, unlit.shape[1] - 1)
    return unlit[rows[:, None], cols[None, :]]


def fill_unlit(image: np.ndarray, unlit: np.ndarray | None = None) -> np.ndarray:
    """``image`` with its ``unlit_mask`` (or ``unlit``) painted the colour of its background glass, so that it
    reads as an empty part of the field; ``image`` itself, not a copy, when it has none."""
    unlit = unlit_mask(image) if unlit is None else unlit
    if unlit is None:
        return image
    step = max(1, int(np.ceil(max(image.shape[:2]) / 1024)))  # the glass's colour from a copy of bounded size
    glass = np.percentile(image[::step, ::step, :3][~unlit[::step, ::step]], 98, axis=0)  # a field's brightest
    filled = image.copy()
    filled[..., :3][unlit] = glass.astype(image.dtype)
    return filled


def nucleus_size(image: np.ndarray) -> float:
    """A size in px that scales with the nuclei of ``image`` (NaN when it has no stained structure).

    The frame outside a lit field of view is read as background glass (``fill_unlit``). A field of more than
    ``MEASURED_PIXELS`` (a camera's frame) is measured within that budget, so memory and time do not grow with it:
    on a copy reduced to the budget when its nuclei are large enough there to be measured in proportion
    (2 x ``WORKING_SIZE``), else on ``windows`` of it, which small nuclei do not span."""
    image = fill_unlit(image)
    shrink = float(np.sqrt(image.shape[0] * image.shape[1] / MEASURED_PIXELS))
    if shrink > 1:
        reduced = _raw_size([resample(image, 1 / shrink)])
        if np.isfinite(reduced) and reduced >= 2 * WORKING_SIZE:
            return reduced * shrink
    size = _raw_size(windows(image, min_side=MIN_WINDOW))
    if np.isfinite(size) and size < WORKING_SIZE:
        up = min(8.0, 1.5 * WORKING_SIZE / max(size, 1.0))
        parts = windows(image, int(MEASURED_PIXELS / up**2), UPSAMPLED_WINDOWS, int(np.ceil(MIN_WINDOW / up)))
        size = _raw_size([resample(part, up) for part in parts]) / up
    return size


def typical(values: Iterable[float]) -> float:
    """The typical value of a set of sizes or scales: the mean of the middle half of their logs (NaN when none
    is finite and positive).

    Not the median: a set of fields mixes benign and malignant ones, whose enlarged nuclei read as
    magnification, so its values are bimodal and a median jumps from one mode to the other as the mix moves.
    A held-out synthetic site at 0.61x read 0.88x with medians (its benign fields 0.59x, its malignant ones 1.22x),
    within ``SAME_SCALE`` and so taken at the training scale; with the midmean it reads 0.73-0.79x. The midmean
    moves smoothly with the mix and still ignores a quarter of outliers at each end."""
    from scipy.stats import trim_mean

    values = np.asarray(list(values), dtype=float)
    logs = np.log(values[np.isfinite(values) & (values > 0)])
    return float(np.exp(trim_mean(logs, TRIM))) if logs.size else float("nan")


@dataclass
class ScaleReference:
    """The measure of a reference set zoomed by known factors as its images were framed (``framing``):
    ``sizes[i]`` at ``scales[i]``."""

    scales: list[float] = field(default_factory=list)
    sizes: list[float] = field(default_factory=list)
    images: int = 0
    framing: str = "field"
    version: int = MEASURE_VERSION

    @classmethod
    def build(cls, images: Sequence[np.ndarray], scales: Sequence[float] = CALIBRATION_SCALES,
              framing: str = "field") -> ScaleReference:
        sizes = [typical(nucleus_size(zoom_as_framed(img, s, framing)) for img in images) for s in scales]
        return cls(list(scales), sizes, len(images), framing)

    @classmethod
    def measured(cls, images: Iterable[np.ndarray], count: int, framing: str = "field") -> ScaleReference:
        """The reference of ``count`` images read one at a time: ``build``'s curve on ``CURVE_IMAGES`` of them
        spread over the set, levelled so that at 1.0 it reads the typical size of all of them (only the curve's
        images are held). The curve's shape needs few images; its level needs many nuclei (``REFERENCE_IMAGES``)."""
        from roseprior.data import spread_indices

        kept = set(spread_indices(count, CURVE_IMAGES))
        curve, level = [], []
        for index, image in enumerate(images):
            level.append(nucleus_size(image))
            if index in kept:
                curve.append(image)
        reference = cls.build(curve, framing=framing)
        one = int(np.argmin(np.abs(np.log(reference.scales))))
        ratio = typical(level) / reference.sizes[one] if curve else float("nan")
        if not np.isfinite(ratio) or ratio <= 0:  # no stain to measure: the curve as it is (NaN reads NaN)
            return replace(reference, images=len(level))
        return replace(reference, sizes=[size * ratio for size in reference.sizes], images=len(level))

    def relative_scale(self, image: np.ndarray, size: float | None = None) -> float:
        """How many times larger the objects of ``image`` appear than those of the reference (``size``: its
        ``nucleus_size`` when already measured)."""
        size = nucleus_size(image) if size is None else size
        if not np.isfinite(size) or not self.scales:
            return float("nan")
        readable = self._readable()
        log_sizes, log_scales = np.log(np.take(self.sizes, readable)), np.log(np.take(self.scales, readable))
        return float(np.exp(np.interp(np.log(size), log_sizes, log_scales)))  # clamped to the measurable ends

    def measurable(self) -> tuple[float, float]:
        """The scales the curve tells apart: the run of calibration scales around 1.0 over which the measure
        grows. Outside it an estimate is clamped to its end. Where the reference's nuclei shrink to a pixel or
        two (a 128-px field zoomed out 4x), the measure stops growing, and reading that flat part of the curve
        returned any scale below it (a synthetic folder at 0.25x read 0.14x)."""
        readable = self._readable()
        return float(self.scales[readable[0]]), float(self.scales[readable[-1]])

    def _readable(self) -> list[int]:
        """The calibration points the curve is read from, in order: from the point nearest 1.0 outwards, each
        next one whose size grows past the last kept one's at ``MIN_GROWTH`` at least. One point that does not
        is stepped over when the one after it does (a reference of a few large fields is noisy: six real ROSE
        fields dipped 2% at 1.41x, and every field zoomed 2x or 4x read 1.19x); a floor, flat over two steps,
        ends the run."""
        sizes, scales = np.asarray(self.sizes, dtype=float), np.asarray(self.scales, dtype=float)
        centre = int(np.argmin(np.abs(np.log(self.scales))))
        readable = [centre]
        for direction in (1, -1):
            last = centre
            while True:
                grown = [i for i in (last + direction, last + 2 * direction) if 0 <= i < len(sizes)
                         and np.log(sizes[i] / sizes[last]) / np.log(scales[i] / scales[last]) >= MIN_GROWTH]
                if not grown:
                    break
                last = grown[0]
                readable.append(last)
        return sorted(readable)

    def to_json(self) -> dict[str, Any]:
        return {"scales": self.scales, "sizes": self.sizes, "images": self.images, "framing": self.framing,
                "version": self.version, "measure": f"{PERCENTILE}th percentile of the hematoxylin-mask distance "
                f"transform (px), channels floored at {DARK_FLOOR}"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScaleReference:
        # A reference from before the framing was recorded was calibrated as a camera's fields; one from before
        # the version was recorded is version 1 (no dark floor).
        return cls(list(data["scales"]), list(data["sizes"]), int(data.get("images", 0)),
                   str(data.get("framing", "field")), int(data.get("version", 1)))


# ---------------------------------------------------------------------------------------------
# The training scale a run records, and new fields brought to it (finetune.predict)
# ---------------------------------------------------------------------------------------------


def training_scale(samples: Sequence[Any], image_size: int, target_mpp: float | None = None,
                   framing: str = "field") -> dict[str, Any]:
    """How a model saw its training images (``best.json``'s ``scale``): the median model-input pixels per
    native pixel, ``target_mpp`` when it was trained at a canonical scale, and a ``ScaleReference`` of the
    model inputs (their nuclei, zoomed as the images were framed: ``data.framing``; ``ScaleReference.measured``
    on up to ``REFERENCE_IMAGES`` of them) for ``--scale auto``. ``samples``: ``roseprior.data.Sample``s."""
    from roseprior.data import ImageDataset, spread_indices
    from roseprior.imageio import read_image

    picked = [samples[i] for i in spread_indices(len(samples), REFERENCE_IMAGES)]
    inputs = ImageDataset(picked, image_size=image_size)
    reference = ScaleReference.measured((inputs[i][0].permute(1, 2, 0).numpy() for i in range(len(inputs))),
                                        len(inputs), framing)
    if picked and picked[0].zoom is not None:  # trained at a canonical scale (data.target_mpp)
        return {"input_per_native": float(np.median([s.zoom for s in picked])), "target_mpp": target_mpp,
                "reference": reference.to_json()}
    shapes = [read_image(picked[i].path).shape[:2] for i in spread_indices(len(picked), CURVE_IMAGES)]
    return {"input_per_native": float(np.median([image_size / np.sqrt(h * w) for h, w in shapes])),
            "reference": reference.to_json()}


def fields_scale(info: dict[str, Any] | None, scale: str | float | None, mpp: float | None, source: str
                 ) -> str | float | None:
    """predict's ``--scale`` and ``--mpp`` as one relative scale (or ``"auto"``, or None: resize whole fields).
    ``scale``: ``"none"``, ``"auto"``, a value, or None when not given, which takes the new site's scale that
    ``roseprior adapt`` recorded (``site_scale``), if any. A run trained at a canonical scale never sees whole
    fields squeezed into its input."""
    from roseprior.errors import DataError

    site = (info or {}).get("site_scale")
    if scale is None and mpp is None and site is not None:
        return float(site)
    scale = None if scale == "none" else scale
    target = (info or {}).get("target_mpp")
    if mpp is not None:
        if target is None or scale is not None or not mpp > 0:
            raise DataError(f"--mpp needs a positive value, no --scale, and a run trained with data.target_mpp "
                            f"({source} has {target}); use --scale VALUE|auto instead")
        return info["input_per_native"] * target / mpp
    if scale is None and target is not None:
        raise DataError(f"{source} was trained at {target} micrometres per pixel: give the fields' scale "
                        "with --mpp VALUE, or --scale auto to estimate it from their nuclei")
    return scale


def shared_scale(fields: Iterable[np.ndarray], info: dict[str, Any] | None, source: str) -> tuple[float, int]:
    """One relative scale for fields taken alike (one folder: one site, session, objective), as ``--scale``
    takes it: the ``typical`` value of their estimates, and how many fields gave one.

    Magnification belongs to the acquisition, not to a field. Per field, the estimate also reads the enlarged
    nuclei of malignancy as magnification, and bringing each field to the training scale on its own would
    shrink them back toward benign size; one scale per folder keeps each field's nuclei as large, relative to
    its neighbours', as they are (505 CRIC test cells zoomed 2x: balanced accuracy 0.745 with one value per
    folder, 0.695 per field, 0.769 at the known zoom; benchmarks/shift_quality.py). A folder within
    ``SAME_SCALE`` of the training scale, and one whose fields have no stain to measure, is taken at the
    training scale (1.0)."""
    from roseprior.errors import DataError

    info = info or {}
    if "reference" not in info:
        raise DataError(f"--scale auto: {source} records no training scale; train it again, or give --scale VALUE")
    reference = ScaleReference.from_json(info["reference"])
    if reference.version != MEASURE_VERSION:
        raise DataError(f"--scale auto: {source} records a scale reference of an older measure (version "
                        f"{reference.version}, now {MEASURE_VERSION}); fine-tune it again, or give --scale VALUE")
    folder, count = folder_scale(reference.relative_scale(field) for field in fields)
    if not count:
        return 1.0, 0
    relative = float(info.get("input_per_native", 1.0) * folder)
    return (1.0 if abs(np.log(relative)) < np.log(SAME_SCALE) else relative), count


def spread_images(paths: Sequence[str | Path], limit: int | None = None,
                  on_read: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
    """The images at up to ``limit`` of ``paths`` spread over them (all of them without a limit; every folder, not
    the first), read one at a time; one that does not decode is skipped (whoever reads it next lists it).
    ``on_read()`` is called for each path tried (a progress bar)."""
    from roseprior.data import spread_indices
    from roseprior.imageio import UnreadableImage, read_image

    for index in spread_indices(len(paths), limit or len(paths)):
        try:
            yield read_image(paths[index])
        except UnreadableImage:
            pass
        if on_read is not None:
            on_read()


def sampled_scale(paths: Sequence[str | Path], info: dict[str, Any] | None, source: str, limit: int | None = None,
                  on_read: Callable[[], None] | None = None) -> tuple[float, int]:
    """``shared_scale`` of ``spread_images(paths, limit, on_read)``."""
    return shared_scale(spread_images(paths, limit, on_read), info, source)


def acquisition_folder(path: Path, classes: Sequence[str]) -> Path:
    """The folder of fields taken alike that the image at ``path`` belongs to, for one scale per folder: its own
    folder, less every folder on the way named after a class (``N/``, ``P/``) or a split (``train/``, ``val/``,
    ``test/``); case ignored. ``site_a/test/P/x.png`` belongs to ``site_a``.

    Class folders split one acquisition by diagnosis. Since the estimate also reads malignancy's enlarged nuclei
    as magnification, a scale per class folder would read the P folder larger than the N folder and bring each
    toward one size, erasing the difference the classifier must see (300 CRIC cells of each class: N 0.91x,
    P 1.04x, both 0.97x; zoomed 2x: 1.77x, 2.09x, 1.92x). Split folders split it by use: a scale per split would
    measure the same site apart on fewer fields, and bring its test fields to another scale than its training
    fields when the two estimates differ by their noise."""
    from roseprior.data import SPLITS

    parted = {name.casefold() for name in (*classes, *SPLITS)}
    return Path(*[part for part in Path(path).parent.parts if part.casefold() not in parted])


def is_off_scale(scale: float) -> bool:
    """Whether fields read at ``scale`` (relative to the training scale) are far enough off it to be warned about
    when they are shown to the model squeezed whole."""
    return bool(np.isfinite(scale) and abs(np.log(scale)) >= np.log(OFF_SCALE))


def folder_scale(estimates: Iterable[float]) -> tuple[float, int]:
    """The ``typical`` value of a folder's per-field estimates and how many there were (NaN, 0 when none): the
    one scale of fields taken alike, for ``shared_scale`` and ``roseprior scale --per-folder``."""
    values = np.array(list(estimates), dtype=float)
    measured = values[np.isfinite(values) & (values > 0)]
    return typical(measured), int(measured.size)


# ---------------------------------------------------------------------------------------------
# roseprior scale
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from roseprior.config import DataConfig

    parser = subparsers.add_parser(
        "scale", help="estimate each image's magnification relative to a reference set, from its nuclei",
        description=("Writes OUT (CSV): path (relative to OUT), what the layout of --images says of each image as "
                     "every stage reads it (label from class folders, domain from site folders, split from "
                     "train/val/test folders, a manifest's columns), relative_scale (1.0 = objects as large as in the "
                     "reference; 2.0 = twice as large), nucleus_px: a manifest every stage reads (with "
                     "data.target_mpp set). The reference is calibrated by resampling it by known factors."))
    parser.add_argument("--images", required=True,
                        help="folder of images to measure (searched recursively), or a manifest CSV of them")
    parser.add_argument("--reference", required=True, help="folder of images at the reference scale")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--max-reference", type=int, default=REFERENCE_IMAGES,
                        help=f"reference images whose nuclei set the level (default %(default)s; the curve over zooms "
                             f"is measured on {CURVE_IMAGES} of them)")
    parser.add_argument("--framing", choices=FRAMINGS, default="field",
                        help="how both sets were framed: field (a camera's photograph; a stronger objective shows "
                             "the centre of the same frame, the default) or cell (crops cut around one cell, which "
                             "grow with it)")
    parser.add_argument("--per-folder", action="store_true",
                        help="write each folder's typical value (midmean of logs) as the relative_scale of all its images: what a manifest "
                             "for data.target_mpp wants, since per image the estimate also reads enlarged malignant "
                             "nuclei as magnification (for the same reason, a folder of one case, one diagnosis, "
                             "reads its diagnosis too: keep cases of one acquisition under one folder)")
    parser.add_argument("--classes", nargs="+", default=DataConfig().classes,
                        help="folder names that are classes: an image in one is labelled with it, and with --per-folder "
                             "counts with the folder above it (default: %(default)s)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from roseprior.checkpoint import atomic_write_csv
    from roseprior.data import Sample, find_images, manifest_columns, manifest_row
    from roseprior.errors import DataError
    from roseprior.imageio import UnreadableImage, read_image
    from roseprior.progress import Progress
    from roseprior.splits import load_as_laid_out

    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the CSV file to write")
    reference_paths = find_images(args.reference)
    limit = max(1, args.max_reference)
    reference = ScaleReference.measured(spread_images(reference_paths, limit), min(limit, len(reference_paths)),
                                        args.framing)
    if not reference.images:
        raise DataError(f"--reference {args.reference}: no readable images")
    # What the folder's layout says of each image (label, site, its own split, a manifest's columns) goes into the
    # CSV with its scale, so that every stage reads the CSV as it read the folder.
    samples = load_as_laid_out(args.images, args.classes)
    rows: list[tuple[Sample, float, float, str]] = []  # sample, estimate, nucleus px, error
    with Progress(len(samples), "scale", unit="img") as progress:
        for sample in samples:
            try:
                image = read_image(sample.path)
                size = nucleus_size(image)  # measured once: relative_scale reads it off the reference's curve
                rows.append((sample, reference.relative_scale(image, size), size, ""))
            except UnreadableImage as err:
                rows.append((sample, float("nan"), float("nan"), err.reason))
            progress.update()
    if args.per_folder:  # one scale per folder: see shared_scale for why a manifest wants it
        folder_of = [acquisition_folder(Path(sample.path), args.classes) for sample, *_ in rows]
        folders: dict[Path, list[float]] = {}
        for folder, (_, estimate, _, _) in zip(folder_of, rows, strict=True):
            folders.setdefault(folder, []).append(estimate)
        per_folder = {folder: folder_scale(values)[0] for folder, values in folders.items()}
        rows = [(sample, per_folder[folder] if not error else estimate, size, error)
                for folder, (sample, estimate, size, error) in zip(folder_of, rows, strict=True)]
    measured = [replace(sample, extra={**sample.extra, "relative_scale": f"{estimate:.4f}" if np.isfinite(estimate) else "",
                                       "nucleus_px": f"{size:.3f}" if np.isfinite(size) else "", "error": error})
                for sample, estimate, size, error in rows]  # a scale the source already had is replaced
    columns = [c for c in manifest_columns(measured) if c not in ("relative_scale", "nucleus_px", "error")]
    columns += ["relative_scale", "nucleus_px", "error"]
    base = os.path.abspath(out.parent)
    atomic_write_csv(out, columns, (manifest_row(s, columns, args.classes, os.path.relpath(os.path.abspath(s.path), base))
                                    for s in measured))
    low, high = reference.measurable()
    print(f"roseprior scale: {len(samples)} image(s) measured against {reference.images} reference image(s), "
          f"which tell scales apart from {low:.3g}x to {high:.3g}x (an estimate outside is clamped) -> {out}",
          file=sys.stderr)
    return 0
