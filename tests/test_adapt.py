"""``roseprior adapt``: a classifier trained on one synthetic site, shown a new site whose stain and scanner
differ, recovers once its BatchNorm statistics are re-estimated on the new site's unlabelled images; the
adapted folder is a run like any other (predict, export, probes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)


def _scanner_shift(src: Path, dst: Path) -> Path:
    """Every image of ``src`` through another stain and camera: stronger haematoxylin, warmer white
    balance, darker exposure (what a new site's slides and microscope do)."""
    from roseprior import imageops
    from roseprior.data import find_images
    from roseprior.imageio import read_image

    for path in find_images(src):
        x = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None].float() / 255
        x = imageops.hed_shift(x, torch.tensor([[1.3, 0.8, 1.0]]), torch.tensor([[0.05, -0.05, 0.0]]))
        x = imageops.brightness_shift(imageops.white_balance_shift(x, [1.15, 1.0, 0.8]), -0.1)
        out = dst / path.parent.name / f"{path.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(out)
    return dst


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from finetune.__main__ import main as finetune
    from roseprior.synth import generate

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("adapt")
    train = generate(tmp / "site_a", n_per_class=80, size=96, domains=["site_a"], seed=1, progress=False)
    held = generate(tmp / "held", n_per_class=60, size=96, domains=["site_a"], seed=7, progress=False)
    run = tmp / "run"
    assert finetune(["--config", str(REPO / "configs" / "finetune" / "msht_tiny_cpu.yaml"), f"data.root={train}",
                     f"out_dir={run}", "data.image_size=64", "train.batch_size=16", "train.epochs=25", "train.lr=2e-4",
                     "sam=off", "cam.enabled=false", "decision.dihedral_mean=false"]) == 0
    return {"run": run, "held": held, "shifted": _scanner_shift(held, tmp / "new_site")}


def balanced_accuracy(run: Path, images: Path) -> float:
    """At the classifier's own decision (the larger probability): the operating point's threshold was
    chosen on the training site's validation images."""
    from sklearn.metrics import balanced_accuracy_score

    from finetune.predict import load_predictor, predict_paths
    from roseprior.data import find_images

    predictor = load_predictor(ckpt=str(run))
    paths = find_images(images)
    probs, _ = predict_paths(predictor, paths, 32, progress=False)
    return balanced_accuracy_score([p.parent.name for p in paths], [predictor.classes[int(probs[p].argmax())]
                                                                    for p in paths])


def test_batchnorm_adaptation_recovers_a_new_sites_accuracy(sites: dict[str, Path], tmp_path: Path) -> None:
    from roseprior.cli import main

    clean, shifted = balanced_accuracy(sites["run"], sites["held"]), balanced_accuracy(sites["run"], sites["shifted"])
    out = tmp_path / "adapted"
    assert main(["adapt", "--run", str(sites["run"]), "--images", str(sites["shifted"]), "--out", str(out)]) == 0
    adapted = balanced_accuracy(out, sites["shifted"])
    print(f"held-out site_a {clean:.3f}; new site as trained {shifted:.3f}, after adapt {adapted:.3f}")
    assert shifted < clean - 0.1  # the shift hurts...
    assert adapted > shifted + 0.1  # ...and adaptation without a single label wins most of it back
    info = json.loads((out / "best.json").read_text())["adaptation"]
    assert info["batchnorm_layers"] > 0 and info["new_site_images"] == 120
    assert info["batchnorm"].startswith("moved by the new site's difference")
    # The label-free check it records: the share of the new site's fields called P, as trained and as adapted.
    from finetune.predict import load_predictor, predict_paths
    from roseprior.data import find_images

    for when, run in (("before", sites["run"]), ("after", out)):
        predictor = load_predictor(ckpt=str(run))
        probs, _ = predict_paths(predictor, find_images(sites["shifted"]), progress=False)
        calls = [predictor.call(p) for p in probs.values()]
        assert info["called_positive"][when] == pytest.approx(calls.count("P") / len(calls)), when
    assert info["called_positive"]["fields"] == 120


