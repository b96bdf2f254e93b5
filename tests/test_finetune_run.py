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
    assert best["dihedral_mean"] is True  # decision.dihedral_mean's default: predict and export read 8 views
    assert list((out / "tb").glob("events.out.tfevents.*"))
    pngs = list((out / "cam").glob("*.png"))  # Grad-CAM reads one view of a classifier that otherwise reads 8
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
        assert row["predicted"] == expected and (row["assessable"] == "true") == (not row["reason"]), (row, threshold)


def test_predict_scores_fields_whose_class_the_layout_gives(run_dir, tiny_data, tmp_path, capsys):
    """A new site's labelled fields, as a user checks a run on them: class folders in site folders (one site with
    positives only), or a manifest with slides as groups. Predict writes each field's label beside its call and
    the scores at the run's operating point, with intervals, overall and per site; an unlabelled folder gets
    neither."""
    import numpy as np

    from finetune.predict import main
    from roseprior.metrics import binary_metrics

    out, _, _ = run_dir
    threshold = json.loads((out / "best.json").read_text())["decision"]["threshold"]
    new = tmp_path / "new"
    for site, label, count in (("site_x", "N", 4), ("site_x", "P", 3), ("site_y", "P", 3)):
        (new / site / label).mkdir(parents=True)
        for src in sorted((tiny_data / label).glob("*.jpg"))[:count]:
            shutil.copy(src, new / site / label / f"{site}_{src.name}")
    preds = tmp_path / "preds.csv"
    assert main(["--ckpt", str(out), "--images", str(new), "--out", str(preds), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 10 and all(r["label"] == Path(r["path"]).parent.name for r in rows)
    scores = json.loads((tmp_path / "preds.metrics.json").read_text())
    y = np.array([r["label"] == "P" for r in rows])
    p = np.array([float(r["p_P"]) for r in rows])
    expected = binary_metrics(y, p, threshold)  # every scored field at the operating point, assessable or not
    assert scores["all"]["n"] == 10 and scores["threshold"] == threshold
    for key in ("balanced_accuracy", "sensitivity", "specificity", "auroc"):
        assert scores["all"][key] == pytest.approx(expected[key])
        low, high = scores["all"]["ci95"][key]
        assert low <= scores["all"][key] <= high, key
    assert any("fewer than 30" in w for w in scores["all"]["warnings"])
    assert sorted(scores["per_site"]) == [str(new / "site_x"), str(new / "site_y")]
    positives_only = scores["per_site"][str(new / "site_y")]
    assert positives_only["n"] == 3 and positives_only["auroc"] is None
    assert positives_only["sensitivity"] == pytest.approx(float((p[-3:] >= threshold).mean()))
    printed = capsys.readouterr().out
    assert f"labelled fields: 10 field(s): balanced accuracy {expected['balanced_accuracy']:.3f} [" in printed
    # A manifest: its labels, sites and slides (whole slides resampled for the intervals).
    manifest = tmp_path / "new_site.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "domain", "group"])
        writer.writerows([r["path"], r["label"], "site_z", f"slide{i // 5}"] for i, r in enumerate(rows))
    assert main(["--ckpt", str(out), "--images", str(manifest), "--out", str(tmp_path / "m.csv"), "--device",
                 "cpu"]) == 0
    from_manifest = json.loads((tmp_path / "m.metrics.json").read_text())
    assert from_manifest["all"]["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert from_manifest["per_site"] == {}  # one site
    # Fields outside any class folder: no label column, no scores.
    plain = tmp_path / "plain"
    shutil.copytree(new / "site_x" / "P", plain)
    assert main(["--ckpt", str(out), "--images", str(plain), "--out", str(tmp_path / "u.csv"), "--device", "cpu"]) == 0
    assert "label" not in next(csv.reader((tmp_path / "u.csv").open()))
    assert not (tmp_path / "u.metrics.json").exists()
    capsys.readouterr()
    assert main(["--ckpt", str(out), "--images", str(plain), "--out", str(preds), "--device", "cpu"]) == 0
    assert "preds.metrics.json is left from an earlier run" in capsys.readouterr().err  # beside a CSV it no longer describes


def test_test_metrics_are_given_per_site_too(run_dir) -> None:
    """A test split of two sites: metrics.json gives its metrics per site, with intervals, as the whole split's
    are computed, and they add up to the whole split's; a split of one site gets none."""
    import numpy as np

    from finetune.config import FinetuneConfig
    from finetune.train import _format_metrics, compute_metrics, per_domain

    out, _, splits = run_dir
    assert json.loads((out / "metrics.json").read_text())["test_per_domain"] == {}  # its test split: one site
    rng = np.random.default_rng(0)
    samples = [Sample(f"f{i}.png", label=i % 2, domain=("site_a", "site_b")[i % 3 == 0]) for i in range(40)]
    probs = rng.dirichlet([1, 1], size=40)
    order = rng.permutation(40)  # results come in the loader's order, not the split's
    result = {"indices": order, "labels": np.array([samples[i].label for i in order]), "probs": probs}
    cfg = FinetuneConfig()
    sites = per_domain(result, samples, cfg, "test")
    assert sorted(sites) == ["site_a", "site_b"]
    for name, metrics in sites.items():
        mask = np.array([samples[i].domain == name for i in order])
        expected = compute_metrics(result["labels"][mask], probs[mask], 1)
        assert metrics["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
        assert metrics["ci95"]["balanced_accuracy"] and any("fewer than 30" in w for w in metrics["warnings"])
    whole = compute_metrics(result["labels"], probs, 1)
    assert np.sum([m["confusion_matrix"] for m in sites.values()], axis=0).tolist() == whole["confusion_matrix"]
    one_site = [Sample(s.path, s.label, "site_a") for s in samples]
    assert per_domain(result, one_site, cfg, "test") == {}
    metrics = json.loads((out / "metrics.json").read_text())
    printed = _format_metrics({**metrics, "test_per_domain": sites})
    low, high = sites["site_b"]["ci95"]["balanced_accuracy"]
    assert (f"test (site_b, {sites['site_b']['n']} images): balanced accuracy "
            f"{sites['site_b']['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}]") in printed


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
