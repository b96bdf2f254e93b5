"""The probe protocol end to end: features per checkpoint and condition, probes, scores, report.

Every checkpoint goes through the same steps with the same fitted-probe protocol:
  1. clean train/val/test features (cached);
  2. kNN and linear probes fitted on clean train, k and C chosen on clean val;
  3. the test split scored under each condition (clean, stain, scale), the drop from clean;
  4. with domain labels: probes refitted per training domain and scored on each test domain,
     the test split divided into images whose domain is typical/atypical of their class in train
     (a shortcut tied to domain fails on the atypical ones), and the robustness index.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval_probes import conditions as cond_lib
from eval_probes.conditions import CLEAN, Condition
from eval_probes.config import ProbeConfig
from eval_probes.data import ProbeData, class_domain_association, load_probe_data, typical_domain
from eval_probes.features import (
    FeatureCache,
    cached_features,
    checkpoint_fingerprint,
    data_fingerprint,
    provenance_stats,
    resolve_device,
)
from eval_probes.probes import KnnProbe, LinearProbe, fit_knn, fit_linear
from eval_probes.robustness import robustness_index
from roseprior.data import ImageDataset, Sample
from roseprior.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

METRICS = ("balanced_accuracy", "auroc", "f1", "ece")
PROBES = ("knn", "knn_majority", "linear")
RESTAIN_TARGETS = 4  # train images per domain the stain target is fitted on


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def score(y: np.ndarray, probs: np.ndarray, positive: int) -> dict[str, Any]:
    """Balanced accuracy, AUROC, F1 and ECE (15 bins) of the positive class's probability."""
    from roseprior.metrics import binary_metrics

    metrics = binary_metrics((np.asarray(y) == positive).astype(int), probs[:, positive])
    out: dict[str, Any] = {k: _finite(metrics.get(k)) for k in METRICS}
    out["n"] = len(y)
    return out


