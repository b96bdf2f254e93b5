"""eval_probes units: linear probe vs sklearn, robustness index by hand, feature cache invalidation,
conditions, config and CLI errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_probes import conditions as cond_lib
from eval_probes.config import ProbeConfig
from eval_probes.features import FeatureCache, cached_features, data_fingerprint
from roseprior.config import load_config
from roseprior.data import Sample
from roseprior.errors import ConfigError
from roseprior.probes import fit_knn, fit_linear
from roseprior.robustness import robustness_index

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def _separable(n: int, dim: int, seed: int, imbalance: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < imbalance).astype(np.int64)
    x = rng.normal(size=(n, dim)) * rng.uniform(0.1, 30.0, size=dim)  # wildly different feature scales
    x[:, 0] += 2.0 * y * 30.0
    return x.astype(np.float32), y


def test_linear_probe_probabilities_match_sklearn():
    from sklearn.linear_model import LogisticRegression

    x, y = _separable(160, 12, seed=0, imbalance=0.25)
    xv, yv = _separable(60, 12, seed=1, imbalance=0.25)
    xt, _ = _separable(40, 12, seed=2)
    probe = fit_linear(x, y, xv, yv, c_grid=[0.01, 0.1, 1.0])
    assert probe.c in (0.01, 0.1, 1.0)
    assert probe.val_scores[probe.c] == max(probe.val_scores.values()), "C must be the best on validation"
    # Reference written out: z-score with train statistics, then class-balanced L-BFGS logistic regression.
    mean, std = x.mean(0), x.std(0)
    ref = LogisticRegression(C=probe.c, solver="lbfgs", class_weight="balanced", max_iter=5000, tol=1e-8)
    ref.fit((x - mean) / std, y)
    expected = ref.predict_proba((xt - mean) / std)
    np.testing.assert_allclose(probe.predict_proba(xt), expected, atol=2e-3)
    # Class balancing matters on this imbalanced set: the unweighted fit gives other probabilities.
    unweighted = LogisticRegression(C=probe.c, solver="lbfgs", max_iter=5000).fit((x - mean) / std, y)
    assert np.abs(unweighted.predict_proba((xt - mean) / std) - expected).max() > 1e-2


def test_knn_probe_picks_k_on_validation():
    rng = np.random.default_rng(0)
    # Class 1 is a tight cluster, class 0 is noise around it: with near-equal votes (T large) a large
    # k washes class 1 out, so validation must pick a small k.
    x = np.concatenate([rng.normal(size=(8, 4)) * 0.05 + 3.0, rng.normal(size=(200, 4))]).astype(np.float32)
    y = np.array([1] * 8 + [0] * 200)
    xv = np.concatenate([rng.normal(size=(8, 4)) * 0.05 + 3.0, rng.normal(size=(40, 4))]).astype(np.float32)
    yv = np.array([1] * 8 + [0] * 40)
    probe = fit_knn(x, y, xv, yv, num_classes=2, k_grid=[1, 5, 50, 100], temperature=100.0)
    assert set(probe.val_scores) == {1, 5, 50, 100}
    assert probe.val_scores[probe.k] == max(probe.val_scores.values())
    assert probe.k in (1, 5)
    assert probe.predict_proba(xv).shape == (48, 2)


# ---------------------------------------------------------------------------------------------
# Robustness index
# ---------------------------------------------------------------------------------------------


def _circle(angles_deg: list[float]) -> np.ndarray:
    a = np.deg2rad(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# Six points on the unit circle (cosine neighbours = nearest angles):
#   p0 0° (class 0, A)  p1 10° (0, B)  p2 25° (1, A)  p3 90° (1, B)  p4 100° (1, A)  p5 115° (0, B)
FEATS = _circle([0, 10, 25, 90, 100, 115])
LABELS = [0, 0, 1, 1, 1, 0]
DOMAINS = ["A", "B", "A", "B", "A", "B"]


def test_robustness_index_matches_hand_count():
    # k=1: p0->p1 SO, p1->p0 SO, p2->p1 -, p3->p4 SO, p4->p3 SO, p5->p4 -          => 4 / (4 + 0) = 1
    # k=2 adds: p0->p2 OS, p1->p2 -, p2->p0 OS, p3->p5 OS, p4->p5 -, p5->p3 OS       => 4 / (4 + 4) = 0.5
    assert robustness_index(FEATS, LABELS, DOMAINS, ks=(1, 2)) == {"1": 1.0, "2": 0.5}


def test_robustness_index_excludes_neighbours_from_the_same_group():
    # p0 and p1 share a slide: p0's neighbours become p2 (OS), p3 (-); p1's become p2 (-), p3 (OS).
    # k=1: p0->p2 OS, p1->p2 -, p2->p1 -, p3->p4 SO, p4->p3 SO, p5->p4 -              => 2 / 3
    # k=2: SO = p3, p4 = 2; OS = p0, p1, p2, p3, p5 = 5                                 => 2 / 7
    groups = ["s1", "s1", "s2", "s3", "s4", "s5"]
    ri = robustness_index(FEATS, LABELS, DOMAINS, groups=groups, ks=(1, 2))
    assert ri["1"] == pytest.approx(2 / 3)
    assert ri["2"] == pytest.approx(2 / 7)


def test_robustness_index_is_one_when_domain_carries_no_signal_and_low_when_it_does():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    domains = rng.choice(["a", "b", "c"], size=120)
    centres = rng.normal(size=(2, 32)) * 5
    by_class = centres[labels] + rng.normal(size=(120, 32)) * 0.3
    ri = robustness_index(by_class, labels, domains, ks=(5, 10, 20, 50))
    assert ri == {"5": 1.0, "10": 1.0, "20": 1.0, "50": 1.0}
    domain_centres = {d: rng.normal(size=32) * 5 for d in "abc"}
    by_domain = np.stack([domain_centres[d] for d in domains]) + rng.normal(size=(120, 32)) * 0.3
    assert robustness_index(by_domain, labels, domains, ks=(10,))["10"] < 0.2


# ---------------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------------


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), label=i % 2))
    return samples


def test_cache_hits_and_is_invalidated_by_checkpoint_and_data_changes(tmp_path):
    import backbones
    from backbones import init_fingerprint as checkpoint_fingerprint

    torch.manual_seed(0)
    model = backbones.create("timm:test_vit")
    ckpt = backbones.save(model, tmp_path / "ckpt")
    samples = _write_images(tmp_path / "images", 4)
    cache = FeatureCache(tmp_path / "cache")
    loads = []

    def loader():
        loads.append(1)
        return backbones.load_init(str(ckpt))

    def features(ckpt_fp: str, data_fp: str, condition=None) -> np.ndarray:
        return cached_features(cache, loader, ckpt_fp, samples, data_fp, condition or cond_lib.clean(),
                               image_size=32, seed=0, batch_size=2, device="cpu")

    ckpt_fp, data_fp = checkpoint_fingerprint(str(ckpt), 0), data_fingerprint(samples)
    first = features(ckpt_fp, data_fp)
    assert first.shape == (4, model.embed_dim) and (cache.misses, len(loads)) == (1, 1)
    again = features(checkpoint_fingerprint(str(ckpt), 0), data_fingerprint(samples))
    np.testing.assert_array_equal(again, first)
    assert (cache.hits, len(loads)) == (1, 1), "an unchanged checkpoint and data set must not re-extract"

    # Retrained checkpoint: new bytes, new fingerprint, new features.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    backbones.save(model, ckpt)
    new_ckpt_fp = checkpoint_fingerprint(str(ckpt), 0)
    assert new_ckpt_fp != ckpt_fp
    assert not np.allclose(features(new_ckpt_fp, data_fp), first)
    assert cache.misses == 2

    # An image rewritten in place: same paths, new content.
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(samples[0].path)
    new_data_fp = data_fingerprint(samples)
    assert new_data_fp != data_fp
    features(new_ckpt_fp, new_data_fp)
    assert cache.misses == 3

    # Another condition is another entry; a random init is keyed by its name and seed.
    features(new_ckpt_fp, new_data_fp, cond_lib.scale(2.0))
    assert cache.misses == 4
    assert checkpoint_fingerprint("msht_tiny", 0) != checkpoint_fingerprint("msht_tiny", 1)


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------


def test_conditions_keep_size_and_random_ones_are_reproducible():
    x = torch.rand(3, 3, 32, 32)
    for condition in (cond_lib.hed(0.1), cond_lib.scale(0.5), cond_lib.scale(2.0), cond_lib.brightness(0.1),
                      cond_lib.white_balance([1.1, 1.0, 0.9])):
        out = condition.apply(x, condition.generator(0))
        assert out.shape == x.shape and not torch.equal(out, x), condition.name
    hed = cond_lib.hed(0.2)
    torch.testing.assert_close(hed.apply(x, hed.generator(0)), hed.apply(x, hed.generator(0)))
    assert not torch.equal(hed.apply(x, hed.generator(0)), hed.apply(x, hed.generator(1)))
    assert [c.name for c in (cond_lib.hed(0.05), cond_lib.scale(0.75))] == ["stain/hed_0.05", "scale/0.75"]


def test_restaining_maps_each_site_by_its_own_stain_in_sample_order(tmp_path):
    """``stain/macenko->site_b``: each test image goes through its own site's one map to site_b's stain (so
    site_b's own images are left nearly as they were), an image of a site without a map is normalised alone,
    and the features come back in the samples' order."""
    import csv as csv_lib

    import backbones
    from backbones import init_fingerprint as checkpoint_fingerprint
    from roseprior.features import extract_features
    from roseprior.imageio import read_image
    from roseprior.imageops import StainNormalizer
    from roseprior.synth import generate

    root = generate(tmp_path / "s", n_per_class=2, size=64, domains=["site_a", "site_b"], seed=3, progress=False)
    rows = list(csv_lib.DictReader((root / "manifest.csv").open()))
    samples = [Sample(str(root / r["path"]), label=int(r["label"] == "P"), domain=r["domain"]) for r in rows]
    samples = sorted(samples, key=lambda s: s.path)[::-1]  # sites interleaved with the classes
    samples.append(Sample(samples[0].path, label=0, domain="site_c"))  # a site with no map

    def batch(domain):
        return torch.stack([torch.from_numpy(read_image(s.path)).permute(2, 0, 1) for s in samples if s.domain == domain])

    normalizer = StainNormalizer("macenko").fit(batch("site_b"))
    maps = {d: StainNormalizer("macenko").fit(batch("site_b")).fit_source(batch(d)) for d in ("site_a", "site_b")}
    condition = cond_lib.restain("site_b", normalizer, ["t"], maps, {"site_a": "fa", "site_b": "fb"})
    assert condition.spec["sources"] == {"site_a": "fa", "site_b": "fb"}  # part of the cache key
    x = batch("site_b").float() / 255
    g = condition.generator(0)
    torch.testing.assert_close(condition.by_domain("site_b")(x, g), maps["site_b"](x))
    assert (condition.by_domain("site_b")(x, g) - x).abs().mean() < 0.5 * (normalizer(x) - x).abs().mean()
    torch.testing.assert_close(condition.by_domain("site_c")(x, g), normalizer(x))

    torch.manual_seed(0)
    model = backbones.create("timm:test_vit")
    ckpt = backbones.save(model, tmp_path / "ckpt")
    feats = cached_features(FeatureCache(tmp_path / "cache"), lambda: backbones.load_init(str(ckpt)),
                            checkpoint_fingerprint(str(ckpt), 0), samples, data_fingerprint(samples), condition,
                            image_size=32, seed=0, batch_size=2, device="cpu")
    loaded = backbones.load_init(str(ckpt))
    for i, sample in enumerate(samples):
        alone = extract_features(loaded, [sample], 32, lambda x, d=sample.domain: condition.by_domain(d)(x, g))
        np.testing.assert_allclose(feats[i], alone[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config and command line
# ---------------------------------------------------------------------------------------------


def test_shipped_configs_load_and_unknown_keys_are_refused():
    for path in sorted((REPO / "configs" / "probes").glob("*.yaml")):
        cfg = load_config(ProbeConfig, path)
        assert cfg.checkpoints and math.isclose(cfg.protocol.knn_temperature, 0.07)
    with pytest.raises(ConfigError, match="knn_kk"):
        load_config(ProbeConfig, None, ["knn_kk=[1]"])


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path):
    data = tmp_path / "data"
    for label in ("N", "P"):
        _write_images(data / label, 6, seed=ord(label))
    proc = subprocess.run(
        [sys.executable, "-m", "eval_probes", f"data.root={data}", "data.image_size=32", f"out_dir={tmp_path / 'out'}",
         "checkpoints=[no_such_model]", "umap=false", "tensorboard=false", "progress=false", "data.split_ratios='4:1:1'"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eval_probes: error:") and "no_such_model" in last
    assert "Traceback" not in proc.stderr


def test_folders_per_domain_give_domain_labels(tmp_path):
    from eval_probes.data import load_probe_data

    for domain in ("scanner1", "scanner2"):
        for label in ("N", "P"):
            _write_images(tmp_path / "data" / domain / label, 5, seed=hash((domain, label)) % 1000)
    cfg = ProbeConfig(out_dir=str(tmp_path / "out"))
    cfg.data.root = str(tmp_path / "data")
    data = load_probe_data(cfg)
    assert data.domains == ["scanner1", "scanner2"]
    assert sum(len(v) for v in data.splits.values()) == 20
    assert {s.domain for s in data.splits["train"]} == {"scanner1", "scanner2"}


def test_input_statistics_travel_with_the_backbone_folder(tmp_path):
    """Regression: a backbone saved with its training statistics is loaded with them, and timm, the
    classifier and the probes all see them (they were lost to timm's ImageNet pretrained_cfg)."""
    import timm

    import backbones
    from finetune.model import Classifier

    model = backbones.set_input_stats(backbones.create("msht_tiny"), [0.6, 0.5, 0.4], [0.2, 0.3, 0.25])
    saved = backbones.save(model, tmp_path / "trained")
    loaded = backbones.load_init(str(saved))
    expected = ((0.6, 0.5, 0.4), (0.2, 0.3, 0.25))
    assert backbones.input_stats(loaded) == expected
    config = timm.data.resolve_data_config(model=loaded)
    assert (tuple(config["mean"]), tuple(config["std"])) == expected
    classifier = Classifier(loaded)
    assert tuple(round(v, 6) for v in classifier.mean.flatten().tolist()) == expected[0]
    plain = backbones.load_init(str(backbones.save(backbones.create("msht_tiny"), tmp_path / "plain")))
    assert backbones.input_stats(plain) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the architecture's


def test_balanced_robustness_index_does_not_move_with_site_sizes():
    """The same embedding, with one site contributing 5x more images: the plain index moves, the
    class x domain-balanced one stays within its spread."""
    from roseprior.robustness import balanced_robustness_index

    rng = np.random.default_rng(0)

    def sample(n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = np.concatenate([rng.integers(0, 2, n_a), rng.integers(0, 2, n_b)])
        domains = np.array(["a"] * n_a + ["b"] * n_b)
        class_dir, site_dir = rng.normal(size=16), rng.normal(size=16)
        feats = (labels[:, None] * 1.0 * class_dir + (domains == "b")[:, None] * 1.0 * site_dir
                 + rng.normal(size=(len(labels), 16)))
        return feats.astype(np.float32), labels, domains

    rng = np.random.default_rng(0)
    equal = sample(200, 200)
    rng = np.random.default_rng(0)
    skewed = sample(1000, 200)
    b_equal = balanced_robustness_index(*equal, ks=(10,), repeats=10)
    b_skewed = balanced_robustness_index(*skewed, ks=(10,), repeats=10)
    spread = 3 * max(b_equal["std"]["10"], b_skewed["std"]["10"], 0.01)
    assert abs(b_equal["mean"]["10"] - b_skewed["mean"]["10"]) < spread
    plain_equal, plain_skewed = robustness_index(*equal, ks=(10,))["10"], robustness_index(*skewed, ks=(10,))["10"]
    assert abs(plain_equal - plain_skewed) > abs(b_equal["mean"]["10"] - b_skewed["mean"]["10"])
    assert b_equal["chance"] == 0.5 and b_equal["per_cell"] >= 80


def test_balanced_robustness_index_of_random_neighbours_is_its_chance_level():
    from roseprior.robustness import balanced_robustness_index

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 600)
    domains = rng.choice(["a", "b", "c"], 600)
    ri = balanced_robustness_index(rng.normal(size=(600, 32)), labels, domains, ks=(20,), repeats=5)
    assert ri["chance"] == pytest.approx(2 / 3) and abs(ri["mean"]["20"] - 2 / 3) < 0.05
