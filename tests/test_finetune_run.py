"""``python -m finetune`` end to end on a tiny synthetic set, then ``python -m finetune.predict``.

One short run (msht_tiny, 64 px, 2 epochs) is shared by the tests: the files it writes, that model
selection never reads the test split, and prediction on a folder with an unreadable file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from roseprior.data import ImageDataset, Sample

KEYS = {"accuracy", "specificity", "sensitivity", "ppv", "npv", "f1", "balanced_accuracy", "auroc", "ece",
        "confusion_matrix", "n"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from roseprior.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "synth", n_per_class=10, size=64, seed=1, progress=False)


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory) -> tuple[Path, list, dict]:
    """Runs finetune, logging every image the datasets read and when training/selection ended."""
    import finetune.train as train_mod
    from finetune.__main__ import main

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("run") / "ft"
    events: list[tuple[str, str]] = []
    original_getitem, original_fit = ImageDataset.__getitem__, train_mod.fit

    def logged_getitem(self, index):
        events.append(("read", self.samples[index].path))
        return original_getitem(self, index)

    def logged_fit(*args, **kwargs):
        result = original_fit(*args, **kwargs)
        events.append(("fit returned", ""))
        return result

    splits_seen: dict = {}
    original_resolve = train_mod.resolve_splits

    def logged_resolve(*args, **kwargs):
        split = original_resolve(*args, **kwargs)
        splits_seen.update(split.splits)
        return split

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageDataset, "__getitem__", logged_getitem)
        mp.setattr(train_mod, "fit", logged_fit)
        mp.setattr(train_mod, "resolve_splits", logged_resolve)
        code = main([
            "--config", str(Path(__file__).parents[1] / "configs" / "finetune" / "msht_tiny_cpu.yaml"),
            f"data.root={tiny_data}", f"out_dir={out}", "data.image_size=64", "train.batch_size=4",
            "train.epochs=2", "train.max_steps=4", "cam.num_images=2", "cam.misclassified=1", "augment.hed=0.05",
        ])
    assert code == 0
    return out, events, splits_seen


def test_run_writes_metrics_checkpoint_tb_and_cam(run_dir):
    out, _, _ = run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert KEYS <= set(metrics[split]), f"{split} lacks {KEYS - set(metrics[split])}"
        (tn, fp), (fn, tp) = metrics[split]["confusion_matrix"]
        assert tn + fp + fn + tp == metrics[split]["n"]
    assert metrics["test"]["n"] == metrics["sizes"]["test"] and metrics["val"]["n"] == metrics["sizes"]["val"]
    assert metrics["steps"] == 4
    assert (out / "best.safetensors").is_file() and (out / "config.yaml").is_file()
    best = json.loads((out / "best.json").read_text())
    assert best["backbone"] == "msht_tiny" and best["classes"] == ["N", "P"] and best["image_size"] == 64
    assert list((out / "tb").glob("events.out.tfevents.*"))
    pngs = list((out / "cam").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_batchnorm_statistics_follow_every_training_step(run_dir):
    """Regression: validation at the end of epoch 1 must not leave the model in eval mode for the rest
    of training (BatchNorm statistics then froze after the first epoch)."""
    from safetensors.torch import load_file

    out, _, _ = run_dir
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    last = sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    tracked = {int(v) for k, v in load_file(str(last)).items() if k.endswith("num_batches_tracked")}
    assert steps == 4 and tracked == {steps}, tracked  # SAM: one statistics update per step, every step


def test_run_folder_is_a_backbone_for_the_next_stage(run_dir):
    """The selected model's backbone is exported in the stage contract, with its input statistics."""
    import torch

    import backbones
    from finetune.model import load_classifier

    out, _, _ = run_dir
    classifier, meta = load_classifier(out)
    backbone = backbones.load(out)
    assert backbone.default_cfg["mean"] == tuple(meta["mean"]) and backbone.default_cfg["std"] == tuple(meta["std"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone.eval().forward_embedding(x), classifier.backbone.forward_embedding(x))
    assert json.loads((out / "backbone.json").read_text())["provenance"]["stage"] == "finetune"


def test_selection_never_reads_the_test_split(run_dir):
    _, events, splits = run_dir
    test_paths = {s.path for s in splits["test"]}
    val_paths = {s.path for s in splits["val"]}
    assert test_paths and test_paths.isdisjoint(val_paths | {s.path for s in splits["train"]})
    fit_end = events.index(("fit returned", ""))
    before = [p for kind, p in events[:fit_end] if kind == "read"]
    assert val_paths & set(before), "selection should have read the validation split"
    assert not test_paths & set(before), "a test image was read before selection finished"
    assert test_paths <= {p for kind, p in events[fit_end:] if kind == "read"}


def test_predict_scores_a_folder_and_lists_unreadable_files(run_dir, tiny_data, tmp_path):
    from finetune.model import load_classifier
    from finetune.predict import main

    out, _, _ = run_dir
    images = tmp_path / "new"
    images.mkdir()
    for src in sorted((tiny_data / "P").glob("*.jpg"))[:3]:
        shutil.copy(src, images / src.name)
    (images / "broken.png").write_bytes(b"not a png")
    csv_path = tmp_path / "preds.csv"
    assert main(["--ckpt", str(out), "--images", str(images), "--out", str(csv_path), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken and broken[0]["error"] and broken[0]["p_P"] == ""
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == 3
    # The CSV holds what the checkpoint gives on the same preprocessing, calibrated by the run's temperature,
    # and `predicted` applies the run's operating point.
    model, meta = load_classifier(out)
    first = ImageDataset([Sample(scored[0]["path"], label=1)], image_size=64)[0][0]
    with torch.no_grad():
        p = (model(first[None].float() / 255) / meta["temperature"]).softmax(1)[0]
    assert float(scored[0]["p_P"]) == pytest.approx(float(p[1]), abs=1e-4)
    assert abs(float(scored[0]["p_N"]) + float(scored[0]["p_P"]) - 1) < 1e-4
    threshold = meta["decision"]["threshold"]
    for row in scored:  # a field flagged by the adequacy check is not called N or P (unless --judge-all)
        expected = ("P" if float(row["p_P"]) >= threshold - 1e-6 else "N") if row["assessable"] == "true" \
            else "not assessable"
        assert row["predicted"] == expected and (row["assessable"] == "true") == (not row["reason"])


def test_metrics_carry_intervals_calibration_and_an_operating_point(run_dir):
    out, _, _ = run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("balanced_accuracy", "auroc", "sensitivity", "specificity"):
            low, high = metrics[split]["ci95"][key]
            assert low <= metrics[split][key] <= high, (split, key)
        # a tiny synthetic split: every class is below 30 images, and it says so
        assert any("fewer than 30" in w for w in metrics[split]["warnings"])
    cal = metrics["calibration"]
    assert cal["temperature"] > 0 and cal["val_ece_after"] <= cal["val_ece_before"] + 1e-9
    op = metrics["operating_point"]
    assert op["target_sensitivity"] == 0.95 and op["val_sensitivity"] >= 0.95
    best = json.loads((out / "best.json").read_text())
    assert best["temperature"] == cal["temperature"] and best["decision"]["threshold"] == op["threshold"]


def test_folds_report_each_fold_and_mean_std(tiny_data, tmp_path):
    from finetune.__main__ import main

    out = tmp_path / "folds"
    code = main([
        "--config", str(Path(__file__).parents[1] / "configs" / "finetune" / "msht_tiny_cpu.yaml"),
        f"data.root={tiny_data}", f"out_dir={out}", "data.image_size=64", "train.batch_size=4",
        "train.epochs=1", "train.max_steps=1", "folds=2", "cam.enabled=false", "sam=off",
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert set(metrics[split]) == {"fold0", "fold1", "mean", "std"}
        for key in ("balanced_accuracy", "accuracy", "ece"):
            values = [metrics[split][f"fold{k}"][key] for k in (0, 1)]
            assert metrics[split]["mean"][key] == pytest.approx(sum(values) / 2)
            assert metrics[split]["std"][key] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    # one shared test split: every fold is scored on the same images
    assert metrics["test"]["fold0"]["n"] == metrics["test"]["fold1"]["n"] == metrics["sizes"]["test"]
    # the folds' validation images together are train+val
    assert metrics["val"]["fold0"]["n"] + metrics["val"]["fold1"]["n"] == metrics["sizes"]["train"] + metrics["sizes"]["val"]
    assert (out / "best.safetensors").is_file() and (out / f"fold{metrics['best_fold']}" / "best.json").is_file()
