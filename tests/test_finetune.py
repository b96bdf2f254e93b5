"""finetune's building blocks: SAM's two-pass step, BatchNorm bookkeeping, clipping, metrics use,
model selection, parameter groups, the lr schedule and the config."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from finetune.config import FinetuneConfig
from finetune.sam import build_optimizer, frozen_bn_stats, plain_step, sam_step, step_for
from finetune.train import _fold_splits, build_optimizer_for, compute_metrics, is_better
from roseprior.config import load_config
from roseprior.data import Sample
from roseprior.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs" / "finetune"


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    torch.set_num_threads(2)
    return Accelerator(cpu=True, mixed_precision="no")


def bn_net(seed: int = 0, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def batch(seed: int = 1, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.tensor([0, 1] * (n // 2))


def count_passes(model: nn.Module) -> dict[str, int]:
    counts = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    first = next(model.parameters())
    first.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))
    return counts


def bn_after_one_forward(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The BN buffers a single training-mode forward at the current weights produces."""
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(images)
    return {k: v.clone() for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# ---------------------------------------------------------------------------------------------
# SAM step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_sam_step_two_passes_and_bn_stats_updated_once(accelerator, momentum):
    model = bn_net(momentum=momentum).train()
    images, targets = batch()
    expected = bn_after_one_forward(model, images)
    counts = count_passes(model)
    opt = build_optimizer([{"params": list(model.parameters())}], "adam", "sam", rho=0.05, lr=1e-2)
    sam_step(model, images, targets, nn.functional.cross_entropy, opt, accelerator)
    assert counts == {"forward": 2, "backward": 2}
    after = bn_buffers(model)
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], msg=f"{key} updated more than once")
    assert int(after["1.num_batches_tracked"]) == 1
    # The check can fail: the second forward (at perturbed weights) would have moved the statistics.
    twice = copy.deepcopy(model)
    with torch.no_grad():
        twice(images)
    assert not torch.allclose(bn_buffers(twice)["1.running_mean"], after["1.running_mean"])


