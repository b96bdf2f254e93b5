"""The finetune loop: DINO's linear story on accelerate, with SAM's two-pass step plugged in.

``run(cfg)`` reads the splits, trains (once, or once per fold), selects the checkpoint on the
validation split only (best balanced accuracy, ties to the lower validation loss), and only then
builds the test loader and evaluates the selected checkpoint on it, once. It writes
``best.safetensors`` + ``best.json``, ``metrics.json``, ``config.yaml``, ``tb/`` and ``cam/``.
"""

from __future__ import annotations

import csv
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
from tqdm.auto import tqdm

from roseprior.checkpoint import atomic_write_json
from roseprior.config import save_config
from roseprior.data import ImageDataset, Sample, filter_readable, load_labelled, resolve_root
from roseprior.errors import ConfigError, DataError

from .augment import TrainAugment
from .config import FinetuneConfig
from .model import Classifier, param_groups, save_classifier
from .sam import build_optimizer, step_for

__all__ = ["FitResult", "compute_metrics", "evaluate", "fit", "is_better", "load_splits", "run"]

SCALAR_KEYS = (
    "accuracy", "specificity", "sensitivity", "ppv", "npv", "f1", "balanced_accuracy", "auroc", "ece", "n",
)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` hands back: the selected epoch and its validation results."""

    model: nn.Module  # unwrapped, holding the selected (best) weights
    best_epoch: int
    val_metrics: dict[str, Any]
    val_loss: float
    steps: int


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _has_own_split(root: Path) -> bool:
    """Whether the data already says which image is train/val/test (folders or a split column)."""
    if root.is_dir() and (root / "train").is_dir():
        return True
    manifest = root if root.is_file() else root / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
        return "split" in [c.strip() for c in header]
    return False


def load_splits(cfg: FinetuneConfig, out_dir: Path | None = None) -> dict[str, list[Sample]]:
    """train/val/test samples: the data's own split (721/712 folders, split_dir, a split column),
    else a seeded ``split_samples`` with ``data.split_ratios`` and ``data.group_by``."""
    from roseprior.splits import split_samples

    data = cfg.data
    root = resolve_root(data)
    if data.split_dir is not None or _has_own_split(root):
        splits = {s: load_labelled(root, data.classes, split=s, split_dir=data.split_dir) for s in ("train", "val", "test")}
    else:
        splits = split_samples(load_labelled(root, data.classes), data.split_ratios, data.group_by, cfg.seed)
    for name in ("train", "val"):
        if not splits[name]:
            raise DataError(f"{root}: the {name} split is empty; check data.root and data.split_ratios")
    # One decoding pass over every split, one skipped_files.csv in out_dir.
    everything = [s for name in ("train", "val", "test") for s in splits[name]]
    readable = {s.path for s in filter_readable(everything, out_dir, data.max_unreadable_fraction)}
    return {name: [s for s in samples if s.path in readable] for name, samples in splits.items()}


def _loader(samples: Sequence[Sample], cfg: FinetuneConfig, train: bool) -> torch.utils.data.DataLoader:
    dataset = ImageDataset(samples, image_size=cfg.data.image_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = cfg.train.batch_size if train else (cfg.train.eval_batch_size or 2 * cfg.train.batch_size)
    sampler = None
    if train and cfg.train.balance == "sampler":
        counts = Counter(s.label for s in samples)
        weights = torch.tensor([1.0 / counts[s.label] for s in samples], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(samples), replacement=True, generator=generator)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator if train and sampler is None else None,
        num_workers=cfg.data.num_workers,
        # BatchNorm cannot train on a batch of one; a ragged last batch is dropped when training.
        drop_last=train and len(samples) > batch_size,
        persistent_workers=cfg.data.num_workers > 0,
    )


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
    return Classifier(backbone, num_classes=len(cfg.data.classes), drop_rate=cfg.drop_rate)


def lr_schedule(total_steps: int, steps_per_epoch: int, cfg: FinetuneConfig) -> np.ndarray:
    """Per-step lr factor (DINO's schedule-as-array): linear warmup, then cosine to min_lr_ratio."""
    optim = cfg.optim
    warmup = min(int(optim.warmup_epochs * steps_per_epoch), total_steps)
    ramp = np.linspace(1.0 / max(warmup, 1), 1.0, warmup) if warmup else np.zeros(0)
    rest = total_steps - warmup
    if optim.schedule == "constant":
        tail = np.ones(rest)
    else:
        t = np.arange(rest) / max(rest - 1, 1)
        tail = optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + np.cos(math.pi * t))
    return np.concatenate([ramp, tail])


def _part_lrs(cfg: FinetuneConfig) -> dict[str, float]:
    base = cfg.train.lr
    return {
        "cnn": cfg.optim.lr_cnn if cfg.optim.lr_cnn is not None else base,
        "transformer": cfg.optim.lr_transformer if cfg.optim.lr_transformer is not None else base,
        "head": cfg.optim.lr_head if cfg.optim.lr_head is not None else base,
    }


def make_accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator

    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "no" if use_cpu else "bf16"
    # bf16 needs no loss scaler: accelerate applies autocast only, no GradScaler.
    return Accelerator(cpu=use_cpu, mixed_precision=precision)


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
    probs, labels, indices, losses = [], [], [], []
    for images, targets, index in loader:
        logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, targets, reduction="none")
        logits, targets, index, loss = accelerator.gather_for_metrics((logits, targets, index, loss))
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(targets.cpu())
        indices.append(index.cpu())
        losses.append(loss.cpu())
    loss = torch.cat(losses)
    return {
        "loss": float(loss.mean()) if len(loss) else math.nan,
        "probs": torch.cat(probs).numpy(),
        "labels": torch.cat(labels).numpy(),
        "indices": torch.cat(indices).numpy(),
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_one_epoch(
    model, loader, criterion, optimizer, accelerator, step_fn, augment, schedule, state, cfg, epoch, writer
) -> float:
    """One pass over the training loader; ``state['step']`` is the global step (indexes the schedule)."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True, leave=False)
    for images, targets, _ in bar:
        step = state["step"]
        if step >= len(schedule):
            break
        # ====== hyperparameters for this step ======
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * schedule[step]
        # ====== augment, forward-backward (once or twice), step ======
        images = augment(images)
        loss, _ = step_fn(model, images, targets, criterion, optimizer, accelerator, cfg.optim.clip_grad)
        state["step"] += 1
        # ====== logging ======
        value = loss.item()
        total, count = total + value, count + 1
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if writer is not None and step % max(cfg.train.log_every, 1) == 0:
            writer.add_scalar("train/loss_step", value, step)
    bar.close()
    return total / max(count, 1)


def fit(
    cfg: FinetuneConfig,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    accelerator,
    out_dir: Path,
    tb_dir: Path | None = None,
) -> FitResult:
    """Train on ``train_samples`` and select a checkpoint on ``val_samples``; no other data is read."""
    num_classes = len(cfg.data.classes)
    positive_index = cfg.data.classes.index(cfg.data.positive_class)

    # ====== data ======
    train_loader = _loader(train_samples, cfg, train=True)
    val_loader = _loader(val_samples, cfg, train=False)

    # ====== model, loss, optimizer ======
    model = build_classifier(cfg)
    weight = _class_weights(train_samples, num_classes) if cfg.train.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    groups = param_groups(model, _part_lrs(cfg), cfg.train.weight_decay, cfg.optim.layer_decay,
                          cfg.optim.decay_norm_and_bias)
    optimizer = build_optimizer(groups, cfg.optim.name, cfg.sam, cfg.resolved_rho, cfg.train.lr,
                                cfg.train.weight_decay, cfg.optim.momentum)
    criterion = criterion.to(accelerator.device)  # not prepared: DDP refuses a module without parameters
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    # ====== schedule, step function, augmentation ======
    steps_per_epoch = len(train_loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedule = lr_schedule(total_steps, steps_per_epoch, cfg)
    step_fn = step_for(cfg.sam)
    augment = TrainAugment(cfg.augment, seed=cfg.seed * 1009 + accelerator.process_index)
    writer = _writer(tb_dir) if accelerator.is_main_process and tb_dir is not None else None
    accelerator.print(
        f"finetune: {len(train_samples)} train / {len(val_samples)} val images, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps, sam={cfg.sam}" + (f" rho={cfg.resolved_rho}" if cfg.sam != "off" else "")
    )

    # ====== training, with selection on the validation split ======
    state = {"step": 0}
    best: tuple[float, float] | None = None
    best_epoch, best_metrics, best_loss = -1, {}, math.inf
    epoch = 0
    for epoch in range(cfg.train.epochs):
        train_loss = train_one_epoch(model, train_loader, criterion, optimizer, accelerator, step_fn, augment,
                                     schedule, state, cfg, epoch, writer)
        val = evaluate(model, val_loader, accelerator)
        metrics = compute_metrics(val["labels"], val["probs"], positive_index)
        if is_better(metrics, val["loss"], best):
            best = (metrics["balanced_accuracy"], val["loss"])
            best_epoch, best_metrics, best_loss = epoch, metrics, val["loss"]
            if accelerator.is_main_process:
                save_classifier(accelerator.unwrap_model(model), out_dir, {
                    "init": cfg.init, "classes": cfg.data.classes, "positive_class": cfg.data.positive_class,
                    "image_size": cfg.data.image_size, "epoch": epoch, "step": state["step"],
                    "selected_by": "val balanced_accuracy, ties: lower val loss",
                    "val": {k: metrics[k] for k in SCALAR_KEYS if k in metrics},
                })
        accelerator.print(
            f"epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
            f"val balanced acc {metrics['balanced_accuracy']:.4f}, auroc {_fmt(metrics['auroc'])}"
            + (" (best)" if best_epoch == epoch else "")
        )
        if writer is not None:
            writer.add_scalar("train/loss", train_loss, epoch)
            writer.add_scalar("val/loss", val["loss"], epoch)
            for group in optimizer.param_groups:
                writer.add_scalar(f"lr/{group['part']}", group["lr"], epoch)
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"val/{key}", value, epoch)
            writer.flush()
        if state["step"] >= total_steps:
            break
    if writer is not None:
        writer.close()

    # ====== the selected weights back into the model ======
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    _load_weights(unwrapped, out_dir / "best.safetensors")
    return FitResult(unwrapped, best_epoch, best_metrics, best_loss, state["step"])


def _writer(tb_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(tb_dir))


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path), device=str(next(model.parameters()).device)))


def evaluate_test(cfg: FinetuneConfig, model: nn.Module, test_samples: Sequence[Sample], accelerator) -> dict[str, Any]:
    """The selected checkpoint on the test split: the one and only time the test split is read."""
    positive_index = cfg.data.classes.index(cfg.data.positive_class)
    loader = accelerator.prepare(_loader(test_samples, cfg, train=False))
    result = evaluate(model, loader, accelerator)
    result["metrics"] = compute_metrics(result["labels"], result["probs"], positive_index)
    return result


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

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    splits = load_splits(cfg, out_dir if accelerator.is_main_process else None)
    if not splits["test"]:
        raise DataError("the test split is empty; check data.root and data.split_ratios")
    common = {
        "classes": cfg.data.classes, "positive_class": cfg.data.positive_class, "init": cfg.init,
        "sam": cfg.sam, "rho": cfg.resolved_rho if cfg.sam != "off" else None,
        "sizes": {k: len(v) for k, v in splits.items()},
    }

    if cfg.folds:
        metrics, test_result = _run_folds(cfg, splits, accelerator, out_dir)
        metrics.update(common)
    else:
        result = fit(cfg, splits["train"], splits["val"], accelerator, out_dir, out_dir / "tb")
        test_result = evaluate_test(cfg, result.model, splits["test"], accelerator)
        metrics = {
            "val": result.val_metrics, "test": test_result["metrics"], "best_epoch": result.best_epoch,
            "val_loss": result.val_loss, "steps": result.steps, **common,
        }
        model = result.model
    if accelerator.is_main_process:
        atomic_write_json(out_dir / "metrics.json", metrics)
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


def _run_folds(cfg, splits, accelerator, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    pool = splits["train"] + splits["val"]
    folds = _fold_splits(pool, cfg.folds, cfg.data.group_by, cfg.seed)
    val_all, test_all, best_fold, best_key, best_test = [], [], -1, None, None
    out: dict[str, Any] = {"val": {}, "test": {}, "best_epoch": {}}
    for k, (train, val) in enumerate(folds):
        accelerator.print(f"finetune: fold {k + 1}/{cfg.folds}")
        fold_dir = out_dir / f"fold{k}"
        if accelerator.is_main_process:
            fold_dir.mkdir(parents=True, exist_ok=True)
        result = fit(cfg, train, val, accelerator, fold_dir, out_dir / "tb" / f"fold{k}")
        test = evaluate_test(cfg, result.model, splits["test"], accelerator)
        out["val"][f"fold{k}"] = result.val_metrics
        out["test"][f"fold{k}"] = test["metrics"]
        out["best_epoch"][f"fold{k}"] = result.best_epoch
        val_all.append(result.val_metrics)
        test_all.append(test["metrics"])
        # The fold whose model is kept as out_dir/best.*: chosen on validation, like an epoch.
        if is_better(result.val_metrics, result.val_loss, best_key):
            best_fold, best_key, best_test = k, (result.val_metrics["balanced_accuracy"], result.val_loss), test
        accelerator.free_memory()
    for split, values in (("val", val_all), ("test", test_all)):
        out[split]["mean"], out[split]["std"] = _summary(values)
    out["best_fold"] = best_fold
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
            cells = [f"{k} {_fmt(m['mean'][k])}±{_fmt(m['std'][k])}" for k in keys if k in m["mean"]]
        else:
            cells = [f"{k} {_fmt(m[k])}" for k in keys if k in m]
        lines.append(f"{split}: " + ", ".join(cells))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
