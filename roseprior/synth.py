"""Synthetic ROSE fields: the platform's embedded default data set (``roseprior synth``).

Every command of the platform runs on a fresh machine with this data. A field of class N
shows cohesive, flat, orderly sheets of small round uniform nuclei ("honeycomb"); a field of
class P shows crowded, overlapping clusters of enlarged (1.5-3x), irregular, dark nuclei of
varied size and lost polarity, or a few atypical cells among many red blood cells. The label
lives in shape and arrangement; the acquisition (stain, magnification, white balance,
brightness, blur, noise, JPEG quality) is drawn independently of it from named domain
presets, so shortcut learning can be provoked on purpose with ``confound``.

Confound rule (``confound = p``): the chosen domains, in the order given, are split into a
first half A (``ceil(len / 2)`` domains) and a second half B. For each image, with
probability ``p`` its domain is drawn uniformly from its class's half (A for the first class,
N; B for the second, P); otherwise uniformly from all chosen domains. ``p = 0`` makes domain
and label independent; ``p = 1`` makes the domain half predict the label exactly.

Every image is seeded from ``(seed, class index, image index)`` alone, so a set is
byte-identical across runs, worker counts and orders, and image ``i`` of a class does not
depend on ``n_per_class``. Drawing code: ``roseprior/synth_render.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import math
import os
import shutil
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from roseprior.errors import ConfigError, DataError
from roseprior.synth_render import (
    BENIGN_RADIUS,
    CYTOPLASM,
    NUCLEUS,
    RBC,
    Acquisition,
    Scene,
    draw_scene,
    red_blood_cells,
    render,
)

__all__ = ["DOMAIN_PRESETS", "MANIFEST_COLUMNS", "add_parser", "default_dataset", "generate"]

# Named acquisition presets. Each value is a (low, high) range that every image draws from
# uniformly, so images within a domain still vary; the domains differ in where the ranges sit.
DOMAIN_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    # Deep blue-violet Diff-Quik, 40x-like, neutral light, sharp, good JPEG.
    "site_a": dict(magnification=(0.9, 1.25), stain_hue=(0.0, 0.35), stain_strength=(0.95, 1.2),
                   background_density=(0.35, 0.7), rbc_tint=(0.2, 0.5), wb_r=(0.96, 1.02),
                   wb_g=(0.97, 1.02), wb_b=(0.98, 1.04), brightness=(0.95, 1.05),
                   blur_sigma=(0.0, 0.5), noise_sigma=(1.0, 2.5), jpeg_quality=(88, 95)),
    # Magenta and pale: weak stain, bright lamp, warm balance, grey-green red cells.
    "site_b": dict(magnification=(0.85, 1.15), stain_hue=(0.65, 1.0), stain_strength=(0.7, 0.9),
                   background_density=(0.5, 0.9), rbc_tint=(0.0, 0.25), wb_r=(1.0, 1.06),
                   wb_g=(0.95, 1.0), wb_b=(0.97, 1.03), brightness=(1.02, 1.12),
                   blur_sigma=(0.2, 0.8), noise_sigma=(1.0, 3.0), jpeg_quality=(78, 90)),
    # 20x-like (small cells, wide field), cool/greenish balance, softer focus, noisier.
    "site_c": dict(magnification=(0.5, 0.75), stain_hue=(0.3, 0.65), stain_strength=(0.85, 1.05),
                   background_density=(0.3, 0.6), rbc_tint=(0.3, 0.7), wb_r=(0.9, 0.96),
                   wb_g=(1.0, 1.05), wb_b=(1.0, 1.06), brightness=(0.9, 1.0),
                   blur_sigma=(0.3, 0.8), noise_sigma=(2.0, 4.0), jpeg_quality=(72, 88)),
    # 60x-like oil (big cells), heavy dark blue stain, dim lamp, strong JPEG compression.
    "site_d": dict(magnification=(1.4, 2.0), stain_hue=(0.1, 0.5), stain_strength=(1.15, 1.45),
                   background_density=(0.5, 0.9), rbc_tint=(0.5, 1.0), wb_r=(0.97, 1.03),
                   wb_g=(0.94, 0.99), wb_b=(1.0, 1.08), brightness=(0.85, 0.97),
                   blur_sigma=(0.3, 1.0), noise_sigma=(1.5, 3.5), jpeg_quality=(60, 78)),
}

DOMAIN_DESCRIPTIONS = {
    "site_a": "deep blue-violet stain, 40x-like, neutral light, sharp",
    "site_b": "magenta and pale, bright warm light, grey-green red cells",
    "site_c": "20x-like small cells, cool/greenish balance, soft focus, noisy",
    "site_d": "60x-like big cells, heavy dark stain, dim light, strong JPEG",
}

ACQUISITION_FIELDS = [f.name for f in dataclasses.fields(Acquisition) if f.name != "domain"]
MANIFEST_COLUMNS = ["path", "label", "domain", *ACQUISITION_FIELDS, "defect"]
# Fields a pathologist would not judge (issue 15), drawn independently of the class with ``defects``: defocus
# over the whole field or one side of it, too few cells, cells buried in blood, a stain too faint to read.
DEFECTS = ("blur", "partial_blur", "sparse", "blood", "faint")
DEFAULT_VERSION = "synth-default-v1"
DEFAULT_SETTINGS = dict(n_per_class=150, size=256, domains=None, confound=0.0, seed=0)


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def _choose_domain(rng: np.random.Generator, class_index: int, domains: list[str], confound: float) -> str:
    """The confound rule of the module docstring: the first class leans to half A, the other to B."""
    if confound > 0 and rng.random() < confound:
        half = math.ceil(len(domains) / 2)
        pool = domains[:half] if class_index == 0 else domains[half:]
        return pool[int(rng.integers(len(pool)))]
    return domains[int(rng.integers(len(domains)))]


def sample_acquisition(rng: np.random.Generator, domain: str) -> Acquisition:
    """Draw one image's acquisition parameters uniformly inside the domain's ranges."""
    preset = DOMAIN_PRESETS[domain]
    values: dict[str, Any] = {}
    for name in ACQUISITION_FIELDS:
        lo, hi = preset[name]
        values[name] = int(rng.integers(lo, hi + 1)) if name == "jpeg_quality" else round(float(rng.uniform(lo, hi)), 4)
    return Acquisition(domain=domain, **values)


def _scene(label: str, class_index: int, index: int, size: int, seed: int, domains: list[str],
           confound: float, zoom: float = 1.0) -> tuple[np.random.Generator, Acquisition, Scene]:
    rng = np.random.default_rng([seed, class_index, index])
    domain = _choose_domain(rng, class_index, domains, confound)
    acq = sample_acquisition(rng, domain)
    if zoom != 1.0:  # the same acquisition through another objective: cells drawn larger or smaller
        acq = dataclasses.replace(acq, magnification=round(acq.magnification * zoom, 6))
    return rng, acq, draw_scene(rng, label, size, acq.magnification)


def draw_defect(seed: int, class_index: int, index: int, rate: float) -> str:
    """``none`` or one of ``DEFECTS``, from a generator of its own: clean fields stay byte-identical."""
    if rate <= 0:
        return "none"
    rng = np.random.default_rng([seed, class_index, index, 15])
    return DEFECTS[int(rng.integers(len(DEFECTS)))] if rng.random() < rate else "none"


def _with_defect(defect: str, scene: Scene, acq: Acquisition, rng: np.random.Generator) -> Acquisition:
    """Damage a field as a bad slide or photograph would (severities a pathologist would reject)."""
    size = scene.layers.shape[1]
    if defect in ("sparse", "blood"):  # a few cells left in one patch: of an empty smear, or of a sea of blood
        ys, xs = np.mgrid[0:size, 0:size]
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        radius = 0.07 if defect == "sparse" else rng.uniform(0.12, 0.2)
        keep = ((ys - cy) ** 2 + (xs - cx) ** 2 < (radius * size) ** 2).astype(np.float32)
        scene.layers[NUCLEUS] *= keep
        scene.layers[CYTOPLASM] *= keep
    if defect == "blood":  # red blood cells over most of the field, the few cells among them
        count = int(rng.uniform(900, 1400) / acq.magnification**2)
        red_blood_cells(rng, size, BENIGN_RADIUS * size * acq.magnification, scene.layers, min(count, 6000))
        np.minimum(scene.layers[RBC], 1.2, out=scene.layers[RBC])
    elif defect == "blur":
        return dataclasses.replace(acq, blur_sigma=float(rng.uniform(3.0, 5.0)))
    elif defect == "faint":
        return dataclasses.replace(acq, stain_strength=round(acq.stain_strength * float(rng.uniform(0.15, 0.3)), 4))
    return acq


def _blur_one_side(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Defocus over 40-60% of the field, on a side drawn at random, with a soft edge (a tilted slide)."""
    from scipy.ndimage import gaussian_filter

    rgb = np.asarray(img, dtype=np.float32)
    size = rgb.shape[0]
    blurred = gaussian_filter(rgb, sigma=(4.0 * size / 256, 4.0 * size / 256, 0), truncate=3.0)
    ramp = np.clip((np.arange(size) - rng.uniform(0.4, 0.6) * size) / (0.05 * size) + 0.5, 0, 1)
    mask = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    mask = mask if rng.random() < 0.5 else 1.0 - mask
    return Image.fromarray(np.clip(rgb + mask * (blurred - rgb) + 0.5, 0, 255).astype(np.uint8))


