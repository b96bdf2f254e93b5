"""Acceptance: the probe report catches a domain shortcut.

Two tiny backbones (timm's ``test_vit``) are trained supervised for a few dozen steps on synthetic
sets of two domains (site_a: blue-violet stain, site_b: pale magenta): one with ``confound=0.9``
(N mostly from site_a, P mostly from site_b, so colour gives the label away) and one with
``confound=0`` (domain independent of the label). Both checkpoints then go through one probe
protocol on the same evaluation data: probes fitted on a confounded train split, tested on an
unconfounded test split, half of which is the "flipped" domain (N from site_b, P from site_a).

What the report must show (directions, not values: the models are tiny and barely trained):
  - the confounded checkpoint loses balanced accuracy on the flipped (atypical) domain relative to
    the typical one, and scores lower there than the unconfounded checkpoint;
  - its robustness index is lower: its neighbourhoods follow the stain rather than the class.
Both checkpoints lose on the flipped images, since the probes are fitted on confounded data and any
colour in the features is a shortcut for them; the unconfounded backbone loses less.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eval_probes.config import ProbeConfig
from eval_probes.run import run
from roseprior.data import ImageDataset, load_labelled
from roseprior.synth import generate

SIZE = 64
DOMAINS = ["site_a", "site_b"]


def _train_backbone(data: Path, out: Path, steps: int = 40) -> str:
    """Plain supervised cross-entropy on the clean images: whatever separates the labels fastest is learnt."""
    import backbones

    torch.manual_seed(0)
    model = backbones.create("timm:test_vit", num_classes=2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in backbones.input_stats(model))
    dataset = ImageDataset(load_labelled(data, ["N", "P"]), image_size=SIZE)
    images = dataset.stacked().float().div_(255)
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (16,), generator=order)
        loss = torch.nn.functional.cross_entropy(model((images[idx] - mean) / std), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return str(backbones.save(model, out, provenance={"trained_on": str(data), "steps": steps}))


@pytest.mark.slow
def test_confounded_checkpoint_fails_on_the_flipped_domain_and_has_a_lower_robustness_index(tmp_path):
    torch.set_num_threads(2)
    kw = dict(size=SIZE, domains=DOMAINS, progress=False)
    # Evaluation data: confounded train/val (what the probes learn from), unconfounded test.
    generate(tmp_path / "eval" / "train", n_per_class=40, confound=0.9, seed=10, **kw)
    generate(tmp_path / "eval" / "val", n_per_class=16, confound=0.9, seed=11, **kw)
    generate(tmp_path / "eval" / "test", n_per_class=24, confound=0.0, seed=12, **kw)
    confounded = _train_backbone(generate(tmp_path / "conf", n_per_class=48, confound=0.9, seed=20, **kw),
                                 tmp_path / "ckpt_confounded")
    unconfounded = _train_backbone(generate(tmp_path / "unconf", n_per_class=48, confound=0.0, seed=21, **kw),
                                   tmp_path / "ckpt_unconfounded")

    cfg = ProbeConfig(checkpoints=[confounded, unconfounded], names=["confounded", "unconfounded"],
                      out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), progress=False,
                      zooms=[], domain_transfer=False, umap=False, tensorboard=False, robustness_k=[5, 10, 20])
    cfg.data.root = str(tmp_path / "eval")
    cfg.data.image_size = SIZE
    cfg.stain.hed_strengths, cfg.stain.white_balance, cfg.stain.brightness = [], [], []
    cfg.stain.restain = False
    report = run(cfg)

    conf, unconf = (report["checkpoints"][n] for n in ("confounded", "unconfounded"))
    for name, result in (("confounded", conf), ("unconfounded", unconf)):  # shown with pytest -s
        print(name, {c: {p: round(result["conditions"][c]["scores"][p]["balanced_accuracy"], 3) for p in ("knn", "linear")}
                     for c in ("clean", "domain/typical", "domain/atypical")}, "RI", result["robustness_index"])
    typical = conf["conditions"]["domain/typical"]
    assert typical["notes"]["typical_domain"] == {"N": "site_a", "P": "site_b"}
    assert typical["notes"]["train_class_domain_association"] > 0.6

    def ba(result: dict, cond: str) -> float:
        entry = result["conditions"][cond]
        return float(np.mean([entry["scores"][p]["balanced_accuracy"] for p in ("knn", "linear")]))

    # The confounded checkpoint collapses on the flipped images...
    assert ba(conf, "domain/atypical") < ba(conf, "domain/typical") - 0.3
    assert conf["conditions"]["domain/atypical"]["scores"]["linear"]["drop"]["balanced_accuracy"] > 0.2
    # ...more than the unconfounded one does,
    assert ba(conf, "domain/atypical") < ba(unconf, "domain/atypical")
    # and its neighbourhoods are ruled by the domain more.
    for k in ("5", "10", "20"):
        assert conf["robustness_index"][k] < unconf["robustness_index"][k], (k, conf["robustness_index"],
                                                                              unconf["robustness_index"])
