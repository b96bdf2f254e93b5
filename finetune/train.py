"""The finetune run: SAM's two-pass step on the shared training loop (``roseprior.loop``).

``run(cfg)`` resolves the splits (``roseprior.splits.resolve_splits``, as every stage does),
trains (once, or once per fold), selects the checkpoint on the validation split only (best
balanced accuracy, ties to the lower validation loss), and only then builds the test loader and
evaluates the selected checkpoint on it, once. It writes ``best.safetensors`` + ``best.json``,
``metrics.json``, ``config.yaml``, ``tb/``, ``cam/`` and resumable ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from roseprior.checkpoint import atomic_write_json
from roseprior.data import ImageDataset, Sample
from roseprior.errors import ConfigError, DataError
from roseprior.loop import (
    RUN_FILE,
    Hooks,
    TrainLoop,
    check_same_run,
    make_accelerator,
    run_identity,
    seeded_permutation,
)
from roseprior.metrics import format_with_intervals
from roseprior.scale import training_scale
from roseprior.splits import resolve_splits, write_image_list

from .augment import TrainAugment, stain_targets
from .config import FinetuneConfig
from .model import Classifier, save_classifier
from .sam import build_optimizer, step_for

__all__ = ["FitResult", "compute_metrics", "evaluate", "fit", "is_better", "load_splits", "run"]

SCALAR_KEYS = (
    "accuracy", "specificity", "sensitivity", "ppv", "npv", "f1", "balanced_accuracy", "auroc", "ece", "n",
)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` hands back: the selected epoch (chosen on one view of validation, see ``evaluate_selected``)."""

    model: nn.Module  # unwrapped, holding the selected (best) weights
    best_epoch: int
    steps: int


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_splits(cfg: FinetuneConfig, out_dir: Path | None = None):
    """train/val/test by the rule every stage shares (``resolve_splits``), unreadable images dropped."""
    return resolve_splits(cfg.data).readable(out_dir, cfg.data.max_unreadable_fraction)


def _eval_loader(samples: Sequence[Sample], cfg: FinetuneConfig) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ImageDataset(samples, image_size=cfg.data.image_size),
                                       batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size,
                                       num_workers=cfg.data.num_workers)


def _stack(items: list[Any], epoch: int) -> Any:
    return torch.utils.data.default_collate(items)