def make_image(label: str, class_index: int, index: int, size: int, seed: int, domains: list[str],
               confound: float, zoom: float = 1.0, defect: str = "none") -> tuple[bytes, Acquisition]:
    """Encode one field as JPEG bytes; depends on (seed, class_index, index) and settings only."""
    img, acq, _ = render_field(label, class_index, index, size, seed, domains, confound, zoom, defect)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=acq.jpeg_quality)
    return buf.getvalue(), acq


def render_field(label: str, class_index: int, index: int, size: int, seed: int, domains: list[str],
                 confound: float, zoom: float = 1.0, defect: str = "none") -> tuple[Image.Image, Acquisition, Scene]:
    """One field before JPEG, with the scene it was drawn from (its layers are the ground truth)."""
    rng, acq, scene = _scene(label, class_index, index, size, seed, domains, confound, zoom)
    damage = np.random.default_rng([seed, class_index, index, 16])
    acq = _with_defect(defect, scene, acq, damage)
    img = render(scene, acq, rng)
    if defect == "partial_blur":
        img = _blur_one_side(img, damage)
    return img, acq, scene


def cell_mask(label: str, index: int, size: int = 256, seed: int = 0, domains: list[str] | None = None,
              confound: float = 0.0, classes: tuple[str, ...] = ("N", "P"), threshold: float = 0.05) -> np.ndarray:
    """(size, size) bool: where image ``{label}/{label}_{index:05d}.jpg`` of a set has cells.

    Nuclei or cytoplasm above ``threshold`` concentration, from the same scene the image was
    rendered from (red blood cells, debris and the smear background are not cells). The ground
    truth for checking that explanation maps (Grad-CAM, attention) sit on cells.
    """
    domains = _check_settings(1, size, domains, confound, tuple(classes))
    _, _, scene = _scene(label, list(classes).index(label), index, size, seed, domains, confound)
    return (scene.layers[NUCLEUS] > threshold) | (scene.layers[CYTOPLASM] > threshold)