def test_sam_off_is_one_pass(accelerator):
    model = bn_net().train()
    images, targets = batch()
    expected = bn_after_one_forward(model, images)
    counts = count_passes(model)
    opt = build_optimizer([{"params": list(model.parameters())}], "adam", "off", lr=1e-2)
    assert not hasattr(opt, "first_step")
    assert step_for("off") is plain_step and step_for("sam") is sam_step and step_for("asam") is sam_step
    before = [p.clone() for p in model.parameters()]
    plain_step(model, images, targets, nn.functional.cross_entropy, opt, accelerator)
    assert counts == {"forward": 1, "backward": 1}
    torch.testing.assert_close(bn_buffers(model)["1.running_mean"], expected["1.running_mean"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sam_with_zero_rho_equals_plain_step_and_positive_rho_differs(accelerator):
    images, targets = batch()
    results = {}
    for name, sam, rho in [("plain", "off", 0.0), ("rho0", "sam", 0.0), ("rho", "sam", 0.5)]:
        model = bn_net(seed=3).train()
        opt = build_optimizer([{"params": list(model.parameters())}], "sgd", sam, rho=rho, lr=0.1)
        step_for(sam)(model, images, targets, nn.functional.cross_entropy, opt, accelerator)
        results[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(results["rho0"], results["plain"])
    assert not torch.allclose(results["rho"], results["plain"], atol=1e-5)


def test_sam_restores_weights_before_base_step(accelerator):
    """With lr 0 the base step changes nothing, so w must come back exactly from w + e(w)."""
    model = bn_net().train()
    before = [p.clone() for p in model.parameters()]
    opt = build_optimizer([{"params": list(model.parameters())}], "sgd", "asam", rho=2.0, lr=0.0)
    sam_step(model, *batch(), nn.functional.cross_entropy, opt, accelerator)
    for a, b in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_clipping_rescales_without_changing_direction(accelerator):
    images, targets = batch()
    deltas = {}
    for clip in (None, 0.01):
        model = bn_net(seed=5).train()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = build_optimizer([{"params": list(model.parameters())}], "sgd", "off", lr=1.0, momentum=0.0)
        plain_step(model, images, targets, nn.functional.cross_entropy, opt, accelerator, clip_grad=clip)
        deltas[clip] = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert deltas[None].norm() > 0.01  # the clip is active
    assert deltas[0.01].norm() == pytest.approx(0.01, rel=1e-3)
    cosine = torch.nn.functional.cosine_similarity(deltas[None], deltas[0.01], dim=0)
    assert cosine == pytest.approx(1.0, abs=1e-5)


def test_frozen_bn_stats_restores_momentum_and_counter():
    model = bn_net().train()
    bn = model[1]
    with frozen_bn_stats(model):
        assert bn.momentum == 0.0
        model(batch()[0])
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(4))


def test_non_finite_loss_stops(accelerator):
    from finetune.sam import NonFiniteLoss

    model = bn_net().train()
    opt = build_optimizer([{"params": list(model.parameters())}], "adam", "sam")
    images, targets = batch()
    with pytest.raises(NonFiniteLoss):
        sam_step(model, images * float("nan"), targets, nn.functional.cross_entropy, opt, accelerator)


# ---------------------------------------------------------------------------------------------
# Metrics as finetune uses them (P positive, whatever the class order)
# ---------------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_confusion_matrix():
    # N=0, P=1. TN=5, FP=2, FN=1, TP=4.
    labels = np.array([0] * 7 + [1] * 5)
    p_pos = np.array([0.1, 0.2, 0.3, 0.2, 0.4, 0.7, 0.9] + [0.3, 0.8, 0.6, 0.9, 0.55])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    m = compute_metrics(labels, probs, positive_index=1)
    assert m["confusion_matrix"] == [[5, 2], [1, 4]]
    assert m["n"] == 12
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(5 / 7)
    assert m["ppv"] == pytest.approx(4 / 6)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 5 / 7) / 2)
    # AUROC by counting: fraction of (P, N) pairs ranked correctly (ties count half).
    pairs = [(p, n) for p in p_pos[7:] for n in p_pos[:7]]
    auroc = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert m["auroc"] == pytest.approx(auroc)
    # Classes listed as [P, N]: P is index 0, the columns swap, and the metrics must not change.
    swapped = compute_metrics(1 - labels, probs[:, ::-1], positive_index=0)
    for key in ("confusion_matrix", "sensitivity", "specificity", "ppv", "npv", "auroc", "ece"):
        assert swapped[key] == pytest.approx(m[key]) if key != "confusion_matrix" else swapped[key] == m[key]


# ---------------------------------------------------------------------------------------------
# Selection, folds, schedule, groups, config
# ---------------------------------------------------------------------------------------------


def test_selection_prefers_balanced_accuracy_then_lower_loss():
    assert is_better({"balanced_accuracy": 0.6}, 0.9, None)
    assert is_better({"balanced_accuracy": 0.7}, 0.9, (0.6, 0.1))
    assert not is_better({"balanced_accuracy": 0.5}, 0.01, (0.6, 0.9))
    assert is_better({"balanced_accuracy": 0.6}, 0.4, (0.6, 0.5))
    assert not is_better({"balanced_accuracy": 0.6}, 0.6, (0.6, 0.5))


def test_folds_are_grouped_stratified_and_cover_the_pool():
    samples = [Sample(f"img{i}.png", label=i % 2, group=f"slide{i // 4}") for i in range(48)]
    folds = _fold_splits(samples, 3, "group", seed=0)
    assert len(folds) == 3
    seen_val = []
    for train, val in folds:
        assert {s.group for s in train}.isdisjoint({s.group for s in val})
        assert {s.label for s in val} == {0, 1}
        seen_val += [s.path for s in val]
    assert sorted(seen_val) == sorted(s.path for s in samples)


def test_cosine_schedule_ends_at_min_ratio_after_warmup():
    from roseprior.loop import lr_factors

    cfg = FinetuneConfig()
    cfg.train.warmup_epochs = 1
    sched = lr_factors(cfg.train, total_steps=50, steps_per_epoch=10)
    assert len(sched) == 50
    assert sched[0] == pytest.approx(0.0) and sched[9] == pytest.approx(0.9) and sched[10] == pytest.approx(1.0)
    assert sched[-1] == pytest.approx(0.25)
    assert np.all(np.diff(sched[10:]) <= 1e-12)
    cfg.train.schedule = "constant"
    assert np.all(lr_factors(cfg.train, 50, 10)[10:] == 1.0)


