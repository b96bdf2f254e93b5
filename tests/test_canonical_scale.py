"""Physical scale as a property of every image: a manifest ``mpp`` column (or ``data.mpp``) and
``data.target_mpp`` bring every stage's images to one scale before any crop, and predict asks for
the fields' scale when the run was trained that way."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from roseprior.config import DataConfig, load_config
from roseprior.data import DecodedImages, ImageDataset, Sample, read_manifest, with_scales
from roseprior.errors import ConfigError, DataError
from roseprior.scale import resample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_magnifications(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each synthetic field twice: as drawn (0.5 um/px), and its centre through an objective twice as strong
    (0.25 um/px: the same pixel count, half the field of view)."""
    from roseprior.synth import generate

    tmp = tmp_path_factory.mktemp("mpp")
    data = generate(tmp / "fields", n_per_class=6, size=128, seed=3, progress=False)
    rows = []
    for path in sorted(data.rglob("*.jpg")):
        label = path.parent.name
        image = np.asarray(Image.open(path).convert("RGB"))
        big = tmp / "big" / label / path.name
        big.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(resample(image[32:96, 32:96], 2.0)).save(big, quality=95)
        rows += [(str(path), label, "0.5", path.stem), (str(big), label, "0.25", path.stem)]
    manifest = tmp / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "mpp", "group"), *rows])
    return manifest


