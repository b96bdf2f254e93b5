"""The probe protocol end to end: features per checkpoint and condition, probes, scores, report.

Every checkpoint goes through the same steps with the same fitted-probe protocol (``roseprior.probes``):
  1. clean train/val/test features (``roseprior.features``, cached);
  2. kNN and linear probes fitted on clean train, k and C chosen on clean val;
  3. the test split scored under each condition (clean, stain, scale), the drop from clean;
  4. with domain labels: probes refitted per training domain and scored on each test domain,
     the test split divided into images whose domain is typical/atypical of their class in train
     (a shortcut tied to domain fails on the atypical ones), and the robustness index.
A checkpoint that was fine-tuned (or pretrained) on images of the probe's test split is marked.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
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
from eval_probes.features import FeatureCache, cached_features, data_fingerprint
from eval_probes.results import PROBES, ConditionResult, ProbeScore
from roseprior.data import ImageDataset, Sample
from roseprior.errors import CheckpointError, ConfigError, DataError
from roseprior.features import resolve_device
from roseprior.probes import FittedProbes, fit_probes
from roseprior.robustness import balanced_robustness_index, robustness_index

log = logging.getLogger(__name__)

RESTAIN_TARGETS = 4  # train images per domain the stain target is fitted on


def score_all(probes: FittedProbes, feats: np.ndarray, y: np.ndarray, positive: int,
              reference: dict[str, ProbeScore] | None = None, groups: list[str] | None = None,
              seed: int = 0) -> tuple[dict[str, ProbeScore], dict[str, np.ndarray]]:
    """Each probe's scores on ``feats`` with intervals (and the drop from ``reference`` when given), and
    its probabilities."""
    probs = probes.predict(feats)
    scores = {name: ProbeScore.of(y, p, positive, groups, seed) for name, p in probs.items()}
    if reference is not None:
        scores = {name: s.against(reference[name]) for name, s in scores.items()}
    return scores, probs


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------


def restain_targets(data: ProbeData, domain: str, image_size: int) -> tuple[list[Sample], torch.Tensor]:
    picked = sorted((s for s in data.splits["train"] if s.domain == domain), key=lambda s: s.path)[:RESTAIN_TARGETS]
    return picked, ImageDataset(picked, image_size=image_size).stacked()


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
        fitted = {}  # each domain's stain, fitted once: the target of its condition and the source of the others'
        for domain in data.domains:
            picked, images = restain_targets(data, domain, cfg.data.image_size)
            try:
                fitted[domain] = picked, StainNormalizer(cfg.stain.restain_method).fit(images)
            except DataError as err:
                notes.append(f"stain/{cfg.stain.restain_method}->{domain} skipped: {err}")
        by_site = cfg.stain.restain_method == "macenko"  # each site's images by one map from its own stain
        source_ids = {source: data_fingerprint(picked) for source, (picked, _) in fitted.items()} if by_site else {}
        for domain, (picked, normalizer) in fitted.items():
            site_maps = {source: normalizer.mapping(site) for source, (_, site) in fitted.items()} if by_site else {}
            conditions.append(cond_lib.restain(domain, normalizer, [data_fingerprint(picked)], site_maps, source_ids))
    conditions += [cond_lib.scale(z) for z in cfg.zooms if z != 1.0]
    repeated = [name for name, n in Counter(c.name for c in conditions).items() if n > 1]
    if repeated:
        raise ConfigError(f"condition {repeated[0]} is listed twice; remove the duplicate from the config")
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
        return list(cfg.names)
    names: list[str] = []
    for spec in cfg.checkpoints:
        path = Path(spec.rpartition("@")[0] or spec).expanduser()
        name = path.name if path.exists() else spec
        if name in names:
            name = f"{path.parent.name}/{name}" if path.exists() else f"{name}#{len(names)}"
        names.append(name)
    return names


def check_specs(specs: list[str]) -> None:
    """Refuse an unknown checkpoint before any image is read, rather than after the first one's features."""
    from backbones import is_model

    for spec in specs:
        path = Path(spec).expanduser()
        file, _, arch = spec.rpartition("@")
        if path.is_dir() or is_model(spec) or (file and Path(file).expanduser().is_file() and is_model(arch)):
            continue
        if path.is_file():
            raise ConfigError(f"checkpoints: {spec} is a weights file; name its architecture as {spec}@NAME "
                              "(e.g. @msht or @timm:resnet50)")
        raise ConfigError(f"checkpoints: {spec!r} is neither a folder written by pretrain/finetune, a weights file "
                          "given as PATH@ARCH, a registered backbone (e.g. msht_tiny), nor a timm:<name>")


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


