"""Can this field be judged at all? Focus, cellularity, obscuring blood and stain, from the image alone.

At the microscope a pathologist skips fields that are out of focus (whole or in part), hold too few
cells, are buried in blood, or are stained too faintly to read; a classifier that still calls N or P
on such a field gives false confidence. Each measure here is a number with a meaning, and
``assessable`` combines them with thresholds (``AdequacyThresholds``) and names the reason when false:

- ``focus``: how sharp the field's sharpest edges are: the median, over the 10% strongest gradients, of
  gradient magnitude divided by the local intensity range (9 px window). It is about 1 / edge width in
  px, so it depends neither on contrast nor, much, on magnification (optics, not cell size, set the
  width of an in-focus edge). ``in_focus_fraction``: the share of tiles with an edge (a local range of
  at least 25 grey levels) whose own focus reaches ``focus_min``: a field in focus on one side only
  scores about one half. Tiles are 64 px, or an eighth of a small field's shorter side (at least 32 px),
  so that a blurred band of a fifth of the field covers whole tiles.
- ``cellularity``: the fraction of the field covered by nuclei, i.e. by dark stained material (mean
  optical density above 0.6; haematoxylin-stained nuclei are the darkest structures of a smear).
- ``blood_fraction``: the fraction covered by red blood cells that no cell lies over, from a small
  segmenter that reads their shape and their hue relative to the field's nuclei, not their colour
  (``roseprior.blood``: real red cells are pink, grey-green or brown). A field mostly of blood, with
  its few cells among it, cannot be judged.
- ``stain_contrast``: the spread of optical density between the field's median and its 98th percentile:
  faint staining or an empty field leave little.

Written here because none of the field's libraries scores cytology adequacy; it uses scipy's filters
and, for blood, the segmenter of ``roseprior.blood``.
Thresholds were set on clean and defective synthetic fields (``roseprior synth --defects``) and
checked on the real ROSE examples; the README gives both.

    roseprior adequacy --images FOLDER --out adequacy.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["COLUMNS", "NOT_ASSESSABLE", "AdequacyThresholds", "FieldQuality", "add_parser", "assess_paths", "measure",
           "quality_cells"]

COLUMNS = ["path", "focus", "in_focus_fraction", "cellularity", "blood_fraction", "stain_contrast", "assessable",
           "reason"]
NOT_ASSESSABLE = "not assessable"  # what finetune.predict calls a flagged field instead of N or P
TILE = 64  # px: the unit of in_focus_fraction (smaller on fields under 512 px, see ``measure``)
EDGE_RANGE = 25.0  # grey levels: a window with less range holds no edge to measure
NUCLEUS_OD = 0.6  # mean optical density of nuclei (natural log units)


@dataclass
class AdequacyThresholds:
    """When a field is assessable; each key's failure gives its own reason."""

    focus_min: float = 0.16  # per tile; an in-focus edge spans a few px (about 0.3 on sharp fields)
    in_focus_min: float = 0.7  # share of tiles with edges that are in focus
    cellularity_min: float = 0.03  # share of the field covered by nuclei (real ROSE fields: 30-93%)
    # Share of the field covered by red blood cells that no cell lies over. Clean synthetic fields read up to
    # about 0.35 and the 12 real ROSE examples up to 0.48; fields buried in blood 0.87 and more.
    blood_max: float = 0.6
    stain_contrast_min: float = 0.45  # optical-density spread of the stain


@dataclass
class FieldQuality:
    focus: float
    in_focus_fraction: float
    cellularity: float
    blood_fraction: float
    stain_contrast: float
    assessable: bool
    reason: str  # empty when assessable; else every failed check, "; "-separated

    @property
    def reasons(self) -> list[str]:
        """The failed checks by name (``out of focus``, ``too few cells``, ...), without their numbers."""
        return [r.split(" (")[0] for r in self.reason.split("; ") if r]


def _edge_focus(gradient: np.ndarray, local_range: np.ndarray) -> float:
    edges = local_range >= EDGE_RANGE
    if edges.sum() < 20:
        return float("nan")
    g, r = gradient[edges], local_range[edges]
    strongest = g >= np.percentile(g, 90)
    return float(np.median(g[strongest] / r[strongest]))


_OPTICAL_DENSITY = -np.log(np.clip(np.arange(256, dtype=np.float32) / 255.0, 1e-3, 1.0))  # of each uint8 value