def _train_order(samples: Sequence[Sample], cfg: FinetuneConfig) -> Any:
    """Each epoch's sample order: a seeded permutation, or class-balanced draws with replacement."""
    if cfg.train.balance != "sampler":
        return seeded_permutation(cfg.seed)
    counts = Counter(s.label for s in samples)
    weights = torch.tensor([1.0 / counts[s.label] for s in samples], dtype=torch.double)

    def order(n: int, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(hash((cfg.seed, epoch, -2)) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.multinomial(weights, n, replacement=True, generator=generator).numpy()

    return order


def _class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """n / (k · n_c): each class contributes equally to the loss."""
    counts = Counter(s.label for s in samples)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise DataError(f"the training split has no images of class index {missing}; check data.classes")
    return torch.tensor([len(samples) / (num_classes * counts[c]) for c in range(num_classes)])


# ---------------------------------------------------------------------------------------------
# Model and schedule
# ---------------------------------------------------------------------------------------------


def build_classifier(cfg: FinetuneConfig) -> Classifier:
    """The backbone from ``cfg.init`` (saved folder, registry/timm name, or state-dict file) plus a head."""
    import backbones

    kwargs = dict(cfg.model)
    if backbones.is_model(cfg.init) and not cfg.init.startswith(backbones.TIMM_PREFIX):
        # Our registry models size their position grid by img_size; match it to the images
        # (a saved folder keeps its own grid and resamples, so it is left alone).
        kwargs.setdefault("img_size", cfg.data.image_size)
    backbone = backbones.load_init(cfg.init, model=cfg.arch, **kwargs)
    return Classifier(backbone, num_classes=len(cfg.data.classes), drop_rate=cfg.drop_rate,
                      dihedral_mean=cfg.decision.dihedral_mean)


def identity(cfg: FinetuneConfig, data_fingerprint: str) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (``roseprior.loop``)."""
    import backbones

    return {"data": data_fingerprint, "init": cfg.init, "init_fingerprint": backbones.init_fingerprint(cfg.init, cfg.seed),
            "model": cfg.model, "arch": cfg.arch, "sam": cfg.sam}


def _part_lrs(cfg: FinetuneConfig) -> dict[str, float]:
    base = cfg.train.lr
    return {
        "cnn": cfg.optim.lr_cnn if cfg.optim.lr_cnn is not None else base,
        "transformer": cfg.optim.lr_transformer if cfg.optim.lr_transformer is not None else base,
        "head": cfg.optim.lr_head if cfg.optim.lr_head is not None else base,
    }


def build_optimizer_for(model: Classifier, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Per-part learning rates (and layer decay) on the base optimizer, SAM-wrapped unless ``sam: off``."""
    import backbones

    def part_of(name: str) -> str:
        inner = name.removeprefix("backbone.")
        return backbones.group_of(model.backbone, inner) if name.startswith("backbone.") else "head"

    groups = backbones.param_groups(model, _part_lrs(cfg), cfg.train.weight_decay, cfg.optim.layer_decay,
                                    cfg.optim.decay_norm_and_bias, part_of=part_of)
    return build_optimizer(groups, cfg.optim.name, cfg.sam, cfg.resolved_rho, cfg.train.lr, cfg.train.weight_decay,
                           cfg.optim.momentum)


# ---------------------------------------------------------------------------------------------
# Metrics and selection
# ---------------------------------------------------------------------------------------------


def compute_metrics(labels: np.ndarray, probs: np.ndarray, positive_index: int) -> dict[str, Any]:
    """Clinical metrics with ``positive_index`` (P) as the positive class, from class probabilities."""
    from roseprior.metrics import binary_metrics

    y_true = (np.asarray(labels) == positive_index).astype(int)
    p_pos = np.asarray(probs, dtype=np.float64)[:, positive_index]
    return binary_metrics(y_true, p_pos)


def is_better(metrics: dict[str, Any], loss: float, best: tuple[float, float] | None) -> bool:
    """Higher validation balanced accuracy wins; a tie goes to the lower validation loss."""
    if best is None:
        return True
    bacc = metrics["balanced_accuracy"]
    return bacc > best[0] or (bacc == best[0] and loss < best[1])


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator) -> dict[str, Any]:
    """Mean (unweighted) cross-entropy, class probabilities, labels and dataset indices over ``loader``.

    Per-image values all the way, so ``gather_for_metrics`` can drop the samples a distributed
    sampler repeats to even out the last batch.
    """
    model.eval()
    all_logits, labels, indices, losses = [], [], [], []
    for images, targets, index in loader:
        logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, targets, reduction="none")
        logits, targets, index, loss = accelerator.gather_for_metrics((logits, targets, index, loss))
        all_logits.append(logits.cpu())
        labels.append(targets.cpu())
        indices.append(index.cpu())
        losses.append(loss.cpu())
    loss, logits = torch.cat(losses), torch.cat(all_logits)
    return {
        "loss": float(loss.mean()) if len(loss) else math.nan,
        "logits": logits.numpy(),
        "probs": logits.softmax(dim=1).numpy(),
        "labels": torch.cat(labels).numpy(),
        "indices": torch.cat(indices).numpy(),
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def fit(cfg: FinetuneConfig, train_samples: Sequence[Sample], val_samples: Sequence[Sample], accelerator: Any,
        out_dir: Path, run_identity: dict[str, Any]) -> FitResult:
    """Train on ``train_samples`` and select a checkpoint on ``val_samples``; no other data is read."""
    num_classes = len(cfg.data.classes)
    positive_index = cfg.data.classes.index(cfg.data.positive_class)
    loop = TrainLoop(accelerator, cfg.train, cfg.checkpoint, out_dir, identity=run_identity, seed=cfg.seed,
                     name="finetune")
    loop.plan(len(train_samples))

    # ====== model, loss, optimizer ======
    model = build_classifier(cfg)
    weight = _class_weights(train_samples, num_classes) if cfg.train.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight).to(accelerator.device)  # not prepared: DDP refuses no-param modules
    optimizer = build_optimizer_for(model, cfg)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, _eval_loader(val_samples, cfg))
    unwrapped = accelerator.unwrap_model(model)
    targets = None
    if cfg.augment.stain_targets:
        targets = stain_targets(cfg.augment.stain_targets, cfg.data.image_size, cfg.data.max_unreadable_fraction)
        accelerator.print(f"finetune: stain swaps take the stains of {len(targets)} images of {cfg.augment.stain_targets}")
    augment = TrainAugment(cfg.augment, seed=cfg.seed * 1009 + accelerator.process_index, stain_targets=targets)

    # ====== resume, then the loader from where we are ======
    loop.start(cfg, unwrapped, optimizer, augment=augment)
    loader = loop.loader(ImageDataset(train_samples, image_size=cfg.data.image_size, random_window=True), _stack,
                         _train_order(train_samples, cfg), cfg.data.num_workers)
    accelerator.print(
        f"finetune: {len(train_samples)} train / {len(val_samples)} val images, {loop.steps_per_epoch} steps/epoch, "
        f"{loop.run_steps} steps, sam={cfg.sam}" + (f" rho={cfg.resolved_rho}" if cfg.sam != "off" else ""))

    # ====== the step, and selection on the validation split at the end of each epoch ======
    sam_or_plain = step_for(cfg.sam)
    epoch_loss = {"sum": 0.0, "n": 0}

    def step(batch: Any, index: int, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        images, targets, _ = batch
        model.train()  # validation at the end of an epoch left it in eval mode
        loss, _ = sam_or_plain(model, augment(images), targets, criterion, optimizer, accelerator, cfg.train.clip_grad)
        epoch_loss["sum"], epoch_loss["n"] = epoch_loss["sum"] + loss.item(), epoch_loss["n"] + 1
        return loss, {}

    def end_of_epoch(epoch: int, partial: bool) -> dict[str, Any]:
        with unwrapped.one_view():  # selection: one view is 8x cheaper, and the choice of epoch is what it is for
            val = evaluate(model, val_loader, accelerator)
        metrics = compute_metrics(val["labels"], val["probs"], positive_index)
        best = loop.state.get("best")
        improved = is_better(metrics, val["loss"], (best["balanced_accuracy"], best["loss"]) if best else None)
        if improved:
            loop.state["best"] = {"epoch": epoch, "balanced_accuracy": metrics["balanced_accuracy"],
                                  "loss": val["loss"], "metrics": metrics}
            if accelerator.is_main_process:
                save_classifier(unwrapped, out_dir, {
                    "init": cfg.init, "classes": cfg.data.classes, "positive_class": cfg.data.positive_class,
                    "image_size": cfg.data.image_size, "epoch": epoch, "step": loop.step,
                    "selected_by": "val balanced_accuracy, ties: lower val loss (one view of each field)",
                    "val": {k: metrics[k] for k in SCALAR_KEYS if k in metrics},
                })
            accelerator.wait_for_everyone()
        train_loss = epoch_loss["sum"] / max(epoch_loss["n"], 1)
        epoch_loss.update(sum=0.0, n=0)
        accelerator.print(
            f"epoch {epoch + 1}{' (partial)' if partial else ''}: train loss {train_loss:.4f}, val loss "
            f"{val['loss']:.4f}, val balanced acc {metrics['balanced_accuracy']:.4f}, auroc {_fmt(metrics['auroc'])}"
            + (" (best)" if improved else ""))
        return {"val/loss": val["loss"], **{f"val/{k}": v for k, v in metrics.items()
                                            if isinstance(v, (int, float)) and math.isfinite(v)}}

    loop.run(loader, step, Hooks(end_of_epoch=end_of_epoch))

    # ====== the selected weights back into the model ======
    best = loop.state.get("best")
    if best is None or not (out_dir / "best.safetensors").is_file():
        raise DataError(f"{out_dir}: no epoch finished, so no model was selected; raise train.epochs or train.max_steps")
    accelerator.wait_for_everyone()
    _load_weights(unwrapped, out_dir / "best.safetensors")
    return FitResult(unwrapped, best["epoch"], loop.step)


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path), device=str(next(model.parameters()).device)))