def seen_test_images(spec: str, data: ProbeData) -> dict[str, Any] | None:
    """How many of the probe's test images the checkpoint trained (or selected) on, from its run folder's
    ``training_images.csv``; None when it records none (a registry name, a foreign file)."""
    from roseprior.splits import read_image_list

    path = Path(spec).expanduser()
    seen = read_image_list(path) if path.is_dir() else None
    if seen is None:
        return None
    hits = Counter(seen[real] for real in (os.path.realpath(s.path) for s in data.splits["test"]) if real in seen)
    return {"test_images": sum(hits.values()), "of": len(data.splits["test"]), "as": dict(hits)}


def evaluate_checkpoint(cfg: ProbeConfig, data: ProbeData, conditions: list[Condition], spec: str, name: str,
                        cache: FeatureCache, device: torch.device, assessable: np.ndarray | None = None
                        ) -> CheckpointRun:
    import backbones
    from roseprior.progress import Progress

    start = time.perf_counter()
    ckpt_fp = backbones.init_fingerprint(spec, cfg.seed)
    load_model = _model_loader(spec, cfg.seed)
    stats = (tuple(cfg.mean), tuple(cfg.std)) if cfg.mean is not None else None  # None: the checkpoint's own

    # One progress display per checkpoint over every image it needs: clean train/val/test, then test per condition.
    total = sum(len(data.splits[s]) for s in ("train", "val", "test")) + len(data.splits["test"]) * (len(conditions) - 1)
    bar = Progress(total, f"features {name}", unit="img", enabled=cfg.progress)

    def features(split: str, condition: Condition) -> np.ndarray:
        return cached_features(cache, load_model, ckpt_fp, data.splits[split], data.fingerprints[split], condition,
                               cfg.data.image_size, cfg.seed, cfg.batch_size, device, cfg.data.num_workers,
                               progress=bar, stats=stats)

    with bar:
        feats = {split: features(split, conditions[0]) for split in ("train", "val", "test")}
        y = {split: data.labels(split) for split in ("train", "val", "test")}
        probes = fit_probes(cfg.protocol, feats["train"], y["train"], feats["val"], y["val"], len(data.classes),
                            cfg.seed)
        groups = data.groups("test", cfg.data.group_by)
        clean_scores, clean_probs = score_all(probes, feats["test"], y["test"], data.positive, None, groups, cfg.seed)
        results = {CLEAN: ConditionResult(CLEAN, "clean", False, clean_scores)}
        for c in conditions[1:]:
            scores, _ = score_all(probes, features("test", c), y["test"], data.positive, clean_scores, groups,
                                  cfg.seed)
            results[c.name] = ConditionResult(c.name, c.family, c.shift, scores, value=c.value,
                                              target_domain=c.target_domain)

    if len(data.domains) >= 2:
        if cfg.domain_transfer:
            results.update(domain_transfer(cfg, data, feats, y))
        if cfg.shortcut_split:
            results.update(shortcut_split(data, probes, feats["test"], y, clean_scores, groups))
    if assessable is not None:
        results.update(subset_results("adequacy", {"assessable": assessable, "flagged": ~assessable}, probes,
                                      feats["test"], y["test"], data.positive, clean_scores, groups))
    used_stats = stats or backbones.input_stats(load_model())
    result: dict[str, Any] = {
        "spec": spec,
        "fingerprint": ckpt_fp,
        "embed_dim": int(feats["test"].shape[1]),
        "normalize": {"mean": list(used_stats[0]), "std": list(used_stats[1])},
        "test_overlap": seen_test_images(spec, data),
        "probes": probes.describe(),
        "conditions": {k: v.to_json() for k, v in results.items()},
    }
    if len(data.domains) >= 2:
        domains = data.domain_of("test")
        result["robustness_index"] = robustness_index(feats["test"], y["test"], domains, groups, cfg.robustness_k)
        result["robustness_index_balanced"] = balanced_robustness_index(
            feats["test"], y["test"], domains, groups, cfg.robustness_k, cfg.robustness_repeats, cfg.seed)
        if cfg.robustness_reference:
            reference = random_init_features(cfg, data, spec, load_model, cache, device, stats)
            result["robustness_index_random_init"] = balanced_robustness_index(
                reference, y["test"], domains, groups, cfg.robustness_k, cfg.robustness_repeats, cfg.seed)
        result["robustness_index_groups"] = (cfg.data.group_by or "group") if groups else None
    result["seconds"] = round(time.perf_counter() - start, 2)
    log.info("eval_probes: %s done in %.0f s (clean linear balanced accuracy %.3f)", name, result["seconds"],
             clean_scores["linear"].balanced_accuracy or 0.0)
    return CheckpointRun(name, result, feats["test"], clean_probs)