def test_param_groups_give_each_part_its_lr_and_layer_decay():
    import backbones
    from finetune.model import Classifier

    model = Classifier(backbones.create("msht_tiny", img_size=64))
    lrs = {"cnn": 1e-5, "transformer": 2e-5, "head": 3e-4}
    cfg = load_config(FinetuneConfig, None, ["sam=off", "optim.lr_cnn=1e-5", "optim.lr_transformer=2e-5",
                                             "optim.lr_head=3e-4", "train.weight_decay=0.01"])
    groups = build_optimizer_for(model, cfg).param_groups
    covered = [p for g in groups for p in g["params"]]
    assert len(covered) == len(list(model.parameters())) == len({id(p) for p in covered})
    for g in groups:
        assert g["lr"] == lrs[g["part"]] == g["base_lr"]
        assert all(n.startswith("backbone.cnn.") == (g["part"] == "cnn") for n in g["names"])
        # no weight decay on biases and norms (1-d parameters) or tokens, the configured decay elsewhere
        assert g["weight_decay"] == 0.01 or g["weight_decay"] == 0.0
        assert g["weight_decay"] == 0.0 or all(p.ndim > 1 for p in g["params"])
    assert {g["part"] for g in groups} == {"cnn", "transformer", "head"}
    cfg.optim.layer_decay = 0.5
    decayed = build_optimizer_for(model, cfg).param_groups
    by_name = {n: g["lr"] / lrs[g["part"]] for g in decayed for n in g["names"]}
    assert by_name["head.weight"] == 1.0
    assert by_name["backbone.cnn.conv1.weight"] < by_name["backbone.cnn.layer4.1.conv1.weight"] < 1.0
    # the SAM wrapper keeps every group's lr
    cfg.sam = "sam"
    opt = build_optimizer_for(model, cfg)
    assert sorted(g["lr"] for g in opt.param_groups) == sorted(g["lr"] for g in decayed)


def test_configs_load_with_the_papers_recipe():
    gpu = load_config(FinetuneConfig, CONFIGS / "msht_sam.yaml")
    assert (gpu.init, gpu.sam, gpu.resolved_rho, gpu.data.image_size) == ("msht", "sam", 0.05, 384)
    assert (gpu.optim.name, gpu.train.lr, gpu.train.weight_decay, gpu.train.min_lr_ratio) == ("adam", 1e-5, 0.01, 0.25)
    assert (gpu.train.batch_size, gpu.train.epochs, gpu.train.schedule) == (8, 50, "cosine")
    cpu = load_config(FinetuneConfig, CONFIGS / "msht_tiny_cpu.yaml", ["sam=asam"])
    assert cpu.init == "msht_tiny" and cpu.data.root is None and cpu.resolved_rho == 2.0
    assert load_config(FinetuneConfig, None, ["sam=asam", "rho=0.5"]).resolved_rho == 0.5
    assert load_config(FinetuneConfig, None, ["sam=off"]).sam == "off"  # YAML reads a bare off as false
    with pytest.raises(ConfigError, match="sam"):
        load_config(FinetuneConfig, None, ["sam=adam"])
    with pytest.raises(ConfigError, match="folds"):
        load_config(FinetuneConfig, None, ["folds=1"])
    with pytest.raises(ConfigError, match="lr_cnn"):
        load_config(FinetuneConfig, None, ["optim.lr_cnn=fast"])
    assert math.isclose(FinetuneConfig().resolved_rho, 0.05)
    with pytest.raises(ConfigError, match="augment.stain_swap"):
        load_config(FinetuneConfig, None, ["augment.stain_swap=2"])


def test_training_augmentation_swaps_stains_only_when_asked():
    from finetune.augment import TrainAugment
    from roseprior import imageops

    g = torch.Generator().manual_seed(0)
    x = torch.ones(8, 3, 32, 32)
    x[:, :, 8:24, 8:24] = torch.rand(8, 3, 16, 16, generator=g) * 0.1 + 0.5
    x = imageops.hed_shift(x, torch.linspace(0.5, 2.5, 8)[:, None].expand(8, 3), 0.0)  # eight stain strengths
    plain = load_config(FinetuneConfig, None, ["augment.rotate=false", "augment.flip=false", "augment.hed=0",
                                               "augment.brightness=0", "augment.contrast=0", "augment.saturation=0",
                                               "augment.hue=0", "augment.resolution=1"]).augment
    torch.testing.assert_close(TrainAugment(plain)(x.clone()), x)
    swapped = TrainAugment(dataclasses.replace(plain, stain_swap=1.0))(x.clone())
    moved = (imageops.stain_strength(list(swapped)) / imageops.stain_strength(list(x)) - 1).abs().amax(1)
    assert bool((moved > 0.05).all())