def _pairs(samples: list[Sample], size: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset = ImageDataset(samples, image_size=size)
    return [(dataset[i][0].float(), dataset[i + 1][0].float()) for i in range(0, len(samples), 2)]


def test_one_field_at_two_magnifications_meets_at_the_canonical_scale(two_magnifications: Path) -> None:
    samples = read_manifest(two_magnifications, ["N", "P"])
    canonical = with_scales(samples, DataConfig(target_mpp=0.5))
    assert [s.zoom for s in canonical[:2]] == [1.0, 0.5]
    same = np.mean([(a - b).abs().mean().item() for a, b in _pairs(canonical, 64)])
    squeezed = np.mean([(a - b).abs().mean().item() for a, b in _pairs(samples, 64)])
    print(f"mean |difference| at the canonical scale {same:.2f}, squeezed into image_size {squeezed:.2f}")
    assert same < 6.0 and squeezed > 5 * same
    # At a finer canonical scale the whole field doubles, the enlarged one stays; windows are cut from them.
    finer = with_scales(samples[:2], DataConfig(target_mpp=0.25))
    decoded = DecodedImages(finer)
    assert (decoded[0][0].shape[1:], decoded[1][0].shape[1:]) == ((256, 256), (128, 128))
    assert ImageDataset(finer, image_size=96)[0][0].shape == (3, 96, 96)
    # A field smaller than image_size is mirrored out to it, not stretched.
    coarse = with_scales(samples[:1], DataConfig(target_mpp=2.0))
    assert DecodedImages(coarse)[0][0].shape[1:] == (32, 32)
    assert ImageDataset(coarse, image_size=64)[0][0].shape == (3, 64, 64)


def test_random_windows_move_and_centred_ones_do_not(two_magnifications: Path) -> None:
    samples = with_scales(read_manifest(two_magnifications, ["N", "P"])[:1], DataConfig(target_mpp=0.25))
    torch.manual_seed(0)
    random = ImageDataset(samples, image_size=64, random_window=True)
    centred = ImageDataset(samples, image_size=64)
    assert torch.equal(centred[0][0], centred[0][0])
    assert any(not torch.equal(random[0][0], random[0][0]) for _ in range(5))


def test_scales_come_from_the_row_then_the_config_and_bad_ones_name_the_file(tmp_path: Path) -> None:
    rows = [Sample("a.jpg", 0, extra={"mpp": "0.5"}), Sample("b.jpg", 1, extra={"relative_scale": "2"}),
            Sample("c.jpg", 1)]
    zooms = [s.zoom for s in with_scales(rows, DataConfig(target_mpp=0.25, mpp=1.0))]
    assert zooms == [2.0, 0.5, 4.0]
    assert [s.zoom for s in with_scales(rows, DataConfig())] == [None] * 3  # no target: as before
    with pytest.raises(DataError, match="c.jpg has no scale.*data.mpp"):
        with_scales(rows, DataConfig(target_mpp=0.25))
    with pytest.raises(DataError, match="a.jpg: mpp 'x' is not a positive number"):
        with_scales([Sample("a.jpg", extra={"mpp": "x"})], DataConfig(target_mpp=0.25))
    with pytest.raises(ConfigError, match="data.target_mpp"):
        DataConfig(target_mpp=-1.0)
    with pytest.raises(ConfigError, match="framing.*cell"):  # a camera's fields or crops cut around one cell
        load_config(DataConfig, None, ["framing=tile"])


def test_finetune_predict_and_pretrain_run_at_the_canonical_scale(two_magnifications: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.__main__ import main as finetune_main
    from finetune.predict import main as predict_main
    from pretrain.__main__ import main as pretrain_main
    from roseprior.splits import resolve_splits

    cfg = DataConfig(root=str(two_magnifications), target_mpp=0.5, image_size=64, group_by="group")
    split = resolve_splits(cfg)
    assert {s.zoom for part in split.splits.values() for s in part} == {1.0, 0.5}
    assert split.fingerprint != resolve_splits(DataConfig(root=str(two_magnifications), image_size=64,
                                                          group_by="group")).fingerprint
    common = [f"data.root={two_magnifications}", "data.target_mpp=0.5", "data.image_size=64", "data.group_by=group",
              "train.batch_size=4"]
    out = tmp_path / "ft"
    assert finetune_main(["--config", str(REPO / "configs/finetune/msht_tiny_cpu.yaml"), *common, f"out_dir={out}",
                          "train.epochs=1", "train.max_steps=2", "cam.enabled=false", "sam=off",
                          "data.framing=cell"]) == 0
    scale = json.loads((out / "best.json").read_text())["scale"]
    assert scale["target_mpp"] == 0.5 and 0.5 <= scale["input_per_native"] <= 1.0
    assert scale["reference"]["framing"] == "cell"  # --scale auto zooms its reference as the images were framed
    fields = two_magnifications.parent / "big"
    assert predict_main(["--ckpt", str(out), "--images", str(fields), "--out", str(tmp_path / "p.csv")]) == 2
    assert "--mpp VALUE" in capsys.readouterr().err
    assert predict_main(["--ckpt", str(out), "--images", str(fields), "--out", str(tmp_path / "p.csv"),
                         "--mpp", "0.25"]) == 0
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 12
    assert pretrain_main(["--config", str(REPO / "configs/pretrain/simclr_msht_tiny_cpu.yaml"), *common,
                          f"out_dir={tmp_path / 'pt'}", "train.max_steps=2"]) == 0


def test_capture_days_at_two_zooms_measured_into_a_manifest_that_finetune_trains_from(tmp_path: Path) -> None:
    """The seed's bench: the capture software's zoom changed from one day to the next, and each day's fields sit in
    class folders. ``roseprior scale --per-folder`` against the first day gives each day one scale (its class
    folders count with it) and writes a labelled manifest, from which finetune trains at one scale."""
    from finetune.__main__ import main as finetune_main
    from roseprior.cli import main as cli
    from roseprior.imageio import read_image
    from roseprior.splits import resolve_splits
    from roseprior.synth import generate

    data = generate(tmp_path / "drawn", n_per_class=10, size=192, domains=["site_a"], seed=5, progress=False)
    for day, factor in (("day1", 1.0), ("day2", 2.0)):  # day 2: objects twice as large, the frame following them
        for path in sorted(data.rglob("*.jpg")):
            out = tmp_path / "bench" / day / path.parent.name / f"{path.stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(resample(read_image(path), factor)).save(out)
    manifest = tmp_path / "manifests" / "scales.csv"
    manifest.parent.mkdir()
    assert cli(["scale", "--images", str(tmp_path / "bench"), "--reference", str(tmp_path / "bench" / "day1"),
                "--per-folder", "--out", str(manifest)]) == 0
    rows = list(csv.DictReader(manifest.open()))
    day_scale = {day: {float(r["relative_scale"]) for r in rows if f"/{day}/" in r["path"]} for day in ("day1", "day2")}
    assert all(len(values) == 1 for values in day_scale.values()), day_scale  # one per day, not per class folder
    (day1,), (day2,) = day_scale.values()
    assert 0.8 < day1 < 1.25 and 1.6 < day2 / day1 < 2.5, day_scale
    cfg = DataConfig(root=str(manifest), target_mpp=1.0, image_size=96)
    samples = [s for part in resolve_splits(cfg).splits.values() for s in part]
    assert len(samples) == 40 and {Path(s.path).parent.name for s in samples} == {"N", "P"}
    assert all(s.zoom == pytest.approx(1 / (day2 if "/day2/" in s.path else day1), rel=1e-3) for s in samples)
    assert all(s.label == ["N", "P"].index(Path(s.path).parent.name) for s in samples)
    assert finetune_main(["--config", str(REPO / "configs/finetune/msht_tiny_cpu.yaml"), f"data.root={manifest}",
                          "data.target_mpp=1.0", "data.image_size=96", f"out_dir={tmp_path / 'ft'}",
                          "train.batch_size=4", "train.epochs=1", "train.max_steps=2", "cam.enabled=false",
                          "sam=off"]) == 0


def test_scale_manifest_keeps_the_sites_and_the_split_the_folders_gave(tmp_path: Path) -> None:
    """Labelled data from two sites at two magnifications, laid out as every stage reads it (its own split, one
    folder per site). The manifest ``roseprior scale`` writes for ``data.target_mpp`` must keep what the layout
    said: each image's site (the probes' robustness index and ``train.batch_by_domain`` need it) and the user's
    split (else every stage would split the CSV anew), with one scale per site across its split folders. A
    manifest given as ``--images`` keeps its own columns."""
    from roseprior.cli import main as cli
    from roseprior.imageio import read_image
    from roseprior.splits import resolve_splits
    from roseprior.synth import generate

    data = generate(tmp_path / "drawn", n_per_class=8, size=192, domains=["site_a"], seed=6, progress=False)
    paths = sorted(data.rglob("*.jpg"))
    layout = {}  # image -> (split, site)
    for i, path in enumerate(paths):
        split = ("train", "train", "val", "test")[i % 4]
        for site, factor in (("site_a", 1.0), ("site_b", 2.0)):  # site b's objects twice as large
            out = tmp_path / "data" / split / site / path.parent.name / f"{path.stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(resample(read_image(path), factor)).save(out)
            layout[out.resolve()] = (split, site)
    manifest = tmp_path / "scales.csv"
    assert cli(["scale", "--images", str(tmp_path / "data"), "--reference", str(tmp_path / "data" / "train" / "site_a"),
                "--per-folder", "--out", str(manifest)]) == 0
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == len(layout) and {"domain", "split", "label", "relative_scale"} <= set(rows[0])
    for row in rows:
        assert (row["split"], row["domain"]) == layout[(tmp_path / row["path"]).resolve()], row
    site_scale = {site: {r["relative_scale"] for r in rows if r["domain"] == site} for site in ("site_a", "site_b")}
    assert all(len(values) == 1 for values in site_scale.values()), site_scale  # one per site, not per split folder
    (site_a,), (site_b,) = site_scale.values()
    assert 1.6 < float(site_b) / float(site_a) < 2.5, site_scale
    splits = resolve_splits(DataConfig(root=str(manifest), target_mpp=1.0, image_size=96))
    assert splits.source == f"the 'split' column of {manifest}"
    for name, part in splits.splits.items():
        assert sorted(Path(s.path).resolve() for s in part) == sorted(p for p, (split, _) in layout.items()
                                                                      if split == name)
        assert {s.domain for s in part} == {"site_a", "site_b"}
        assert all(s.zoom == pytest.approx(1 / float(site_b if s.domain == "site_b" else site_a)) for s in part)
    # A manifest as --images: its own columns (a slide group, a stain name) stay; a stale scale is replaced.
    source = tmp_path / "data" / "slides.csv"
    with source.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group", "stain", "relative_scale"])
        for i, row in enumerate(rows[:6]):
            writer.writerow([str((tmp_path / row["path"]).resolve()), row["label"], f"slide{i // 2}", "pap", "9.9"])
    assert cli(["scale", "--images", str(source), "--reference", str(tmp_path / "data" / "train" / "site_a"),
                "--out", str(tmp_path / "slides_scales.csv")]) == 0
    measured = read_manifest(tmp_path / "slides_scales.csv", ["N", "P"])
    assert [s.group for s in measured] == ["slide0", "slide0", "slide1", "slide1", "slide2", "slide2"]
    assert all(s.extra["stain"] == "pap" and float(s.extra["relative_scale"]) < 4 for s in measured)


def test_finetune_warns_when_its_test_split_is_at_another_magnification(tmp_path: Path) -> None:
    """The issue's second table: a test split photographed at another magnification, squeezed into the model's
    input as the training images were, scores what it scores; finetune says why and what to do, naming the site
    when the data has one. A test split at the training magnification is not warned about, nor a site whose own
    training images were at its magnification."""
    from finetune.__main__ import main as finetune_main
    from roseprior.imageio import read_image
    from roseprior.synth import generate

    data = generate(tmp_path / "drawn", n_per_class=8, size=192, domains=["site_a"], seed=9, progress=False)
    paths = sorted(data.rglob("*.jpg"))
    # (test zoom, the test split's site, a site of the training split whose images share the test zoom)
    arms = {"same": (1.0, "", ""), "zoomed": (2.0, "", ""), "new_site": (2.0, "site_x", ""),
            "trained_site": (2.0, "site_b", "site_b")}
    for name, (test_zoom, test_site, zoomed_train_site) in arms.items():
        rows = []
        for i, path in enumerate(paths):
            split = ("train", "train", "val", "test")[i % 4]
            site = test_site if split == "test" else (zoomed_train_site if i % 8 == 0 else "site_a" * bool(test_site))
            image = read_image(path)
            out = tmp_path / name / path.parent.name / f"{path.stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            zoomed = split == "test" or (site and site == zoomed_train_site)
            Image.fromarray(resample(image, test_zoom) if zoomed else image).save(out)
            rows.append((str(out), path.parent.name, split, site))
        manifest = tmp_path / name / "manifest.csv"
        with manifest.open("w", newline="") as fh:
            csv.writer(fh).writerows([("path", "label", "split", "domain"), *rows])
        out_dir = tmp_path / f"ft_{name}"
        assert finetune_main(["--config", str(REPO / "configs/finetune/msht_tiny_cpu.yaml"), f"data.root={manifest}",
                              "data.image_size=96", f"out_dir={out_dir}", "train.batch_size=4", "train.epochs=1",
                              "train.max_steps=1", "cam.enabled=false", "sam=off"]) == 0
        warnings = [w for w in json.loads((out_dir / "metrics.json").read_text())["warnings"] if "magnification" in w]
        if name in ("same", "trained_site"):
            assert warnings == [], (name, warnings)
        else:
            assert len(warnings) == 1 and "--scale auto" in warnings[0], warnings
            assert ("of site_x" in warnings[0]) == (name == "new_site"), warnings
            assert 1.6 < float(warnings[0].split("objects ")[1].split("x")[0]) < 2.5, warnings