def random_init_features(cfg: ProbeConfig, data: ProbeData, spec: str, load_model: Callable[[], torch.nn.Module],
                         cache: FeatureCache, device: torch.device, stats: Any) -> np.ndarray:
    """Clean test features of the checkpoint's architecture at random init, with the checkpoint's own
    input statistics: the robustness index a backbone gets before any training (its chance level)."""
    import json as json_lib

    import backbones

    trained = load_model()
    name, kwargs = getattr(trained, "registry_name", spec), dict(getattr(trained, "registry_kwargs", {}) or {})
    mean, std = stats or backbones.input_stats(trained)

    def build() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return backbones.set_input_stats(backbones.create(name, **kwargs), mean, std)

    fingerprint = f"random-init:{name}:{json_lib.dumps(kwargs, sort_keys=True)}:seed={cfg.seed}:{list(mean)}:{list(std)}"
    return cached_features(cache, build, fingerprint, data.splits["test"], data.fingerprints["test"], cond_lib.clean(),
                           cfg.data.image_size, cfg.seed, cfg.batch_size, device, cfg.data.num_workers, stats=stats)


def domain_transfer(cfg: ProbeConfig, data: ProbeData, feats: dict[str, np.ndarray],
                    y: dict[str, np.ndarray]) -> dict[str, ConditionResult]:
    """``domain/<a>-><b>``: probes fitted on domain a's clean train (k, C on a's val), scored on b's test,
    with the drop from the in-domain score a->a."""
    out: dict[str, ConditionResult] = {}
    dom = {split: data.domain_of(split) for split in ("train", "val", "test")}
    for a in data.domains:
        tr, va = dom["train"] == a, dom["val"] == a
        results = {b: ConditionResult(f"domain/{a}->{b}", "domain", a != b, source_domain=a, target_domain=b)
                   for b in data.domains}
        if len(np.unique(y["train"][tr])) < len(data.classes):
            for r in results.values():
                r.skipped = f"the train split of domain {a} lacks a class"
        else:
            fitted = fit_probes(cfg.protocol, feats["train"][tr], y["train"][tr], feats["val"][va], y["val"][va],
                                len(data.classes), cfg.seed)
            for b, r in results.items():
                te = dom["test"] == b
                if te.any():
                    r.scores, _ = score_all(fitted, feats["test"][te], y["test"][te], data.positive,
                                            seed=cfg.seed)
                else:
                    r.skipped = f"no test images from domain {b}"
            in_domain = results[a].scores
            for r in results.values():
                if in_domain and r.scores:
                    r.scores = {p: s.against(in_domain[p]) for p, s in r.scores.items()}
        out.update({r.name: r for r in results.values()})
    return out


def subset_results(family: str, subsets: dict[str, np.ndarray], probes: FittedProbes, test_feats: np.ndarray,
                   y_test: np.ndarray, positive: int, clean_scores: dict[str, ProbeScore],
                   groups: list[str] | None = None, shifted: tuple[str, ...] = (), notes: dict[str, Any] | None = None
                   ) -> dict[str, ConditionResult]:
    """``<family>/<subset>``: the clean-fitted probes scored on each subset (a mask) of the test images."""
    out: dict[str, ConditionResult] = {}
    for subset, mask in subsets.items():
        r = ConditionResult(f"{family}/{subset}", family, subset in shifted, subset=subset, notes=notes or {})
        if mask.any():
            r.scores, _ = score_all(probes, test_feats[mask], y_test[mask], positive, clean_scores,
                                    [groups[i] for i in np.flatnonzero(mask)] if groups else None)
        else:
            r.skipped = "no test images in this subset"
        out[r.name] = r
    return out