def test_stain_targets_are_the_strengths_of_a_new_sites_images_as_training_sees_them(tmp_path):
    from PIL import Image

    from finetune.augment import stain_targets
    from roseprior import imageops
    from roseprior.data import ImageDataset, Sample
    from roseprior.errors import DataError

    g = torch.Generator().manual_seed(0)
    for i, strength in enumerate([0.6, 1.0, 1.8]):
        cell = torch.ones(1, 3, 48, 48)
        cell[:, :, 12:36, 12:36] = torch.rand(1, 3, 24, 24, generator=g) * 0.1 + 0.5
        rgb = imageops.hed_shift(cell, strength, 0.0)[0].mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(rgb).save(tmp_path / f"field_{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    targets = stain_targets(tmp_path, image_size=32)
    seen = ImageDataset([Sample(str(tmp_path / f"field_{i}.png")) for i in range(3)], image_size=32)
    torch.testing.assert_close(targets, imageops.stain_strength([seen[i][0] for i in range(3)]))
    assert bool((targets[1:, 0] > targets[:-1, 0]).all())  # ordered as stained
    with pytest.raises(DataError, match="augment.stain_targets"):
        stain_targets(tmp_path / "missing", image_size=32)
    with pytest.raises(ConfigError, match="augment.stain_targets"):
        load_config(FinetuneConfig, None, [f"augment.stain_targets={tmp_path}"])  # swaps off: nothing would use it


# ---------------------------------------------------------------------------------------------
# CAM helpers
# ---------------------------------------------------------------------------------------------


def test_pick_images_includes_misclassified_ones():
    from finetune.cam import pick_images

    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p_pos = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.2, 0.1, 0.9])  # wrong: 0, 3, 5
    probs = np.stack([1 - p_pos, p_pos], 1)
    wrong = {0, 3, 5}
    chosen = pick_images(labels, probs, num=4, misclassified=2, seed=0)
    assert len(chosen) == 4 and len(set(chosen) & wrong) == 2
    chosen = pick_images(labels, probs, num=6, misclassified=5, seed=0)
    assert len(chosen) == 6 and wrong <= set(chosen)
    assert len(pick_images(labels, probs, num=20, misclassified=1)) == len(labels)


def test_cam_maps_are_not_empty_for_cnn_and_decoder_targets():
    """The last decoder's output norm reaches the head through the class token only; the chosen
    decoder target must still give a map that varies over the image."""
    import backbones
    from finetune.cam import attention_heatmap, choose_layers, grad_cam
    from finetune.model import Classifier

    torch.manual_seed(0)
    model = Classifier(backbones.create("msht_tiny", img_size=128)).eval()
    images = torch.rand(2, 3, 128, 128)  # a 4x4 token grid (64 px gives 2x2, too few to vary)
    layers = choose_layers(model.backbone)
    assert layers["cnn"][0] == "cnn.stage3" and layers["transformer"][0] == "decoder4"
    for name, layer in backbones.cam_target_layers(model.backbone).items():  # every listed target, the last decoder too
        # At random init Grad-CAM's ReLU may blank one class's map; a target without gradient blanks both.
        maps = [grad_cam(model, images, layer, [c, c]).reshape(2, -1) for c in (0, 1)]
        assert all(m.min() >= 0 for m in maps), name  # raw Grad-CAM units (ReLU'd), not min-max scaled
        spread = [m.std(1) / np.maximum(m.max(1), 1e-12) for m in maps]  # relative to each map's peak
        assert np.all(np.maximum(*spread) > 1e-3), name
    heat = attention_heatmap(model, images, layers["attention"][0])
    assert heat.shape == (2, 128, 128) and heat.min() > 0 and heat.max() <= 1
    # Raw attention weights, not min-max scaled: at random init the class token attends almost uniformly
    # to its 16 patches and itself, about 1/17 each, and the map shows exactly that flatness.
    assert heat.mean() == pytest.approx(1 / 17, rel=0.05) and heat.std() < 1e-3


