"""Export for the computer beside the microscope: ONNX and TorchScript graphs that match PyTorch, run
by ``finetune.predict --model``, with calibrated probabilities and the run's operating point; and the
calibration and operating-point fits themselves."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.__main__ import main
    from roseprior.synth import generate

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("export")
    data = generate(tmp / "data", n_per_class=10, size=64, seed=6, progress=False)
    out = tmp / "run"
    assert main(["--config", str(REPO / "configs" / "finetune" / "msht_tiny_cpu.yaml"), f"data.root={data}",
                 f"out_dir={out}", "data.image_size=64", "train.batch_size=4", "train.epochs=1", "train.max_steps=3",
                 "cam.enabled=false", "sam=off"]) == 0
    return out


def _reference(run: Path, x: torch.Tensor) -> np.ndarray:
    from finetune.model import load_classifier

    model, meta = load_classifier(run)
    with torch.no_grad():
        return (model(x) / meta["temperature"]).softmax(1).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_graph_matches_pytorch_at_a_real_field_size(fmt: str, run: Path, tmp_path: Path) -> None:
    from finetune.export import main
    from finetune.predict import load_predictor

    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    assert main(["--run", str(run), "--format", fmt, "--out", str(path), "--image-size", "384"]) == 0
    predictor = load_predictor(model=str(path))
    assert predictor.image_size == 384 and predictor.classes == ["N", "P"]
    meta = json.loads((run / "best.json").read_text())
    assert predictor.threshold == meta["decision"]["threshold"]
    x = torch.rand(3, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    got, expected = predictor.probabilities(x), _reference(run, x)
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def test_onnx_holds_no_resampling_and_carries_its_metadata(run: Path, tmp_path: Path) -> None:
    import onnx

    from finetune.export import export

    path = export(run, "onnx", tmp_path / "m.onnx", 384)
    graph = onnx.load(str(path))
    assert not [n for n in graph.graph.node if n.op_type == "Resize"], "the position embedding was not fixed"
    info = json.loads({p.key: p.value for p in graph.metadata_props}["roseprior"])
    assert info["image_size"] == 384 and info["mean"] and info["std"] and info["classes"] == ["N", "P"]
    assert info["temperature"] > 0 and 0 <= info["threshold"] <= 1
    # The 8 flips and quarter turns (decision.dihedral_mean, the default) go through one copy of the backbone.
    from finetune.model import load_classifier

    convs = sum(isinstance(m, torch.nn.Conv2d) for m in load_classifier(run)[0].modules())
    assert info["dihedral_mean"] is True
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == convs


def test_predict_with_the_onnx_export_writes_the_same_csv_as_pytorch(run: Path, tmp_path: Path) -> None:
    from finetune.export import main as export
    from finetune.predict import main as predict

    images = tmp_path / "fields"
    images.mkdir()
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    for src in sorted(Path(data).rglob("*.jpg"))[:6]:
        shutil.copy(src, images / src.name)
    assert export(["--run", str(run), "--out", str(tmp_path / "m.onnx")]) == 0  # the run's own 64 px
    assert predict(["--ckpt", str(run), "--images", str(images), "--out", str(tmp_path / "torch.csv")]) == 0
    assert predict(["--model", str(tmp_path / "m.onnx"), "--images", str(images), "--out", str(tmp_path / "onnx.csv")]) == 0
    a, b = (list(csv.DictReader((tmp_path / f).open())) for f in ("torch.csv", "onnx.csv"))
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 6
    for ra, rb in zip(a, b, strict=True):
        assert abs(float(ra["p_P"]) - float(rb["p_P"])) <= 1e-4 and ra["predicted"] == rb["predicted"]


def test_temperature_lowers_the_ece_of_an_overconfident_model() -> None:
    from roseprior.calibration import apply_temperature, fit_temperature
    from roseprior.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    honest = np.stack([np.zeros(2000), (2 * y - 1) * 1.0 + rng.normal(0, 1.2, 2000)], axis=1)
    overconfident = 6.0 * honest
    before = expected_calibration_error(y, apply_temperature(overconfident, 1.0))
    t = fit_temperature(overconfident, y)
    after = expected_calibration_error(y, apply_temperature(overconfident, t))
    assert 4.0 < t < 8.0 and after < before / 3, (t, before, after)


def test_the_operating_point_meets_its_target_as_specifically_as_can_be_with_a_margin() -> None:
    from roseprior.calibration import operating_point

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1)
    for target in (0.8, 0.9, 0.95, 1.0):
        point = operating_point(y, p, target)
        assert point["sensitivity"] >= target
        kept = np.sort(p[y == 1])[::-1][int(np.ceil(target * (y == 1).sum())) - 1]  # the highest rule's threshold
        assert (p[y == 1] >= np.nextafter(kept, 1.0)).mean() < target  # any higher misses the target
        assert point["specificity"] == (p[y == 0] < kept).mean()  # as specific as the highest rule
        negative = p[(y == 0) & (p < kept)].max()
        assert negative < point["threshold"] < kept  # on no field's own score: a margin either side
        log_odds = [np.log(v / (1 - v)) for v in (negative, point["threshold"], kept)]
        assert log_odds[1] - log_odds[0] == pytest.approx(log_odds[2] - log_odds[1])
    # A separable validation split: no negative near the positives, the threshold sits between the two groups.
    separable = operating_point(np.array([0, 0, 1, 1]), np.array([0.01, 0.02, 0.97, 0.99]), 0.95)
    assert 0.02 < separable["threshold"] < 0.97 and separable["specificity"] == 1.0


def test_temperature_stops_short_of_certainty_on_a_separable_split() -> None:
    """Validation the model separates: the plain likelihood drove T to its bound (0.085 here, 0.05 on a held-out
    synthetic run) and the probabilities to 1.0; against Platt's targets confidence stays below 1."""
    from roseprior.calibration import apply_temperature, fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    logits = np.stack([np.zeros(100), (2 * y - 1) * (3 + 5 * rng.random(100))], axis=1)  # margins 3-8
    t = fit_temperature(logits, y)
    p = apply_temperature(logits, t)
    assert t > 0.5 and p.max() < 1 - 1e-3, (t, p.max())
    assert (p.argmax(1) == y).all()  # the ranking and the calls at 0.5 are unchanged