def _make_job(job: tuple) -> tuple[str, bytes, Acquisition]:
    rel, label, class_index, index, size, seed, domains, confound, zoom, defect = job
    data, acq = make_image(label, class_index, index, size, seed, domains, confound, zoom, defect)
    return rel, data, acq


# ---------------------------------------------------------------------------------------------
# A whole set
# ---------------------------------------------------------------------------------------------


def _check_settings(n_per_class: int, size: int, domains: list[str] | None, confound: float,
                    classes: tuple[str, ...], workers: int = 1) -> list[str]:
    domains = list(domains) if domains else list(DOMAIN_PRESETS)
    unknown = [d for d in domains if d not in DOMAIN_PRESETS]
    if unknown:
        raise ConfigError(f"synth: unknown domain(s) {unknown}; choose from {sorted(DOMAIN_PRESETS)}")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"synth: domains {domains} lists a domain twice")
    if not 0.0 <= confound <= 1.0:
        raise ConfigError(f"synth: confound must be in [0, 1], got {confound}")
    if confound > 0 and len(domains) < 2:
        raise ConfigError("synth: confound > 0 needs at least two domains (one per half)")
    if n_per_class < 1:
        raise ConfigError(f"synth: n_per_class must be >= 1, got {n_per_class}")
    if workers < 1:
        raise ConfigError(f"synth: workers must be >= 1, got {workers}")
    if size < 32:
        raise ConfigError(f"synth: size must be >= 32 px, got {size}")
    if sorted(classes) != ["N", "P"]:
        raise ConfigError(f"synth: classes must be N and P (the morphologies drawn), got {classes}")
    return domains


MARKER = ".roseprior-synth"  # written by generate(): the only folders --overwrite may replace