def with_drops(scores: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Add ``drop``: reference minus this condition for each metric (positive = worse, except ECE)."""
    drop = {}
    for key in METRICS:
        a, b = reference.get(key), scores.get(key)
        drop[key] = None if a is None or b is None else a - b
    return {**scores, "drop": drop}


@dataclass
class FittedProbes:
    knn: KnnProbe
    linear: LinearProbe

    def predict(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "knn": self.knn.predict_proba(feats, vote="weighted"),
            "knn_majority": self.knn.predict_proba(feats, vote="majority"),
            "linear": self.linear.predict_proba(feats),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "knn": {"k": self.knn.k, "temperature": self.knn.temperature,
                    "val_balanced_accuracy": {str(k): v for k, v in self.knn.val_scores.items()}},
            "linear": {"C": self.linear.c,
                       "val_balanced_accuracy": {f"{c:g}": v for c, v in self.linear.val_scores.items()}},
        }


def fit_probes(cfg: ProbeConfig, train: np.ndarray, y_train: np.ndarray, val: np.ndarray,
               y_val: np.ndarray, num_classes: int) -> FittedProbes:
    return FittedProbes(
        fit_knn(train, y_train, val, y_val, num_classes, cfg.knn_k, cfg.knn_temperature),
        fit_linear(train, y_train, val, y_val, cfg.linear_c, cfg.linear_max_iter, cfg.seed),
    )


def score_all(probes: FittedProbes, feats: np.ndarray, y: np.ndarray, positive: int) -> tuple[dict, dict]:
    probs = probes.predict(feats)
    return {name: score(y, p, positive) for name, p in probs.items()}, probs


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------


def restain_targets(data: ProbeData, domain: str, image_size: int) -> tuple[list[Sample], torch.Tensor]:
    picked = sorted((s for s in data.splits["train"] if s.domain == domain), key=lambda s: s.path)[:RESTAIN_TARGETS]
    dataset = ImageDataset(picked, image_size=image_size)
    return picked, torch.stack([dataset[i][0] for i in range(len(dataset))])


def build_conditions(cfg: ProbeConfig, data: ProbeData) -> tuple[list[Condition], list[str]]:
    """The conditions in report order, plus notes on any that could not be built."""
    from roseprior.imageops import StainNormalizer

    notes: list[str] = []
    conditions = [cond_lib.clean()]
    conditions += [cond_lib.hed(s) for s in cfg.stain.hed_strengths if s > 0]
    conditions += [cond_lib.white_balance(g) for g in cfg.stain.white_balance]
    conditions += [cond_lib.brightness(d) for d in cfg.stain.brightness]
    if cfg.stain.restain:
        if not data.domains:
            notes.append("stain re-staining skipped: the data has no domain labels to take targets from")
        for domain in data.domains:
            picked, images = restain_targets(data, domain, cfg.data.image_size)
            try:
                normalizer = StainNormalizer(cfg.stain.restain_method).fit(images)
            except DataError as err:
                notes.append(f"stain/{cfg.stain.restain_method}->{domain} skipped: {err}")
                continue
            conditions.append(cond_lib.restain(domain, normalizer, [data_fingerprint(picked)]))
    conditions += [cond_lib.scale(z) for z in cfg.zooms if z != 1.0]
    seen: set[str] = set()
    for c in conditions:
        if c.name in seen:
            raise ConfigError(f"condition {c.name} is listed twice; remove the duplicate from the config")
        seen.add(c.name)
    return conditions, notes


# ---------------------------------------------------------------------------------------------
# One checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointRun:
    """What the report needs beyond report.json: clean test features and probabilities."""

    name: str
    result: dict[str, Any]
    test_feats: np.ndarray
    clean_probs: dict[str, np.ndarray] = field(default_factory=dict)


def display_names(cfg: ProbeConfig) -> list[str]:
    if cfg.names is not None:
        if len(cfg.names) != len(cfg.checkpoints) or len(set(cfg.names)) != len(cfg.names):
            raise ConfigError(f"names must give one distinct name per checkpoint ({len(cfg.checkpoints)}), "
                              f"got {cfg.names}")
        return list(cfg.names)
    names: list[str] = []
    for spec in cfg.checkpoints:
        path = Path(spec).expanduser()
        name = path.name if path.exists() else spec
        if name in names:
            name = f"{path.parent.name}/{name}" if path.exists() else f"{name}#{len(names)}"
        names.append(name)
    return names


def check_specs(specs: list[str]) -> None:
    """Refuse an unknown checkpoint before any image is read, rather than after the first one's features."""
    from backbones import is_model

    for spec in specs:
        if not Path(spec).expanduser().exists() and not is_model(spec):
            raise ConfigError(f"checkpoints: {spec!r} is neither an existing folder or weights file, a registered "
                              "backbone (e.g. msht_tiny), nor a timm:<name>")


def input_stats_for(cfg: ProbeConfig, spec: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The config's mean/std when set (checked), else None: each checkpoint's own (see features.input_stats)."""
    if cfg.mean is None and cfg.std is None:
        return None
    if cfg.mean is None or cfg.std is None or len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ConfigError(f"mean and std must both be three numbers (std > 0), got mean={cfg.mean} std={cfg.std}; "
                          "or leave both null to use each checkpoint's own normalisation")
    return tuple(cfg.mean), tuple(cfg.std)


def _model_loader(spec: str, seed: int) -> Callable[[], torch.nn.Module]:
    model: list[torch.nn.Module] = []

    def load() -> torch.nn.Module:
        if not model:
            import backbones

            torch.manual_seed(seed)  # a random init is then a function of (spec, seed), as the cache key says
            built = backbones.load_init(spec)
            if not hasattr(built, "forward_embedding"):
                raise CheckpointError(f"checkpoint {spec}: the model has no forward_embedding(x)")
            model.append(built)
        return model[0]

    return load


def evaluate_checkpoint(cfg: ProbeConfig, data: ProbeData, conditions: list[Condition], spec: str, name: str,
                        cache: FeatureCache, device: torch.device) -> CheckpointRun:
    start = time.perf_counter()
    ckpt_fp = checkpoint_fingerprint(spec, cfg.seed)
    load_model = _model_loader(spec, cfg.seed)

    stats = input_stats_for(cfg, spec) or provenance_stats(spec)  # None: the model's default_cfg

    # One bar per checkpoint over every image it needs: clean train/val/test, then test per condition.
    from tqdm.auto import tqdm

    total = sum(len(data.splits[s]) for s in ("train", "val", "test")) + len(data.splits["test"]) * (len(conditions) - 1)
    bar = tqdm(total=total, desc=f"features {name}", unit="img", disable=not cfg.progress, mininterval=2.0)

    def features(split: str, condition: Condition) -> np.ndarray:
        return cached_features(cache, load_model, ckpt_fp, data.splits[split], data.fingerprints[split], condition,
                               cfg.data.image_size, cfg.seed, cfg.batch_size, device, cfg.data.num_workers,
                               desc=f"{split} {condition.name}", progress=bar, stats=stats)

    clean_cond = conditions[0]
    with bar:
        feats = {split: features(split, clean_cond) for split in ("train", "val", "test")}
        y = {split: data.labels(split) for split in ("train", "val", "test")}
        num_classes = len(data.classes)
        probes = fit_probes(cfg, feats["train"], y["train"], feats["val"], y["val"], num_classes)

        results: dict[str, dict[str, Any]] = {}
        clean_scores, clean_probs = score_all(probes, feats["test"], y["test"], data.positive)
        results[CLEAN] = clean_scores
        for condition in conditions[1:]:
            scores, _ = score_all(probes, features("test", condition), y["test"], data.positive)
            results[condition.name] = {p: with_drops(scores[p], clean_scores[p]) for p in PROBES}

    result: dict[str, Any] = {
        "spec": spec,
        "fingerprint": ckpt_fp,
        "embed_dim": int(feats["test"].shape[1]),
        "normalize": {"mean": list(stats[0]), "std": list(stats[1])} if stats else "model default_cfg",
        "probes": probes.describe(),
        "conditions": results,
    }
    if len(data.domains) >= 2:
        result["conditions"].update(domain_transfer(cfg, data, feats, y, probes) if cfg.domain_transfer else {})
        if cfg.shortcut_split:
            result["conditions"].update(shortcut_split(data, probes, feats["test"], y, clean_scores))
        groups = data.groups("test", cfg.data.group_by)
        result["robustness_index"] = robustness_index(feats["test"], y["test"], data.domain_of("test"), groups,
                                                      cfg.robustness_k)
        result["robustness_index_groups"] = (cfg.data.group_by or "group") if groups else None
    result["seconds"] = round(time.perf_counter() - start, 2)
    log.info("eval_probes: %s done in %.0f s (clean linear balanced accuracy %.3f)", name, result["seconds"],
             clean_scores["linear"]["balanced_accuracy"] or 0.0)
    return CheckpointRun(name, result, feats["test"], clean_probs)


def domain_transfer(cfg: ProbeConfig, data: ProbeData, feats: dict[str, np.ndarray], y: dict[str, np.ndarray],
                    probes: FittedProbes) -> dict[str, dict[str, Any]]:
    """``domain/<a>-><b>``: probes fitted on domain a's clean train (k, C on a's val), scored on b's test."""
    out: dict[str, dict[str, Any]] = {}
    dom = {split: data.domain_of(split) for split in ("train", "val", "test")}
    num_classes = len(data.classes)
    for a in data.domains:
        tr, va = dom["train"] == a, dom["val"] == a
        if len(np.unique(y["train"][tr])) < num_classes:
            for b in data.domains:
                out[f"domain/{a}->{b}"] = {"skipped": f"the train split of domain {a} lacks a class"}
            continue
        fitted = fit_probes(cfg, feats["train"][tr], y["train"][tr], feats["val"][va], y["val"][va], num_classes)
        per_b = {}
        for b in data.domains:
            te = dom["test"] == b
            if not te.any():
                per_b[b] = None
                continue
            per_b[b], _ = score_all(fitted, feats["test"][te], y["test"][te], data.positive)
        for b, scores in per_b.items():
            key = f"domain/{a}->{b}"
            if scores is None:
                out[key] = {"skipped": f"no test images from domain {b}"}
            elif per_b.get(a) is not None:  # drop against the in-domain score a->a
                out[key] = {p: with_drops(scores[p], per_b[a][p]) for p in PROBES}
            else:
                out[key] = scores
    return out


def shortcut_split(data: ProbeData, probes: FittedProbes, test_feats: np.ndarray, y: dict[str, np.ndarray],
                   clean_scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``domain/typical`` and ``domain/atypical``: test images whose domain is / is not their class's
    most frequent domain in train. With confounded training data the atypical ones are the flipped
    domain, where a probe that learnt the domain instead of the class fails."""
    typical = typical_domain(y["train"], data.domain_of("train"))
    test_dom = data.domain_of("test")
    is_typical = np.array([typical.get(int(label)) == d for label, d in zip(y["test"], test_dom, strict=True)])
    association = class_domain_association(y["train"], data.domain_of("train"))
    out: dict[str, dict[str, Any]] = {}
    for key, mask in (("domain/typical", is_typical), ("domain/atypical", ~is_typical)):
        if not mask.any():
            out[key] = {"skipped": "no test images in this subset"}
            continue
        scores, _ = score_all(probes, test_feats[mask], y["test"][mask], data.positive)
        entry: dict[str, Any] = {p: with_drops(scores[p], clean_scores[p]) for p in PROBES}
        entry["train_class_domain_association"] = round(association, 4)
        entry["typical_domain"] = {data.classes[c]: d for c, d in typical.items()}
        out[key] = entry
    return out


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def run(cfg: ProbeConfig) -> dict[str, Any]:
    """Evaluate every checkpoint and write ``report.json``, ``report.html``, ``config.yaml`` and ``tb/``."""
    from eval_probes import report as report_lib
    from roseprior.checkpoint import atomic_write_json
    from roseprior.config import save_config, to_dict

    if not cfg.checkpoints:
        raise ConfigError("checkpoints is empty: list at least one checkpoint (a folder, msht_tiny, timm:<name>)")
    check_specs(cfg.checkpoints)
    names = display_names(cfg)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    cache = FeatureCache(cfg.cache_dir or out_dir.parent / "feature_cache")
    device = resolve_device(cfg.device)
    data = load_probe_data(cfg)
    conditions, notes = build_conditions(cfg, data)
    log.info("eval_probes: %d checkpoints x %d conditions on %s", len(names), len(conditions), data.root)

    runs = [evaluate_checkpoint(cfg, data, conditions, spec, name, cache, device)
            for spec, name in zip(cfg.checkpoints, names, strict=True)]
    report = {
        "config": to_dict(cfg),
        "data": {
            "root": str(data.root),
            "classes": data.classes,
            "positive_class": data.classes[data.positive],
            "splits": {k: len(v) for k, v in data.splits.items()},
            "split_source": data.split_source,
            "domains": data.domains,
            "fingerprints": data.fingerprints,
        },
        "conditions": [{"name": c.name, "family": c.family, "value": c.value, "spec": c.spec} for c in conditions],
        "notes": notes,
        "cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses},
        "checkpoints": {r.name: r.result for r in runs},
    }
    atomic_write_json(out_dir / "report.json", report)
    report_lib.write_html(out_dir / "report.html", report, runs, data, cfg)
    if cfg.tensorboard:
        report_lib.write_tensorboard(out_dir / "tb", report, runs, data, projector=cfg.projector)
    return report