def shortcut_split(data: ProbeData, probes: FittedProbes, test_feats: np.ndarray, y: dict[str, np.ndarray],
                   clean_scores: dict[str, ProbeScore], groups: list[str] | None = None) -> dict[str, ConditionResult]:
    """``domain/typical`` and ``domain/atypical``: test images whose domain is / is not their class's
    most frequent domain in train. With confounded training data the atypical ones are the flipped
    domain, where a probe that learnt the domain instead of the class fails."""
    typical = typical_domain(y["train"], data.domain_of("train"))
    test_dom = data.domain_of("test")
    is_typical = np.array([typical.get(int(label)) == d for label, d in zip(y["test"], test_dom, strict=True)])
    notes = {"train_class_domain_association": round(class_domain_association(y["train"], data.domain_of("train")), 4),
             "typical_domain": {data.classes[c]: d for c, d in typical.items()}}
    return subset_results("domain", {"typical": is_typical, "atypical": ~is_typical}, probes, test_feats, y["test"],
                          data.positive, clean_scores, groups, shifted=("atypical",), notes=notes)


def adequacy_of_test_images(cfg: ProbeConfig, data: ProbeData) -> tuple[np.ndarray, dict[str, Any]]:
    """Whether each test image is assessable (``roseprior.adequacy`` on the image as stored; unreadable:
    flagged), and the counts per reason."""
    from roseprior.adequacy import assess_paths

    verdicts = [(str(path), q.reasons if q else ["unreadable"]) for path, q, _ in
                assess_paths([s.path for s in data.splits["test"]], cfg.adequacy, cfg.progress)]
    mask = np.array([not why for _, why in verdicts], dtype=bool)
    return mask, {"assessable": int(mask.sum()), "flagged": int((~mask).sum()), "thresholds": vars(cfg.adequacy),
                  "reasons": dict(Counter(r for _, why in verdicts for r in why)),
                  "flagged_images": [path for path, why in verdicts if why]}


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def run(cfg: ProbeConfig) -> dict[str, Any]:
    """Evaluate every checkpoint and write ``report.json``, ``report.html``, ``config.yaml`` and ``tb/``."""
    from eval_probes import report as report_lib
    from roseprior.checkpoint import atomic_write_json
    from roseprior.config import save_config, to_dict

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
    from roseprior.metrics import small_class_warnings

    warnings = [w for split in ("val", "test") for w in small_class_warnings(f"the {split} split", data.labels(split), data.classes)]
    for warning in warnings:
        log.warning("eval_probes: warning: %s", warning)
    log.info("eval_probes: %d checkpoints x %d conditions on %s", len(names), len(conditions), data.root)

    assessable, adequacy = adequacy_of_test_images(cfg, data) if cfg.adequacy_split else (None, None)
    runs = [evaluate_checkpoint(cfg, data, conditions, spec, name, cache, device, assessable)
            for spec, name in zip(cfg.checkpoints, names, strict=True)]
    for r in runs:
        overlap = r.result["test_overlap"]
        if overlap and overlap["test_images"]:
            notes.append(f"{r.name} was trained on {overlap['test_images']} of the {overlap['of']} test images "
                         f"({', '.join(f'{n} as {k}' for k, n in overlap['as'].items())}): its scores here are not "
                         "held-out. Probe with the data.split_dir / split settings it was trained with")
    report = {
        "config": to_dict(cfg),
        "data": {
            "root": str(data.root),
            "classes": data.classes,
            "positive_class": data.classes[data.positive],
            "splits": {k: len(v) for k, v in data.splits.items()},
            "split_source": data.split_source,
            "split_fingerprint": data.split_fingerprint,
            "domains": data.domains,
            "fingerprints": data.fingerprints,
            "adequacy": adequacy,
        },
        "conditions": [c.describe() for c in conditions],
        "probes": list(PROBES),
        "notes": notes,
        "warnings": warnings,
        "cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses},
        "checkpoints": {r.name: r.result for r in runs},
    }
    atomic_write_json(out_dir / "report.json", report)
    report_lib.write_html(out_dir / "report.html", report, runs, data, cfg)
    if cfg.tensorboard:
        report_lib.write_tensorboard(out_dir / "tb", report, runs, data, projector=cfg.projector)
    return report