def _prepare_out(out: Path, overwrite: bool) -> None:
    """An empty (or new) folder, or one an earlier ``generate`` wrote, emptied of exactly its own files."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"synth: output folder {out} is not empty; choose a new folder or pass --overwrite")
        if not (out / MARKER).is_file():
            raise DataError(f"synth: {out} was not written by `roseprior synth` (no {MARKER} file); refusing to "
                            "overwrite it: choose a new folder")
        if (out / "manifest.csv").is_file():
            with open(out / "manifest.csv", newline="") as fh:
                written = [out / row["path"] for row in csv.DictReader(fh)]
        else:  # an interrupted run: its images by name
            written = [p for name in ("N", "P") for p in out.glob(f"{name}/{name}_[0-9][0-9][0-9][0-9][0-9].jpg")]
        for path in written:  # its own images only: anything a user added stays
            if path.resolve().is_relative_to(out.resolve()):
                path.unlink(missing_ok=True)
        for name in ("manifest.csv", "preview.png", MARKER):
            (out / name).unlink(missing_ok=True)
        for name in ("N", "P"):
            if (out / name).is_dir() and not any((out / name).iterdir()):
                (out / name).rmdir()
    out.mkdir(parents=True, exist_ok=True)


def generate(out: str | Path, n_per_class: int = 100, size: int = 256, domains: list[str] | None = None,
             confound: float = 0.0, seed: int = 0, preview: bool = False, classes: tuple[str, ...] = ("N", "P"),
             workers: int = 1, overwrite: bool = False, progress: bool = True, zoom: float = 1.0,
             defects: float = 0.0) -> Path:
    """Write ``out/{N,P}/*.jpg`` and ``out/manifest.csv`` (plus ``preview.png``); returns ``out``.

    ``workers > 1`` renders in processes; the files do not change with it. ``defects``: the fraction of
    fields given one of ``DEFECTS`` (the manifest's ``defect`` column), whatever their class.
    """
    from roseprior.progress import Progress

    out = Path(out)
    domains = _check_settings(n_per_class, size, domains, confound, tuple(classes), workers)
    _prepare_out(out, overwrite)
    (out / MARKER).write_text("written by `roseprior synth`: `--overwrite` may replace this folder's images\n")
    for label in classes:
        (out / label).mkdir(exist_ok=True)
    if not 0.0 <= defects <= 1.0:
        raise ConfigError(f"synth: --defects must be a fraction in [0, 1]; got {defects}")
    jobs = [(f"{label}/{label}_{i:05d}.jpg", label, ci, i, size, seed, domains, confound, zoom,
             draw_defect(seed, ci, i, defects)) for ci, label in enumerate(classes) for i in range(n_per_class)]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    bar = Progress(len(jobs), "synth", unit="img", enabled=progress)
    try:
        results = pool.map(_make_job, jobs, chunksize=8) if pool else map(_make_job, jobs)
        for (rel, data, acq), job in zip(results, jobs, strict=True):
            bar.update()
            (out / rel).write_bytes(data)
            row = {"path": rel, "label": job[1], "domain": acq.domain}
            row.update({k: getattr(acq, k) for k in ACQUISITION_FIELDS}, defect=job[-1])
            rows.append(row)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    elapsed = time.perf_counter() - start
    if progress:
        print(f"synth: {len(jobs)} images of {size} px in {elapsed:.1f} s "
              f"({len(jobs) / max(elapsed, 1e-9):.1f} images/s) -> {out}", file=sys.stderr)
    # The manifest is written last: its presence marks a complete set.
    _write_manifest(out / "manifest.csv", rows)
    if preview:
        write_preview(out, rows)
    return out


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_preview(out: Path, rows: list[dict[str, Any]], per_class: int = 8, tile: int = 192) -> Path:
    """A contact sheet: one row of fields per class, each tile captioned with label and domain."""
    labels = sorted({r["label"] for r in rows})
    cols = min(per_class, max(sum(r["label"] == lab for r in rows) for lab in labels))
    caption = 14
    sheet = Image.new("RGB", (cols * tile, len(labels) * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for li, lab in enumerate(labels):
        picked = [r for r in rows if r["label"] == lab][:cols]
        for ci, row in enumerate(picked):
            with Image.open(out / row["path"]) as im:
                im = im.convert("RGB").resize((tile, tile), Image.BILINEAR)
            x, y = ci * tile, li * (tile + caption)
            sheet.paste(im, (x, y + caption))
            draw.text((x + 3, y + 1), f"{lab}  {row['domain']}  x{float(row['magnification']):.2f}", fill="black")
    path = out / "preview.png"
    sheet.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# The cached embedded default
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("ROSEPRIOR_CACHE") or Path.home() / ".cache" / "roseprior")


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock, so concurrent callers wait instead of generating twice.

    Where ``fcntl`` is missing (Windows) we go without: the rename below still keeps the
    final folder whole, the loser of the race just discards its copy.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _matches_generator(folder: Path) -> bool:
    """Whether the cached set's first image is what this generator makes now (a stale cache from an
    older version would otherwise be used silently, and masks from ``cell_mask`` would not fit it)."""
    settings = dict(DEFAULT_SETTINGS)
    label = "N"
    data, _ = make_image(label, 0, 0, settings["size"], settings["seed"],
                         _check_settings(1, settings["size"], settings["domains"], settings["confound"], ("N", "P")),
                         settings["confound"])
    path = folder / label / f"{label}_00000.jpg"
    return path.is_file() and path.read_bytes() == data


def default_dataset() -> Path:
    """The embedded default set, generated once into ``$ROSEPRIOR_CACHE/synth-default-v1``."""
    final = cache_dir() / DEFAULT_VERSION
    if (final / "manifest.csv").is_file() and _matches_generator(final):
        return final
    with _file_lock(final.with_name(final.name + ".lock")):
        if (final / "manifest.csv").is_file():
            if _matches_generator(final):
                return final  # another process finished it while we waited
            print(f"roseprior: {final} was made by an older generator; regenerating it", file=sys.stderr)
        print(f"roseprior: generating the default synthetic data set once into {final}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary data
        try:
            generate(tmp, **DEFAULT_SETTINGS)
            if final.exists():  # an incomplete leftover (no manifest): replace it
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "manifest.csv").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    domains = ", ".join(DOMAIN_PRESETS)
    presets = "\n".join(f"  {name:8s}{text}" for name, text in DOMAIN_DESCRIPTIONS.items())
    description = textwrap.fill(
        "Generate synthetic ROSE cytology fields as an ImageFolder tree OUT/N, OUT/P plus OUT/manifest.csv "
        "(path,label,domain and every acquisition parameter). N: flat honeycomb sheets of small uniform "
        "nuclei; P: crowded clusters of enlarged irregular dark nuclei, or a few atypical cells among red "
        "blood cells. Acquisition (stain, magnification, white balance, brightness, blur, noise, JPEG "
        "quality) is class-independent and drawn from named domain presets. The same seed gives "
        "byte-identical files.", width=90)
    confound = textwrap.fill(
        "confound rule: the chosen domains, in order, are split into a first half A and a second half B; "
        "with probability --confound an N image takes its domain from A and a P image from B, otherwise "
        "from all chosen domains.", width=90)
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic ROSE-like N/P image set (the embedded default data)",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"domain presets (parameters jittered per image):\n{presets}\n\n{confound}\n\n"
            "example: roseprior synth --out data/synth --n-per-class 500 --preview"
        ),
    )
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--n-per-class", type=int, default=100, help="images per class (default 100)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--domains", nargs="+", choices=list(DOMAIN_PRESETS), default=None, metavar="DOMAIN",
                        help=f"acquisition presets to draw from (default: all of {domains})")
    parser.add_argument("--confound", type=float, default=0.0,
                        help="probability that the domain follows the label (0 = independent; default 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--preview", action="store_true", help="also write OUT/preview.png, a contact sheet")
    parser.add_argument("--workers", type=int, default=1, help="render in this many processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier synth output in OUT (only a folder synth wrote)")
    parser.add_argument("--zoom", type=float, default=1.0,
                        help="magnify every field by this factor (0.25: 4x lower magnification); recorded per "
                             "image in the manifest's magnification column")
    parser.add_argument("--defects", type=float, default=0.0,
                        help="fraction of fields given a defect a pathologist would reject (blur, partial_blur, "
                             "sparse, blood, faint; the manifest's defect column), whatever their class")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    out = generate(args.out, n_per_class=args.n_per_class, size=args.size, domains=args.domains,
                   confound=args.confound, seed=args.seed, preview=args.preview, workers=args.workers,
                   overwrite=args.overwrite, zoom=args.zoom, defects=args.defects)
    print(f"wrote {2 * args.n_per_class} images and {out / 'manifest.csv'}")
    if args.preview:
        print(f"preview: {out / 'preview.png'}")
    return 0