def test_an_adapted_run_is_a_run_for_predict_export_and_the_probes(sites: dict[str, Path], tmp_path: Path) -> None:
    import backbones
    from finetune.adapt import adapt
    from finetune.export import export
    from finetune.predict import load_predictor
    from roseprior.data import find_images

    out = adapt(sites["run"], sites["shifted"], tmp_path / "stain", bn=False, stain=True)
    meta = json.loads((out / "best.json").read_text())
    assert meta["stain_normalization"]["method"] == "macenko" and meta["decision"] and meta["temperature"]
    predictor = load_predictor(ckpt=str(out))
    assert predictor.stain is not None  # every field goes through the training set's stain first
    assert predictor.stain.source is not None  # by one map for the site, measured on its images by adapt
    x = torch.rand(2, 3, 64, 64)
    raw = load_predictor(ckpt=str(sites["run"]))
    assert not np.allclose(predictor.probabilities(x), raw.probabilities(x))
    onnx = load_predictor(model=str(export(out, "onnx", tmp_path / "m.onnx")))
    assert onnx.stain is not None
    assert backbones.load(out).forward_embedding(torch.rand(1, 3, 64, 64)).shape == (1, 192)
    assert (out / "training_images.csv").is_file()  # the probes' overlap check still knows its images
    # The new site's images as a manifest (labels unused) adapt alike.
    listed = tmp_path / "new_site.csv"
    listed.write_text("path\n" + "".join(f"{p}\n" for p in find_images(sites["shifted"])))
    again = adapt(sites["run"], listed, tmp_path / "from_manifest", bn=False, stain=True)
    adapted = json.loads((again / "best.json").read_text())
    assert adapted["stain_normalization"] == meta["stain_normalization"]
    assert adapted["adaptation"]["new_site_images"] == meta["adaptation"]["new_site_images"]


def test_adapt_refuses_a_non_empty_out(sites: dict[str, Path], tmp_path: Path, capsys) -> None:
    from roseprior.cli import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    assert main(["adapt", "--run", str(sites["run"]), "--images", str(sites["shifted"]), "--out",
                 str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "taken" / "mine.txt").read_text() == "mine"


def test_continued_pretraining_then_a_refitted_head_is_a_run_that_still_classifies(sites: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """(c) of ``adapt``: the backbone moves (a few SimCLR steps on the new site), the head is refitted on the
    run's own training images; a wrongly folded head (standardisation, class order) would score ~0.5."""
    from safetensors.torch import load_file

    from finetune.adapt import adapt
    from roseprior.probes import ProbeProtocol

    out = adapt(sites["run"], sites["shifted"], tmp_path / "ssl", bn=False, ssl_steps=3)
    info = json.loads((out / "best.json").read_text())["adaptation"]["continued_pretraining"]
    assert info["steps"] == 3 and info["head_c"] in ProbeProtocol().linear_c
    before, after = load_file(sites["run"] / "best.safetensors"), load_file(out / "best.safetensors")
    moved = [k for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])]
    assert moved and not torch.equal(before["head.weight"], after["head.weight"])
    assert (out / "continued_pretraining" / "run" / "backbone.safetensors").is_file()
    held = balanced_accuracy(out, sites["held"])
    print(f"held-out site_a after continued pretraining and a refitted head: {held:.3f} (val {info['val_balanced_accuracy']:.3f})")
    assert held > 0.65


