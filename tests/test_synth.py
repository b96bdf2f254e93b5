"""The synthetic ROSE generator: reproducible files, honest manifests, and a label that lives in
morphology (shape, size, arrangement of nuclei) rather than in colour."""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roseprior import synth
from roseprior.cli import main as cli_main
from roseprior.errors import ConfigError, DataError


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def morph_set(tmp_path_factory) -> Path:
    """60 fields per class at 192 px, all domains: enough for 5-fold cross-validated probes."""
    out = tmp_path_factory.mktemp("synth") / "set"
    return synth.generate(out, n_per_class=60, size=192, seed=0, preview=True, progress=False)


# ---------------------------------------------------------------------------------------------
# Files, manifest, determinism
# ---------------------------------------------------------------------------------------------


def test_manifest_columns_counts_and_images(morph_set: Path):
    rows = _manifest(morph_set)
    assert list(rows[0]) == synth.MANIFEST_COLUMNS
    for column in ("path", "label", "domain", "magnification", "stain_hue", "wb_r", "brightness",
                   "blur_sigma", "noise_sigma", "jpeg_quality"):
        assert column in rows[0]
    assert sum(r["label"] == "N" for r in rows) == 60 and sum(r["label"] == "P" for r in rows) == 60
    assert {r["domain"] for r in rows} == set(synth.DOMAIN_PRESETS)
    for r in rows[::17]:
        path = morph_set / r["path"]
        assert path.parent.name == r["label"] and path.suffix == ".jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (192, 192) and im.mode == "RGB"
        preset = synth.DOMAIN_PRESETS[r["domain"]]
        lo, hi = preset["magnification"]
        assert lo <= float(r["magnification"]) <= hi
    assert len(list(morph_set.rglob("*.jpg"))) == 120


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    a = _files(synth.generate(tmp_path / "a", n_per_class=4, size=96, seed=3, progress=False))
    b = _files(synth.generate(tmp_path / "b", n_per_class=4, size=96, seed=3, progress=False, workers=2))
    c = _files(synth.generate(tmp_path / "c", n_per_class=4, size=96, seed=4, progress=False))
    assert a == b  # also across worker counts
    assert a.keys() == c.keys()
    differing = [k for k in a if k.endswith(".jpg") and a[k] != c[k]]
    assert len(differing) == 8


def test_image_depends_on_its_index_not_on_set_size(tmp_path: Path):
    small = synth.generate(tmp_path / "s", n_per_class=2, size=64, seed=1, progress=False)
    large = synth.generate(tmp_path / "l", n_per_class=5, size=64, seed=1, progress=False)
    assert (small / "P/P_00001.jpg").read_bytes() == (large / "P/P_00001.jpg").read_bytes()


def test_preview_is_a_png_contact_sheet(morph_set: Path):
    with Image.open(morph_set / "preview.png") as im:
        assert im.format == "PNG"
        assert im.width >= 4 * 96 and im.height >= 2 * 96
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert arr.std() > 10  # images, not a blank canvas


# ---------------------------------------------------------------------------------------------
# Domains and the confound
# ---------------------------------------------------------------------------------------------