def evaluate_selected(cfg: FinetuneConfig, model: nn.Module, samples: Sequence[Sample], accelerator) -> dict[str, Any]:
    """The selected checkpoint on validation or test, read as it will be called (``decision.dihedral_mean``),
    with its metrics. Epochs are selected on one view, which is cheaper; every figure reported, and the
    calibration and operating point, come from here. The test split is read only here, once per model."""
    positive_index = cfg.data.classes.index(cfg.data.positive_class)
    loader = accelerator.prepare(_eval_loader(samples, cfg))
    result = evaluate(model, loader, accelerator)
    result["metrics"] = compute_metrics(result["labels"], result["probs"], positive_index)
    return result


def with_intervals(metrics: dict[str, Any], result: dict[str, Any], samples: Sequence[Sample], cfg: FinetuneConfig,
                   split: str) -> dict[str, Any]:
    """``metrics`` plus ``ci95`` (seeded percentile bootstrap, whole groups when ``data.group_by`` is
    set) and the small-class warnings of this split."""
    from roseprior.metrics import with_intervals as metrics_with_intervals
    from roseprior.splits import group_key

    positive = cfg.data.classes.index(cfg.data.positive_class)
    groups = ([group_key(samples[int(i)], cfg.data.group_by) or samples[int(i)].path for i in result["indices"]]
              if cfg.data.group_by else None)
    return metrics_with_intervals(metrics, result["labels"], result["probs"][:, positive], cfg.data.classes, positive,
                                  f"the {split} split", groups, seed=cfg.seed)