def test_a_new_site_at_another_magnification_is_adapted_and_predicted_at_the_training_scale(
        sites: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The new site's fields show their objects twice as large (a stronger objective, same camera): adapt
    estimates that from the nuclei, gathers the BatchNorm statistics on the fields brought to the training
    scale, and records the scale, which predict then takes without being told."""
    import csv

    from finetune.predict import main as predict
    from roseprior.cli import main
    from roseprior.data import find_images
    from roseprior.imageio import read_image
    from roseprior.scale import camera_zoom

    stronger = tmp_path / "stronger_objective"
    for path in find_images(sites["shifted"]):
        (stronger / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(camera_zoom(read_image(path), 2.0)).save(stronger / path.parent.name / path.name)
    out = tmp_path / "adapted"
    assert main(["adapt", "--run", str(sites["run"]), "--images", str(stronger), "--out", str(out)]) == 0
    assert "objects appear" in capsys.readouterr().err
    site_scale = json.loads((out / "best.json").read_text())["scale"]["site_scale"]
    assert 1.5 < site_scale < 2.7, site_scale

    def called(*flags: str) -> list[str]:
        csv_path = tmp_path / f"preds{len(list(tmp_path.glob('preds*')))}.csv"
        assert predict(["--ckpt", str(out), "--images", str(stronger), "--out", str(csv_path), *flags]) == 0
        return [row["p_P"] for row in csv.DictReader(csv_path.open())]

    recorded = called()
    assert "adapted to a site whose objects appear" in capsys.readouterr().err
    assert recorded == called("--scale", str(site_scale))  # the recorded scale, unasked
    assert recorded != called("--scale", "none")  # which differs from squeezing the fields whole
    none = tmp_path / "adapted_none"  # from the adapted run: the site's scale it recorded does not carry over
    assert main(["adapt", "--run", str(out), "--images", str(stronger), "--out", str(none), "--scale", "none"]) == 0
    assert "site_scale" not in (json.loads((none / "best.json").read_text())["scale"] or {})


def test_adapt_draws_its_images_from_every_folder_of_the_new_site(sites: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-images`` below the site's count takes images spread over the sorted list, not the first ones
    (the first 80 of this site's 120 would be its 60 N fields and 20 P fields)."""
    import finetune.adapt as adapt_module

    seen: list[list[str]] = []  # the images of each pass: the run's training images, then the new site's

    def record(model, samples, *args, **kwargs) -> int:
        seen.append([s.path for s in samples])
        return 1

    monkeypatch.setattr(adapt_module, "reestimate_batchnorm", record)
    adapt_module.adapt(sites["run"], sites["shifted"], tmp_path / "few", max_images=80, scale=None)
    training, new_site = seen
    folders = [Path(p).parent.name for p in new_site]
    assert len(folders) == 80 and folders.count("N") == folders.count("P") == 40
    assert len(training) == 80 and not set(training) & set(new_site)  # as many of the run's training images


def test_batchnorm_moved_by_the_training_images_own_statistics_is_the_run_as_trained(sites: dict[str, Path]) -> None:
    """Adapting to the training images themselves changes nothing: the procedure's own bias cancels (plain
    AdaBN would replace the trained statistics by re-estimated ones, which differ)."""
    from finetune.adapt import _training_augment, training_samples, transfer_batchnorm
    from finetune.model import load_classifier

    model, meta = load_classifier(sites["run"])
    trained = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    train = training_samples(sites["run"], 40)
    assert len(train) == 40
    assert transfer_batchnorm(model, train, train, int(meta["image_size"]), augment=lambda: _training_augment(
        sites["run"]), passes=2) > 0
    moved = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert all(torch.allclose(moved[k], trained[k], rtol=1e-4, atol=1e-5) for k in trained)


def test_stain_mapping_leaves_a_site_stained_as_the_training_set_as_it_was(sites: dict[str, Path], tmp_path: Path) -> None:
    """``--stain`` on new fields stained as the training images were: the site's stain and the target are
    measured on samples large enough to agree, and the map leaves the fields as they are (a map fitted on 16
    CRIC cells a side lightened or darkened a site of the same stain by up to a third)."""
    from finetune.adapt import adapt
    from finetune.predict import load_predictor
    from roseprior.data import find_images
    from roseprior.imageio import read_image

    out = adapt(sites["run"], sites["held"], tmp_path / "same_stain", bn=False, stain=True)
    held = torch.stack([torch.from_numpy(read_image(p)).permute(2, 0, 1) for p in find_images(sites["held"])[::4]])
    held = held.float().div_(255.0)
    change = (load_predictor(ckpt=str(out)).stain(held) - held).abs().mean()
    clean, mapped = balanced_accuracy(sites["run"], sites["held"]), balanced_accuracy(out, sites["held"])
    print(f"mean change {float(change):.4f}; balanced accuracy {clean:.3f} as trained, {mapped:.3f} mapped")
    assert change < 0.006  # 0..1 per pixel and channel: 0.003 now; 0.011 with 16 images a side and two vectors
    assert mapped > clean - 0.03, (clean, mapped)


def test_a_refitted_head_chooses_its_temperature_on_the_reading_the_run_is_called_by(sites: dict[str, Path]) -> None:
    """With ``decision.dihedral_mean`` the run is called on the mean of 8 views, so adapt's refitted head must
    fit its temperature and threshold on that reading of validation, not on one view (which gives others)."""
    from finetune.adapt import refit_head
    from finetune.config import FinetuneConfig
    from finetune.model import load_classifier
    from finetune.train import load_splits
    from roseprior.calibration import apply_temperature, fit_temperature, operating_point
    from roseprior.config import load_config
    from roseprior.data import ImageDataset

    model, meta = load_classifier(sites["run"])
    model.dihedral_mean = True
    refit_head(model, meta, sites["run"], 32)
    val = load_splits(load_config(FinetuneConfig, sites["run"] / "config.yaml")).splits["val"]
    images, labels, _ = next(iter(torch.utils.data.DataLoader(ImageDataset(val, image_size=meta["image_size"]),
                                                              batch_size=len(val))))
    model.eval()
    with torch.no_grad():
        called = model(images.float() / 255).numpy()
        with model.one_view():
            one_view = model(images.float() / 255).numpy()
    assert fit_temperature(called, labels.numpy()) == pytest.approx(meta["temperature"], rel=1e-3)
    assert fit_temperature(one_view, labels.numpy()) != pytest.approx(meta["temperature"], rel=1e-3)
    positive = meta["classes"].index(meta.get("positive_class", meta["classes"][-1]))
    point = operating_point(labels.numpy() == positive, apply_temperature(called, meta["temperature"])[:, positive],
                            meta["decision"]["target_sensitivity"])
    assert point["threshold"] == pytest.approx(meta["decision"]["threshold"], rel=1e-3)