def tiles(field: np.ndarray, size: int) -> torch.Tensor:
    """Every tile of ``field`` at once (``tile_batches`` gives them a batch at a time)."""
    from roseprior.scale import tile_batches

    return torch.cat(list(tile_batches(field, size)))


def test_tiles_cover_a_field_and_mirror_a_small_one() -> None:
    field = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    out = tiles(field, 64)
    assert out.shape == (12, 3, 64, 64)  # 3 rows x 4 columns, overlapping by at least half, edges included
    starts = [(y, x) for y in (0, 18, 36) for x in (0, 29, 57, 86)]
    for i, (y, x) in enumerate(starts):
        torch.testing.assert_close(out[i], torch.from_numpy(field[y:y + 64, x:x + 64]).permute(2, 0, 1).float() / 255)
    for top, left in [(0, 0), (34, 59), (68, 118), (50, 40)]:  # any half-tile window lies whole in one tile
        assert any(y <= top and top + 32 <= y + 64 and x <= left and left + 32 <= x + 64 for y, x in starts)
    assert tiles(field[:64, :96], 64).shape[0] == 2 and tiles(field[:64, :97], 64).shape[0] == 3
    small = tiles(field[:30, :40], 64)
    assert small.shape == (1, 3, 64, 64)  # mirrored out to the input size, not stretched
    centre = torch.from_numpy(field[:30, :40]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(small[0, :, 17:47, 12:52], centre)


def test_a_field_at_a_known_scale_is_predicted_at_the_training_scale(run: Path) -> None:
    """A field whose objects appear twice as large, given --scale 2, is brought back to the training scale:
    the same probabilities as the field itself at --scale 1."""
    from finetune.predict import field_probabilities, load_predictor
    from roseprior.imageio import read_image
    from roseprior.scale import resample

    predictor = load_predictor(ckpt=str(run))
    assert predictor.scale["input_per_native"] == pytest.approx(1.0)  # trained at its native 64 px
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    field = read_image(sorted(Path(data).rglob("*.jpg"))[0])
    p1, n1 = field_probabilities(predictor, field, 1.0)
    p2, n2 = field_probabilities(predictor, resample(field, 2.0), 2.0)
    assert (n1, n2) == (1, 1)
    assert np.abs(p1 - p2).max() < 0.02


def test_a_field_through_an_eyepiece_reaches_the_model_with_its_corners_painted_as_glass(
        run: Path, tmp_path: Path) -> None:
    """Predict (squeezed whole, and at the training scale) and the stages' dataset show the model an eyepiece
    photograph's unlit corners painted as glass (``fill_unlit``): it reads exactly as the same field painted
    beforehand, not as its black corners (which cost a CRIC classifier 0.21 of balanced accuracy)."""
    from PIL import Image

    from benchmarks.shift_quality import through_the_eyepiece
    from finetune.predict import load_predictor, predict_paths
    from roseprior.data import ImageDataset, Sample
    from roseprior.imageio import read_image
    from roseprior.scale import fill_unlit, unlit_mask

    predictor = load_predictor(ckpt=str(run))
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    fields = [through_the_eyepiece(read_image(p)) for p in sorted(Path(data).rglob("*.jpg"))[:4]]
    assert all(unlit_mask(f) is not None for f in fields)
    paths = {}
    for kind, images in (("eyepiece", fields), ("painted", [fill_unlit(f) for f in fields])):
        (tmp_path / kind).mkdir()
        paths[kind] = [tmp_path / kind / f"{i}.png" for i in range(len(images))]
        for path, image in zip(paths[kind], images, strict=True):
            Image.fromarray(image).save(path)  # lossless: the painted files hold exactly what predict paints
    for scale in (None, 1.0):
        through, painted = (predict_paths(predictor, paths[kind], scale=scale, progress=False)[0]
                            for kind in ("eyepiece", "painted"))
        for a, b in zip(paths["eyepiece"], paths["painted"], strict=True):
            np.testing.assert_allclose(through[a], painted[b], atol=1e-6)
    corners = torch.stack([torch.from_numpy(f) for f in fields]).permute(0, 3, 1, 2).float().div(255)
    black = predictor.probabilities(torch.nn.functional.interpolate(corners, size=predictor.image_size, mode="area"))
    assert np.abs(black - np.stack([painted[p] for p in paths["painted"]])).max() > 1e-4  # the corners are read
    seen = [ImageDataset([Sample(str(p))], image_size=64)[0][0] for kind in ("eyepiece", "painted") for p in paths[kind]]
    assert all(torch.equal(seen[i], seen[i + len(fields)]) for i in range(len(fields)))  # trained on them alike


def test_a_large_field_is_predicted_a_batch_of_tiles_at_a_time_and_block_by_block(
        run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A camera-sized field is never held whole at the training scale: its tiles reach the model a batch at a
    time (the same mean as all at once), and a field too large to resample whole is resampled in blocks that
    overlap by a tile, whose tiles give nearly the same probabilities."""
    from finetune.predict import field_probabilities, load_predictor
    from roseprior import scale
    from roseprior.imageio import read_image

    predictor = load_predictor(ckpt=str(run))
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    fields = [read_image(p) for p in sorted(Path(data).rglob("*.jpg"))[:16]]
    mosaic = np.concatenate([np.concatenate(fields[row * 4 : row * 4 + 4], axis=1) for row in range(4)])  # 256 px
    batches: list[int] = []
    model = predictor.model
    monkeypatch.setattr(predictor, "model", lambda x: batches.append(len(x)) or model(x))
    whole, count = field_probabilities(predictor, mosaic, 1.0)
    assert count == 49 and sum(batches) == 49 and max(batches) <= scale.TILE_BATCH  # 7 x 7 tiles
    np.testing.assert_allclose(whole, model(tiles(mosaic, 64)).mean(axis=0), atol=1e-5)

    resampled: list[int] = []
    resample = scale.resample
    monkeypatch.setattr(scale, "resample", lambda image, f: resampled.append(round(image.shape[0] * f)
                                                                             * round(image.shape[1] * f))
                        or resample(image, f))
    monkeypatch.setattr(scale, "RESAMPLED_PIXELS", 160 * 160)
    blocks, _ = field_probabilities(predictor, mosaic, 0.8)  # 320 px at the training scale: in 3 x 3 blocks
    assert len(resampled) == 9 and max(resampled) <= 160 * 160
    monkeypatch.setattr(scale, "RESAMPLED_PIXELS", 4096 * 4096)
    at_once, _ = field_probabilities(predictor, mosaic, 0.8)
    assert np.abs(blocks - at_once).max() < 0.05, (blocks, at_once)


@pytest.fixture(scope="module")
def site_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A classifier of 192-px synthetic fields of one site (in 64-px fields nuclei are 2 px across, too small to
    measure), and its data: class folders N/ and P/."""
    from finetune.__main__ import main as finetune
    from roseprior.synth import generate

    tmp = tmp_path_factory.mktemp("site_run")
    data = generate(tmp / "data", n_per_class=10, size=192, domains=["site_a"], seed=7, progress=False)
    run = tmp / "run"
    assert finetune(["--config", str(REPO / "configs" / "finetune" / "msht_tiny_cpu.yaml"), f"data.root={data}",
                     f"out_dir={run}", "data.image_size=128", "train.batch_size=4", "train.epochs=1",
                     "train.max_steps=2", "cam.enabled=false", "sam=off",
                     # one view: these tests are of the scale a folder is read at; the 8-view mean (the export
                     # tests' run) made every field's tiles cost 8 forward passes
                     "decision.dihedral_mean=false"]) == 0
    return run, data


def _auto_lines(err: str) -> list[str]:
    return sorted(line for line in err.splitlines() if line.startswith(("finetune.predict: --scale auto:",
                                                                           "finetune.predict: --scale site:")))


def test_scale_auto_estimates_one_scale_per_folder_and_brings_each_folder_back(
        site_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--scale auto: fields taken alike (one folder) share one estimate, the midmean of theirs; a folder whose
    objects appear twice as large reads about 2x the other, and its fields get about the same probabilities
    as the unzoomed ones. A per-field estimate would read enlarged malignant nuclei as magnification."""
    from PIL import Image

    from finetune.predict import main
    from roseprior.imageio import read_image
    from roseprior.scale import resample

    run, data = site_run
    for name, factor in (("native", 1.0), ("zoom2", 2.0)):
        (tmp_path / "fields" / name).mkdir(parents=True)
        for path in sorted(data.rglob("*.jpg"))[::2]:
            Image.fromarray(resample(read_image(path), factor)).save(tmp_path / "fields" / name / f"{path.stem}.png")
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    assert main(["--ckpt", str(run), "--images", str(tmp_path / "fields"), "--out", str(out), "--scale", "auto",
                 "--judge-all"]) == 0
    err = capsys.readouterr().err
    lines = _auto_lines(err)
    assert len(lines) == 2 and all("midmean of 10 of 10 fields" in line for line in lines), lines
    assert "warning: folders read" in err  # 2x apart: one case per folder would read so, and predict says
    native, zoomed = (float(line.split("appear ")[1].split("x")[0]) for line in lines)
    print("--scale auto, native and 2x folders:", native, zoomed)
    assert 0.6 < native < 1.6 and 1.6 < zoomed / native < 2.5, lines
    rows = {Path(r["path"]).relative_to(tmp_path / "fields"): r for r in csv.DictReader(out.open())}
    assert len(rows) == 20
    for folder, printed in (("native", native), ("zoom2", zoomed)):  # the CSV says what each field was taken at
        taken = [float(r["scale"]) for p, r in rows.items() if p.parts[0] == folder]
        assert len(taken) == 10 and len(set(taken)) == 1 and abs(taken[0] - printed) <= 0.0051, (folder, taken)
    gaps = [abs(float(rows[Path("native") / p.name]["p_P"]) - float(rows[Path("zoom2") / p.name]["p_P"]))
            for p in (tmp_path / "fields" / "native").iterdir()]
    assert np.median(gaps) < 0.1, gaps


def test_scale_auto_reads_class_folders_with_the_folder_above_them(
        site_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A labelled test set in class folders (site/N, site/P) is one acquisition: one scale for both. Per class
    folder, the P fields' enlarged nuclei read as magnification, and each class would be brought toward the
    other's size."""
    from PIL import Image

    from finetune.predict import load_predictor, main
    from roseprior.imageio import read_image
    from roseprior.scale import resample, shared_scale

    run, data = site_run
    for path in sorted(data.rglob("*.jpg")):
        folder = tmp_path / "site" / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(resample(read_image(path), 2.0)).save(folder / f"{path.stem}.png")
    predictor = load_predictor(ckpt=str(run))
    by_class = {c: shared_scale((read_image(p) for p in sorted((tmp_path / "site" / c).iterdir())), predictor.scale,
                                predictor.source)[0] for c in ("N", "P")}
    print("--scale auto per class folder:", by_class)
    assert by_class["P"] / by_class["N"] > 1.15, by_class  # the reason: malignancy reads as magnification
    capsys.readouterr()
    assert main(["--ckpt", str(run), "--images", str(tmp_path / "site"), "--out", str(tmp_path / "p.csv"),
                 "--scale", "auto", "--judge-all"]) == 0
    lines = _auto_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{tmp_path / 'site'}:" in lines[0] and "of 20 fields" in lines[0], lines
    both = float(lines[0].split("appear ")[1].split("x")[0])
    assert by_class["N"] < both < by_class["P"], (by_class, both)


def test_scale_site_takes_folders_of_one_case_each_at_one_scale(
        site_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Folders of one case each (one diagnosis) at the training scale: per folder, the positive cases' enlarged
    nuclei read as magnification, and their fields would be shrunk toward benign size; --scale site takes every
    field given at one scale, between the two."""
    from PIL import Image

    from finetune.predict import CASE_SPREAD, main
    from roseprior.imageio import read_image

    run, data = site_run
    for label in ("N", "P"):
        for path in sorted((data / label).glob("*.jpg")):
            folder = tmp_path / "cases" / f"case_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(read_image(path)).save(folder / f"{path.stem}.png")
    estimates, warned = {}, {}
    for mode in ("auto", "site"):
        capsys.readouterr()
        out = tmp_path / f"{mode}.csv"
        assert main(["--ckpt", str(run), "--images", str(tmp_path / "cases"), "--out", str(out), "--scale", mode,
                     "--judge-all"]) == 0
        err = capsys.readouterr().err
        lines = _auto_lines(err)
        warned[mode] = "warning: folders read" in err
        estimates[mode] = {line.split(": objects")[0].rsplit("/", 1)[-1]: float(line.split("appear ")[1].split("x")[0])
                           for line in lines}
        taken = {Path(r["path"]).parent.name: float(r["scale"]) for r in csv.DictReader(out.open())}
        assert len(taken) == 2
        if mode == "site":
            assert len(set(taken.values())) == 1, taken
    print("--scale auto per case folder, and site:", estimates)
    auto, (site,) = estimates["auto"], estimates["site"].values()
    assert len(auto) == 2 and auto["case_P"] > 1.15 * auto["case_N"], estimates  # malignancy read as magnification
    assert auto["case_N"] <= site <= auto["case_P"] and site / auto["case_N"] > 1.05, estimates
    assert warned == {"auto": auto["case_P"] / auto["case_N"] >= CASE_SPREAD, "site": False}, warned


def test_a_run_whose_scale_reference_an_older_measure_took_is_read_with_todays(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--scale auto`` on a run fine-tuned before the measure changed: its reference is rebuilt from the run's
    training split in memory, and the run folder is left as it was."""
    import shutil

    from PIL import Image

    from finetune.predict import main

    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    meta = json.loads((old / "best.json").read_text())
    meta["scale"]["reference"] = {**meta["scale"]["reference"], "version": 1, "sizes": [1.0] * 25}
    (old / "best.json").write_text(json.dumps(meta))
    before = (old / "best.json").read_bytes()
    fields = tmp_path / "fields"
    fields.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(fields / "a.png")
    assert main(["--ckpt", str(old), "--images", str(fields), "--out", str(tmp_path / "p.csv"), "--scale", "auto"]) == 0
    assert "measured by an older roseprior; rebuilding it" in capsys.readouterr().err
    assert (old / "best.json").read_bytes() == before


def test_scale_auto_on_a_run_without_a_training_scale_of_todays_measure_is_refused_in_one_line(tmp_path: Path) -> None:
    from roseprior.errors import DataError
    from roseprior.scale import MEASURE_VERSION, shared_scale

    with pytest.raises(DataError, match="records no training scale"):
        shared_scale([np.zeros((32, 32, 3), np.uint8)], {"input_per_native": 1.0}, "runs/old")
    reference = {"scales": [1.0], "sizes": [3.0], "version": MEASURE_VERSION}
    assert shared_scale([np.full((32, 32, 3), 200, np.uint8)], {"reference": reference},
                        "run") == (1.0, 0)  # nothing stained to measure: the training scale
    with pytest.raises(DataError, match="older measure.*fine-tune it again"):  # sizes another measure took
        shared_scale([np.zeros((32, 32, 3), np.uint8)], {"reference": {**reference, "version": 1}}, "runs/old")


def test_predict_without_scale_warns_about_a_folder_at_another_magnification(
        site_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --scale, fields are squeezed whole as in training; a folder whose nuclei read 1.5x or more off the
    training scale is named in a warning that says what to do, from a bounded sample of its fields. A folder at
    the training scale, with its class folders, is not; ``--scale none`` asked for squeezing and is not checked."""
    from PIL import Image

    from finetune.predict import main
    from roseprior.imageio import read_image
    from roseprior.scale import resample

    run, data = site_run
    for name, factor in (("native", 1.0), ("zoom2", 2.0)):
        for path in sorted(data.rglob("*.jpg")):
            folder = tmp_path / "fields" / name / path.parent.name  # class folders N/ and P/
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(resample(read_image(path), factor)).save(folder / f"{path.stem}.png")
    monkeypatch.setattr("roseprior.scale.CHECK_FIELDS", 12)  # of each folder's 20
    capsys.readouterr()
    assert main(["--ckpt", str(run), "--images", str(tmp_path / "fields"), "--out", str(tmp_path / "p.csv")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line and "fewer than" not in line]
    assert len(warnings) == 1 and f"{tmp_path / 'fields' / 'zoom2'}:" in warnings[0], warnings
    assert "--scale auto" in warnings[0] and "nuclei of 12 fields" in warnings[0]
    assert main(["--ckpt", str(run), "--images", str(tmp_path / "fields" / "zoom2"), "--out", str(tmp_path / "q.csv"),
                 "--scale", "none"]) == 0
    assert "objects appear" not in capsys.readouterr().err
    assert {r["scale"] for r in csv.DictReader((tmp_path / "q.csv").open())} == {""}  # resized whole
