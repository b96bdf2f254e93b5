"""The stages agree at their seams: one split for the same data and split settings whatever each
stage's training seed, and one set of input statistics from pretraining through fine-tuning,
the probes and timm. Both were bugs: finetune and the probes split with their own seeds (a
checkpoint was probed partly on its own training images), and a pretrained backbone was
fine-tuned on ImageNet-normalised inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(600)

MEAN, STD = [0.6, 0.5, 0.4], [0.2, 0.3, 0.25]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pretrain (non-default input statistics, seed 5), a finetune from it (seed 3), and the
    probes (seed 1) on the same labelled data with default split settings."""
    from eval_probes.__main__ import main as probes
    from finetune.__main__ import main as finetune
    from pretrain.__main__ import main as pretrain
    from roseprior.synth import generate

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("seams")
    data = generate(tmp / "data", n_per_class=14, size=64, seed=4, progress=False)
    runs = {"data": data, "pretrain": tmp / "pretrain", "finetune": tmp / "finetune", "probes": tmp / "probes"}
    assert pretrain([f"data.root={data}", f"out_dir={runs['pretrain']}", "seed=5", "model.name=timm:test_vit",
                     "method.name=simclr", "method.simclr.hidden_dim=32", "method.simclr.out_dim=16",
                     "method.simclr.batch_norm=false", "views.global_size=32", "views.n_local=0",
                     "train.batch_size=8", "train.max_steps=1", "monitor.progress=false",
                     f"views.mean={MEAN}", f"views.std={STD}"]) == 0
    assert finetune([f"data.root={data}", f"out_dir={runs['finetune']}", "seed=3", f"init={runs['pretrain']}",
                     "data.image_size=32", "train.batch_size=4", "train.epochs=1", "train.max_steps=2", "sam=off",
                     "cam.enabled=false"]) == 0
    assert probes([f"data.root={data}", f"out_dir={runs['probes']}", "seed=1", "data.image_size=32",
                   f"checkpoints=[{runs['pretrain']}, {runs['finetune']}]", "zooms=[]", "stain.hed_strengths=[]",
                   "stain.white_balance=[]", "stain.brightness=[]", "stain.restain=false", "umap=false",
                   "tensorboard=false", "progress=false"]) == 0
    return runs


def test_every_stage_resolves_the_same_split_whatever_its_seed(chain: dict[str, Path]) -> None:
    pretrain = json.loads((chain["pretrain"] / "backbone.json").read_text())["provenance"]["split"]
    finetune = json.loads((chain["finetune"] / "metrics.json").read_text())["split"]
    report = json.loads((chain["probes"] / "report.json").read_text())
    assert pretrain["fingerprint"] == finetune["fingerprint"] == report["data"]["split_fingerprint"]
    assert pretrain["sizes"] == finetune["sizes"] == report["data"]["splits"]
    # So the probes' test images are none of those the checkpoints trained or selected on.
    for name, result in report["checkpoints"].items():
        assert result["test_overlap"] == {"test_images": 0, "of": report["data"]["splits"]["test"], "as": {}}, name
    assert not report["notes"]


def test_probing_with_another_split_is_marked_as_not_held_out(chain: dict[str, Path], tmp_path: Path) -> None:
    from eval_probes.__main__ import main as probes

    out = tmp_path / "other_split"
    assert probes([f"data.root={chain['data']}", f"out_dir={out}", "data.split_seed=9", "data.image_size=32",
                   f"checkpoints=[{chain['finetune']}]", "names=[ft]", "zooms=[]", "stain.hed_strengths=[]",
                   "stain.white_balance=[]", "stain.brightness=[]", "stain.restain=false", "umap=false",
                   "tensorboard=false", "progress=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    overlap = report["checkpoints"]["ft"]["test_overlap"]
    assert overlap["test_images"] > 0 and set(overlap["as"]) <= {"train", "val"}
    assert any("not held-out" in note for note in report["notes"])
    assert "trained on" in (out / "report.html").read_text()


def test_input_statistics_reach_finetune_the_probes_and_timm(chain: dict[str, Path]) -> None:
    import timm

    import backbones
    from finetune.config import FinetuneConfig
    from finetune.model import load_classifier
    from finetune.train import build_classifier

    expected = (tuple(MEAN), tuple(STD))
    loaded = backbones.load(chain["pretrain"])
    assert backbones.input_stats(loaded) == expected
    timm_cfg = timm.data.resolve_data_config(model=loaded)
    assert (tuple(timm_cfg["mean"]), tuple(timm_cfg["std"])) == expected
    classifier = build_classifier(FinetuneConfig(init=str(chain["pretrain"])))
    assert torch.allclose(classifier.mean.flatten(), torch.tensor(MEAN)), "the old bug: ImageNet's 0.485"
    _, meta = load_classifier(chain["finetune"])
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    mean, std = backbones.input_stats(backbones.load(chain["finetune"]))
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)
    report = json.loads((chain["probes"] / "report.json").read_text())
    for result in report["checkpoints"].values():
        assert result["normalize"] == {"mean": pytest.approx(MEAN), "std": pytest.approx(STD)}