def _domain_predicts_label(rows: list[dict[str, str]], domains: list[str]) -> float:
    """Accuracy of 'domain in the first half => N' (the confound rule's halves)."""
    half_a = set(domains[: (len(domains) + 1) // 2])
    return float(np.mean([(r["domain"] in half_a) == (r["label"] == "N") for r in rows]))


@pytest.mark.parametrize(("confound", "lo", "hi"), [(0.9, 0.85, 1.0), (0.0, 0.3, 0.7)])
def test_confound_ties_domain_to_label(tmp_path: Path, confound: float, lo: float, hi: float):
    domains = ["site_a", "site_b", "site_c", "site_d"]
    out = synth.generate(tmp_path / "c", n_per_class=50, size=48, domains=domains, confound=confound,
                         seed=0, progress=False)
    acc = _domain_predicts_label(_manifest(out), domains)
    assert lo <= acc <= hi, acc


def test_domain_choice_and_bad_settings(tmp_path: Path):
    out = synth.generate(tmp_path / "one", n_per_class=3, size=48, domains=["site_b"], progress=False)
    assert {r["domain"] for r in _manifest(out)} == {"site_b"}
    with pytest.raises(ConfigError, match="site_z"):
        synth.generate(tmp_path / "bad", n_per_class=1, size=48, domains=["site_z"], progress=False)
    with pytest.raises(ConfigError, match="two domains"):
        synth.generate(tmp_path / "bad", n_per_class=1, size=48, domains=["site_a"], confound=0.5, progress=False)
    with pytest.raises(ConfigError, match="confound"):
        synth.generate(tmp_path / "bad", n_per_class=1, size=48, confound=1.5, progress=False)
    # A non-empty folder is never overwritten silently.
    with pytest.raises(DataError, match="not empty"):
        synth.generate(out, n_per_class=1, size=48, progress=False)
    synth.generate(out, n_per_class=1, size=48, progress=False, overwrite=True)
    assert len(list(out.rglob("*.jpg"))) == 2 and len(_manifest(out)) == 2


# ---------------------------------------------------------------------------------------------
# The label is morphology, not colour
# ---------------------------------------------------------------------------------------------


def _colour_features(img: np.ndarray) -> np.ndarray:
    pixels = img.reshape(-1, 3).astype(np.float32)
    return np.concatenate([pixels.mean(0), pixels.std(0)])


def _shape_features(img: np.ndarray) -> np.ndarray:
    """Nucleus count, size, size uniformity and outline regularity from a threshold.

    The red channel stands in for the nuclear stain: every stain preset's nuclei absorb red
    most. A three-class Otsu split (background, red cells and cytoplasm, nuclei) keeps only
    the darkest class, so fields full of red blood cells do not flood the mask.
    """
    from skimage.filters import threshold_multiotsu
    from skimage.measure import label, regionprops

    red = img[..., 0].astype(np.float32)
    mask = red < threshold_multiotsu(red, classes=3)[0]
    regions = [r for r in regionprops(label(mask)) if r.area >= 4]
    if not regions:
        return np.zeros(7)
    areas = np.array([r.area for r in regions], dtype=np.float64)
    return np.array([
        np.log(len(regions)),
        np.log(areas.mean()),
        areas.std() / areas.mean(),
        np.mean([r.solidity for r in regions]),
        np.mean([r.eccentricity for r in regions]),
        np.log(areas.max() / np.median(areas)),
        mask.mean(),
    ])


def _cv_balanced_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, labels, cv=folds, scoring="balanced_accuracy").mean())


def test_classes_differ_by_morphology_not_colour(morph_set: Path):
    rows = _manifest(morph_set)
    colour, shape, labels = [], [], []
    for r in rows:
        with Image.open(morph_set / r["path"]) as im:
            img = np.asarray(im.convert("RGB"))
        colour.append(_colour_features(img))
        shape.append(_shape_features(img))
        labels.append(r["label"] == "P")
    labels = np.array(labels)
    colour_acc = _cv_balanced_accuracy(np.array(colour), labels)
    shape_acc = _cv_balanced_accuracy(np.array(shape), labels)
    assert colour_acc <= 0.65, f"colour statistics alone predict the label: {colour_acc:.3f}"
    # The colour probe itself works: it reads the acquisition domain (magenta site_b vs the rest).
    magenta = np.array([r["domain"] == "site_b" for r in rows])
    assert _cv_balanced_accuracy(np.array(colour), magenta) >= 0.8
    assert shape_acc >= 0.85, f"nucleus shape features do not separate the classes: {shape_acc:.3f}"


# ---------------------------------------------------------------------------------------------
# The cached default and the command line
# ---------------------------------------------------------------------------------------------


def test_default_dataset_is_built_once_and_survives_concurrent_callers(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ROSEPRIOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synth, "DEFAULT_SETTINGS", dict(n_per_class=3, size=48, domains=None, confound=0.0, seed=0))
    # A half-written folder from a killed run has no manifest and must be replaced.
    leftover = tmp_path / "cache" / synth.DEFAULT_VERSION / "N"
    leftover.mkdir(parents=True)
    (leftover / "N_00000.jpg").write_bytes(b"truncated")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(synth.default_dataset())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] == tmp_path / "cache" / synth.DEFAULT_VERSION
    root = results[0]
    assert len(_manifest(root)) == 6 and len(list(root.rglob("*.jpg"))) == 6
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]
    stamp = (root / "manifest.csv").stat().st_mtime_ns
    assert synth.default_dataset() == root and (root / "manifest.csv").stat().st_mtime_ns == stamp