def test_the_symmetric_reading_follows_the_flips_training_shows(tmp_path):
    """decision.dihedral_mean defaults to augment.flip (8 views of a field the model never saw turned would not be
    fair readings), is refused with flips off, and is written with the threshold chosen on it, so a run resumed
    from a best.json older than the setting is called as its threshold was chosen."""
    import json

    from finetune.train import record_decision

    assert load_config(FinetuneConfig).decision.dihedral_mean is True
    assert load_config(FinetuneConfig, None, ["augment.flip=false"]).decision.dihedral_mean is False
    with pytest.raises(ConfigError, match="decision.dihedral_mean.*augment.flip=false"):
        load_config(FinetuneConfig, None, ["augment.flip=false", "decision.dihedral_mean=true"])
    (tmp_path / "best.json").write_text(json.dumps({"classes": ["N", "P"], "image_size": 64}))  # before 2026-12-01
    record_decision(tmp_path, {"calibration": {"temperature": 1.5},
                               "operating_point": {"threshold": 0.3, "target_sensitivity": 0.95}}, True)
    meta = json.loads((tmp_path / "best.json").read_text())
    assert meta["dihedral_mean"] is True and meta["decision"]["threshold"] == 0.3 and meta["temperature"] == 1.5


def test_a_dihedral_mean_classifier_reads_every_flip_and_turn_of_a_field_alike(tmp_path):
    """decision.dihedral_mean: an evaluation call averages the 8 symmetric views, so a field and its rotated or
    mirrored copy get the same logits (a one-view network at random init does not); training and one_view() read
    the batch as given, and the setting survives the checkpoint."""
    import backbones
    from finetune.model import Classifier, load_classifier, save_classifier

    torch.manual_seed(0)
    model = Classifier(backbones.create("msht_tiny", img_size=64), dihedral_mean=True).eval()
    x = torch.rand(3, 3, 64, 64)
    turned = torch.rot90(x, 1, dims=(-2, -1)).flip(-1)
    with torch.no_grad():
        both = model(torch.cat([x, turned]))
        assert torch.allclose(both[:3], both[3:], atol=1e-5)
        with model.one_view():
            single = model(torch.cat([x, turned]))
        assert model.dihedral_mean  # restored
        assert (single[:3] - single[3:]).abs().max() > 1e-4  # one view does tell them apart
        assert torch.allclose(single[:3], model.logits(x), atol=1e-6)
    save_classifier(model, tmp_path, {"classes": ["N", "P"], "positive_class": "P", "image_size": 64})
    loaded, meta = load_classifier(tmp_path)
    assert meta["dihedral_mean"] is True and loaded.dihedral_mean
    with torch.no_grad():
        assert torch.allclose(loaded(x), both[:3], atol=1e-5)
        calls = []
        hook = model.head.register_forward_hook(lambda *_: calls.append(1))
        model(x)
        model.train()
        model(x)  # training sees the one view it is given
        hook.remove()
    assert len(calls) == 8 + 1


def test_localisation_scores_tell_on_cells_from_borders():
    from finetune.cam import localisation_scores

    mask = np.zeros((40, 40), dtype=bool)
    mask[15:25, 15:25] = True  # a cell in the middle, 1/16 of the image
    on_cell = mask.astype(float) + 0.01
    on_border = np.zeros((40, 40))
    on_border[:2] = 1.0
    flat = np.ones((40, 40))
    s = localisation_scores(on_cell, mask)
    assert s["pointing_hit"] == 1.0 and s["on_mask_lift"] > 10 and s["border_lift"] < 0.2
    assert s["mask_fraction"] == pytest.approx(100 / 1600)
    s = localisation_scores(on_border, mask)
    assert s["pointing_hit"] == 0.0 and s["on_mask_lift"] == 0.0 and s["border_lift"] > 2.5
    s = localisation_scores(flat, mask)
    assert s["on_mask_lift"] == pytest.approx(1.0) and s["border_lift"] == pytest.approx(1.0)
    assert localisation_scores(np.zeros((40, 40)), mask)["on_mask_lift"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        localisation_scores(flat, mask[:20])