def per_domain(result: dict[str, Any], samples: Sequence[Sample], cfg: FinetuneConfig, split: str
               ) -> dict[str, dict[str, Any]]:
    """``split``'s metrics (with intervals) for each of its sites (``domain``), when it has more than one: one
    number for a test split of two sites hides the one the model fails on."""
    domains = np.array([samples[int(i)].domain or "" for i in result["indices"]])
    names = sorted(set(domains) - {""})
    if len(names) < 2:
        return {}
    positive = cfg.data.classes.index(cfg.data.positive_class)
    out = {}
    for name in names:
        part = {key: result[key][domains == name] for key in ("labels", "probs", "indices")}
        out[name] = with_intervals(compute_metrics(part["labels"], part["probs"], positive), part, samples, cfg,
                                   f"{split} ({name})")
    return out


def decide(cfg: FinetuneConfig, val: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """Temperature fitted on validation logits, and the operating point for ``decision.target_sensitivity``
    chosen on the calibrated validation probabilities, then read off on test (``roseprior.calibration``)."""
    from roseprior.calibration import apply_temperature, fit_temperature, operating_point
    from roseprior.metrics import expected_calibration_error

    positive = cfg.data.classes.index(cfg.data.positive_class)
    temperature = fit_temperature(val["logits"], val["labels"]) if cfg.decision.calibrate else 1.0
    val_p, test_p = (apply_temperature(r["logits"], temperature) for r in (val, test))
    point = operating_point(val["labels"] == positive, val_p[:, positive], cfg.decision.target_sensitivity)
    called = test_p[:, positive] >= point["threshold"]
    y_test = test["labels"] == positive
    return {
        "calibration": {"temperature": temperature,
                        "val_ece_before": expected_calibration_error(val["labels"], val["probs"]),
                        "val_ece_after": expected_calibration_error(val["labels"], val_p),
                        "test_ece_before": expected_calibration_error(test["labels"], test["probs"]),
                        "test_ece_after": expected_calibration_error(test["labels"], test_p)},
        "operating_point": {"target_sensitivity": cfg.decision.target_sensitivity, "threshold": point["threshold"],
                            "val_sensitivity": point["sensitivity"], "val_specificity": point["specificity"],
                            "test_sensitivity": float(called[y_test].mean()) if y_test.any() else None,
                            "test_specificity": float((~called[~y_test]).mean()) if (~y_test).any() else None},
    }


def record_decision(out_dir: Path, decision: dict[str, Any], dihedral_mean: bool,
                    scale: dict[str, Any] | None = None) -> None:
    """Store the temperature, the threshold, the reading they were chosen on and the training scale in
    ``best.json``, where predict and export read them (a run resumed from an older ``best.json`` gets the
    reading that its threshold was chosen on)."""
    import json

    meta = json.loads((out_dir / "best.json").read_text())
    meta["dihedral_mean"] = dihedral_mean
    meta["temperature"] = decision["calibration"]["temperature"]
    meta["decision"] = {k: decision["operating_point"][k] for k in ("threshold", "target_sensitivity")}
    if scale is not None:
        meta["scale"] = scale
    atomic_write_json(out_dir / "best.json", meta)


def run_splits(run: Path) -> tuple[FinetuneConfig, dict[str, list[Sample]]] | None:
    """A finetune run folder's config and its splits as it resolved them (``load_splits``), or None when its
    config.yaml is gone or its images cannot be read."""
    from roseprior.config import load_config

    if not (run / "config.yaml").is_file():
        return None
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    try:
        return cfg, load_splits(cfg).splits
    except DataError:
        return None


def off_scale_warnings(test: list[Sample], train: list[Sample], scale: dict[str, Any], source: str) -> list[str]:
    """A warning for each site of the test split (its ``domain``; the whole split without one) whose nuclei, on
    up to ``roseprior.scale.CHECK_FIELDS`` of its images, read ``OFF_SCALE`` or more from the training scale: its
    images were squeezed into the model's input at another magnification than the training images, and its
    numbers say so (the issue's test split at 4x lower magnification lost 17 points). A site the training split
    also has is not checked: its own training images were seen at its scale. None when the images were brought to
    one scale (``data.target_mpp``)."""
    from roseprior import scale as scales

    if scale.get("target_mpp") is not None:
        return []
    trained_sites = {sample.domain for sample in train if sample.domain}
    sites: dict[str | None, list[Sample]] = {}
    for sample in test:
        if sample.domain not in trained_sites:
            sites.setdefault(sample.domain, []).append(sample)
    warnings = []
    for site, samples in sorted(sites.items(), key=lambda item: str(item[0])):
        relative, measured = scales.sampled_scale([s.path for s in samples], scale, source, scales.CHECK_FIELDS)
        if measured and scales.is_off_scale(relative):
            warnings.append(f"the test split{f' of {site}' if site else ''} shows objects {relative:.2f}x as large as "
                            f"the training split (nuclei of {measured} images): its numbers are at another "
                            "magnification than training. Give each image its scale (roseprior scale --per-folder, "
                            "data.target_mpp), or predict it with --scale auto")
    return warnings


def current_training_scale(run: Path, recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's training scale (``best.json``'s ``scale``) whose reference today's ``--scale auto`` can read: one
    measured by an older roseprior (``roseprior.scale.MEASURE_VERSION``) is rebuilt from the run's training
    split, in memory (the run folder is not touched). Returned as recorded when it is current, or when the
    training images cannot be found (``shared_scale`` then says what to do)."""
    import sys

    from roseprior.scale import MEASURE_VERSION

    reference = (recorded or {}).get("reference")
    if not reference or reference.get("version", 1) == MEASURE_VERSION:
        return recorded
    resolved = run_splits(run)
    if resolved is None:
        return recorded
    cfg, splits = resolved
    print(f"{run}: its scale reference was measured by an older roseprior; rebuilding it from {len(splits['train'])} "
          "training images (fine-tune again to store it)", file=sys.stderr)
    rebuilt = training_scale(splits["train"], cfg.data.image_size, cfg.data.target_mpp, framing=cfg.data.framing)
    return {**recorded, "reference": rebuilt["reference"]}


# ---------------------------------------------------------------------------------------------
# Whole runs: single split or K folds
# ---------------------------------------------------------------------------------------------


def _summary(values: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    mean, std = {}, {}
    for key in SCALAR_KEYS:
        column = [float(v[key]) for v in values if v.get(key) is not None]
        if column:
            mean[key] = float(np.mean(column))
            std[key] = float(np.std(column, ddof=1)) if len(column) > 1 else 0.0
    return mean, std


def _fold_splits(samples: list[Sample], folds: int, group_by: str | None, seed: int) -> list[tuple[list, list]]:
    """K stratified folds of train+val, grouped when ``data.group_by`` is set (sklearn's splitters)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.array([s.label for s in samples])
    if group_by:
        from roseprior.splits import group_key

        groups = np.array([group_key(s, group_by) or s.path for s in samples])
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        pairs = splitter.split(np.zeros(len(samples)), labels, groups)
    else:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        pairs = splitter.split(np.zeros(len(samples)), labels)
    try:
        return [([samples[i] for i in tr], [samples[i] for i in va]) for tr, va in pairs]
    except ValueError as err:
        raise ConfigError(f"folds={folds}: cannot make that many folds of {len(samples)} images ({err})") from None


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Everything ``python -m finetune`` does; returns what it writes to ``metrics.json``."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train.precision)
    out_dir, main = Path(cfg.out_dir), accelerator.is_main_process
    resolved = resolve_splits(cfg.data)
    ident = identity(cfg, resolved.fingerprint)
    folder_identity = run_identity("finetune", accelerator, cfg.train, {**ident, **({"folds": cfg.folds} if cfg.folds else {})})
    if cfg.checkpoint.resume != "never":  # before anything is written into out_dir
        check_same_run(out_dir / RUN_FILE, folder_identity)
    split = resolved.readable(out_dir if main else None, cfg.data.max_unreadable_fraction)
    splits = split.splits
    if not splits["test"]:
        raise DataError("the test split is empty; check data.root and data.split_ratios")
    set_seed(cfg.seed)
    common = {
        "classes": cfg.data.classes, "positive_class": cfg.data.positive_class, "init": cfg.init,
        "sam": cfg.sam, "rho": cfg.resolved_rho if cfg.sam != "off" else None,
        "sizes": {k: len(v) for k, v in splits.items()}, "split": split.describe(),
    }

    if cfg.folds:
        metrics, test_result = _run_folds(cfg, splits, accelerator, out_dir, ident)
        metrics.update(common)
        if main:
            atomic_write_json(out_dir / RUN_FILE, {"identity": folder_identity})
    else:
        result = fit(cfg, splits["train"], splits["val"], accelerator, out_dir, ident)
        val_result = evaluate_selected(cfg, result.model, splits["val"], accelerator)
        test_result = evaluate_selected(cfg, result.model, splits["test"], accelerator)
        metrics = {
            "val": with_intervals(val_result["metrics"], val_result, splits["val"], cfg, "val"),
            "test": with_intervals(test_result["metrics"], test_result, splits["test"], cfg, "test"),
            "test_per_domain": per_domain(test_result, splits["test"], cfg, "test"),
            "best_epoch": result.best_epoch, "val_loss": val_result["loss"], "steps": result.steps,
            **decide(cfg, val_result, test_result), **common,
        }
    metrics["warnings"] = [w for part in ("val", "test") for w in metrics[part].get("warnings", [])]
    if main:
        scale = training_scale(splits["train"], cfg.data.image_size, cfg.data.target_mpp, framing=cfg.data.framing)
        metrics["warnings"] += off_scale_warnings(splits["test"], splits["train"], scale, str(out_dir))
        record_decision(out_dir, metrics, cfg.decision.dihedral_mean, scale)
        atomic_write_json(out_dir / "metrics.json", metrics)
        write_image_list(out_dir, {"train": splits["train"], "val": splits["val"]})
        accelerator.print(_format_metrics(metrics))
        if cfg.cam.enabled:
            from .cam import write_cam_figures
            from .model import load_classifier

            model, _ = load_classifier(out_dir)
            paths = write_cam_figures(model, splits["test"], test_result, cfg, out_dir / "cam")
            accelerator.print(f"finetune: {len(paths)} CAM figure(s) in {out_dir / 'cam'}")
        accelerator.print(f"finetune: wrote {out_dir / 'metrics.json'} and {out_dir / 'best.safetensors'}")
    accelerator.wait_for_everyone()
    return metrics


def _run_folds(cfg, splits, accelerator, out_dir: Path, run_identity: dict[str, Any]) -> tuple[dict, dict]:
    pool = splits["train"] + splits["val"]
    folds = _fold_splits(pool, cfg.folds, cfg.data.group_by, cfg.seed)
    val_all, test_all, best_fold, best_key, best_test = [], [], -1, None, None
    out: dict[str, Any] = {"val": {}, "test": {}, "best_epoch": {}}
    for k, (train, val) in enumerate(folds):
        accelerator.print(f"finetune: fold {k + 1}/{cfg.folds}")
        fold_dir = out_dir / f"fold{k}"
        if accelerator.is_main_process:
            fold_dir.mkdir(parents=True, exist_ok=True)
        result = fit(cfg, train, val, accelerator, fold_dir, {**run_identity, "fold": f"{k + 1}/{cfg.folds}"})
        val_result = evaluate_selected(cfg, result.model, val, accelerator)
        test = evaluate_selected(cfg, result.model, splits["test"], accelerator)
        test["decision"] = decide(cfg, val_result, test)
        out["val"][f"fold{k}"] = with_intervals(val_result["metrics"], val_result, val, cfg, "val")
        out["test"][f"fold{k}"] = with_intervals(test["metrics"], test, splits["test"], cfg, "test")
        out["best_epoch"][f"fold{k}"] = result.best_epoch
        val_all.append(val_result["metrics"])
        test_all.append(test["metrics"])
        # The fold whose model is kept as out_dir/best.*: chosen on validation as it is read and reported.
        if is_better(val_result["metrics"], val_result["loss"], best_key):
            best_fold, best_key, best_test = k, (val_result["metrics"]["balanced_accuracy"], val_result["loss"]), test
        accelerator.free_memory()
    for split, values in (("val", val_all), ("test", test_all)):
        out[split]["mean"], out[split]["std"] = _summary(values)
    out["best_fold"] = best_fold
    out.update(best_test["decision"])  # the kept model's calibration and operating point
    if accelerator.is_main_process:
        for name in ("best.safetensors", "best.json", "backbone.safetensors", "backbone.json"):
            if (out_dir / f"fold{best_fold}" / name).exists():
                shutil.copyfile(out_dir / f"fold{best_fold}" / name, out_dir / name)
    return out, best_test


def _format_metrics(metrics: dict[str, Any]) -> str:
    keys = ("balanced_accuracy", "accuracy", "sensitivity", "specificity", "auroc", "ece")
    lines = []
    for split in ("val", "test"):
        m = metrics[split]
        if "mean" in m:
            cells = ", ".join(f"{k} {_fmt(m['mean'][k])}±{_fmt(m['std'][k])}" for k in keys if k in m["mean"])
        else:
            cells = format_with_intervals(m, keys)
        lines.append(f"{split}: " + cells)
    for domain, m in metrics.get("test_per_domain", {}).items():
        lines.append(f"test ({domain}, {m['n']} images): " + format_with_intervals(m, keys))
    op, cal = metrics["operating_point"], metrics["calibration"]
    lines.append(f"calibration: temperature {cal['temperature']:.3f}, val ECE {cal['val_ece_before']:.4f} -> "
                 f"{cal['val_ece_after']:.4f}")
    lines.append(f"operating point for sensitivity >= {op['target_sensitivity']}: P when p(P) >= {op['threshold']:.4f}; "
                 f"val sensitivity {_fmt(op['val_sensitivity'])} specificity {_fmt(op['val_specificity'])}, test "
                 f"sensitivity {_fmt(op['test_sensitivity'])} specificity {_fmt(op['test_specificity'])}")
    lines += [f"warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