def test_default_dataset_from_an_older_generator_is_regenerated(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("ROSEPRIOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synth, "DEFAULT_SETTINGS", dict(n_per_class=2, size=48, domains=None, confound=0.0, seed=0))
    root = synth.default_dataset()
    fresh = (root / "N" / "N_00000.jpg").read_bytes()
    (root / "N" / "N_00000.jpg").write_bytes(b"an image from an older generator")
    assert synth.default_dataset() == root
    assert (root / "N" / "N_00000.jpg").read_bytes() == fresh
    assert "older generator" in capsys.readouterr().err


def test_cell_mask_marks_the_cells_of_the_rendered_image(tmp_path: Path):
    """Cells absorb light: the mask's pixels are darker than the rest, in every domain."""
    from PIL import Image

    root = synth.generate(tmp_path / "set", n_per_class=4, size=128, seed=3, progress=False)
    for label in ("N", "P"):
        for index in range(4):
            mask = synth.cell_mask(label, index, size=128, seed=3)
            gray = np.asarray(Image.open(root / label / f"{label}_{index:05d}.jpg").convert("L"), dtype=float)
            assert mask.shape == (128, 128) and 0.02 < mask.mean() < 0.98
            assert gray[mask].mean() < gray[~mask].mean() - 15, (label, index)
    # Another seed lays out other cells: the mask belongs to its image.
    assert (synth.cell_mask("P", 0, size=128, seed=3) != synth.cell_mask("P", 0, size=128, seed=4)).mean() > 0.05


def test_cli_writes_a_set_and_reports_bad_input(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--n-per-class", "2", "--size", "48", "--preview"]) == 0
    assert len(_manifest(out)) == 4 and (out / "preview.png").is_file()
    assert cli_main(["synth", "--out", str(out), "--n-per-class", "2", "--size", "48"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["synth", "--out", str(out), "--domains", "site_z"])


def test_defects_are_recorded_leave_clean_fields_untouched_and_damage_as_named(tmp_path: Path):
    """The known defects of issue 15 (a field a pathologist would not judge), independent of the class."""
    import csv

    from scipy import ndimage as ndi

    from roseprior.synth import DEFECTS, generate, make_image

    clean = generate(tmp_path / "clean", n_per_class=20, size=96, seed=4, progress=False)
    mixed = generate(tmp_path / "mixed", n_per_class=20, size=96, seed=4, defects=0.6, progress=False)
    rows = list(csv.DictReader((mixed / "manifest.csv").open()))
    kinds = {r["defect"] for r in rows}
    assert kinds <= {"none", *DEFECTS} and len(kinds) >= 5
    for row in rows:  # a field without a defect is the same field, byte for byte
        if row["defect"] == "none":
            assert (mixed / row["path"]).read_bytes() == (clean / row["path"]).read_bytes()
    assert {r["defect"] for r in csv.DictReader((clean / "manifest.csv").open())} == {"none"}

    def field(defect: str, index: int = 3) -> np.ndarray:
        data, _ = make_image("P", 1, index, 128, 4, ["site_a"], 0.0, defect=defect)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)

    def sharpness(x: np.ndarray) -> float:
        return float(ndi.gaussian_laplace(x.mean(2), 1.0).std())

    def density(x: np.ndarray) -> np.ndarray:  # optical density of the red channel: nuclei absorb red
        return -np.log(np.clip(x[..., 0] / 255, 1e-3, 1))

    good = field("none")
    assert sharpness(field("blur")) < 0.5 * sharpness(good)
    half = field("partial_blur")
    sides = [sharpness(half[:, :64]) / sharpness(good[:, :64]), sharpness(half[:, 64:]) / sharpness(good[:, 64:]),
             sharpness(half[:64]) / sharpness(good[:64]), sharpness(half[64:]) / sharpness(good[64:])]
    assert min(sides) < 0.6 and max(sides) > 0.8  # one side defocused, the other not
    assert (density(field("sparse")) > 0.5).mean() < 0.5 * (density(good) > 0.5).mean()
    assert density(field("faint")).mean() < 0.5 * density(good).mean()
    def covered(x: np.ndarray) -> float:  # fraction of the field under stained material
        return float((-np.log(np.clip(x / 255, 1e-3, 1)).mean(-1) > 0.35).mean())

    assert covered(field("blood")) > covered(good) + 0.2  # red cells over much of the field