def measure(image: np.ndarray, thresholds: AdequacyThresholds | None = None) -> FieldQuality:
    """The measures and the verdict for one (H, W, 3) uint8 field."""
    from scipy import ndimage as ndi

    from roseprior.blood import blood_fraction
    from roseprior.scale import fill_unlit, unlit_mask

    t = thresholds or AdequacyThresholds()
    # Photographed through an eyepiece, the frame's unlit corners are no part of the field: read as glass, their
    # fading edge is no blurred edge, and the shares below are of the lit field (10 of the 12 real ROSE fields
    # under a round vignette read out of focus, and their blood share fell from up to 0.48 to 0.00).
    unlit = unlit_mask(image)
    if unlit is not None:  # fill_unlit(image, None) would look for the unlit part a second time
        image = fill_unlit(image, unlit)
    lit = 1.0 if unlit is None else float((~unlit).mean())
    gray = image[..., :3].mean(axis=2, dtype=np.float32)  # per-pixel planes only: no float copy of the field
    gradient = ndi.gaussian_gradient_magnitude(gray, 0.7)
    local_range = ndi.maximum_filter(gray, 9) - ndi.minimum_filter(gray, 9)
    focus = _edge_focus(gradient, local_range)
    height, width = gray.shape
    side = int(np.clip(min(height, width) // 8, TILE // 2, TILE))
    tiles = [_edge_focus(gradient[y : y + side, c : c + side], local_range[y : y + side, c : c + side])
             for y in range(0, max(1, height - side + 1), side) for c in range(0, max(1, width - side + 1), side)]
    measured = np.array([v for v in tiles if np.isfinite(v)])
    in_focus = float((measured >= t.focus_min).mean()) if measured.size else 0.0
    od_mean = sum(_OPTICAL_DENSITY[image[..., c]] for c in range(3)) / 3
    od_lit = od_mean if unlit is None else od_mean[~unlit]
    cellularity = float((od_lit > NUCLEUS_OD).mean())
    blood = min(1.0, blood_fraction(image) / lit)  # the glass painted in holds no blood
    contrast = float(np.percentile(od_lit, 98) - np.percentile(od_lit, 50))
    reasons = []
    if not np.isfinite(focus) or in_focus < t.in_focus_min:
        reasons.append(f"out of focus ({in_focus:.0%} of the field in focus, need {t.in_focus_min:.0%})")
    if cellularity < t.cellularity_min:
        reasons.append(f"too few cells (nuclei cover {cellularity:.1%}, need {t.cellularity_min:.1%})")
    if blood > t.blood_max:
        reasons.append(f"obscured by blood ({blood:.0%} of the field, at most {t.blood_max:.0%})")
    if contrast < t.stain_contrast_min:
        reasons.append(f"stain too faint (contrast {contrast:.2f}, need {t.stain_contrast_min:.2f})")
    return FieldQuality(float(np.nan_to_num(focus)), in_focus, cellularity, blood, contrast, not reasons,
                        "; ".join(reasons))


def assess_paths(paths: Sequence[Path], thresholds: AdequacyThresholds | None = None, progress: bool = True
                 ) -> Iterator[tuple[Path, FieldQuality | None, str]]:
    """``(path, quality, "")`` per image, or ``(path, None, why)`` for one that cannot be read, with progress."""
    from roseprior.imageio import UnreadableImage, read_image
    from roseprior.progress import Progress

    with Progress(len(paths), "adequacy", unit="img", enabled=progress) as bar:
        for path in paths:
            try:
                yield path, measure(read_image(path), thresholds), ""
            except UnreadableImage as err:
                yield path, None, err.reason
            bar.update()


def quality_cells(q: FieldQuality) -> list[str]:
    """``q`` as the CSV cells of ``COLUMNS`` after ``path`` (``roseprior adequacy``, ``finetune.predict``)."""
    return [f"{q.focus:.4f}", f"{q.in_focus_fraction:.4f}", f"{q.cellularity:.4f}", f"{q.blood_fraction:.4f}",
            f"{q.stain_contrast:.4f}", str(q.assessable).lower(), q.reason]


# ---------------------------------------------------------------------------------------------
# roseprior adequacy
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adequacy", help="say which fields can be judged (focus, cells, blood, stain)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of fields (searched recursively)")
    parser.add_argument("--out", required=True, help="CSV to write: " + ", ".join(COLUMNS))
    for f in dataclasses.fields(AdequacyThresholds):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default, help=f"default {f.default}")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from roseprior.checkpoint import atomic_write_csv
    from roseprior.data import find_images
    from roseprior.errors import DataError

    thresholds = AdequacyThresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AdequacyThresholds)})
    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the path of the CSV file to write")
    paths = find_images(args.images)
    rows, flagged, start = [], 0, time.perf_counter()
    for path, q, error in assess_paths(paths, thresholds):
        rows.append([str(path), *quality_cells(q)] if q else [str(path), *[""] * (len(COLUMNS) - 2),
                                                               f"unreadable: {error}"])
        flagged += q is None or not q.assessable
    atomic_write_csv(out, COLUMNS, rows)
    rate = len(paths) / max(time.perf_counter() - start, 1e-9)
    print(f"adequacy: {len(paths) - flagged} of {len(paths)} field(s) assessable, {flagged} flagged "
          f"({rate:.1f} fields/s) -> {out}")
    return 0

