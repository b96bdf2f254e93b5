"""The pretraining loop: one code path for CPU, one GPU, many GPUs and many machines (accelerate).

Read top to bottom, as DINO's ``train_dino``: data, model, optimizer, schedules, resume, train.
Schedules are arrays indexed by the global step (no scheduler state to save); a step runs, in
order: set lr/wd -> views -> method forward (loss) -> stop if not finite -> backward ->
method hooks (freeze a layer) -> clip -> optimizer step -> EMA teacher -> log.

Distributed runs are equivalent to one process with the global batch: the data order is one
seeded permutation per epoch cut into global batches, each process takes a contiguous slice of
each global batch, and augmentation is keyed per sample (see ``pretrain.views``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

import backbones
from roseprior.checkpoint import atomic_write_json
from roseprior.config import save_config, to_dict
from roseprior.data import filter_readable, load_labelled, load_unlabeled, resolve_root
from roseprior.errors import CheckpointError, ConfigError, DataError, RosepriorError

from .config import PretrainConfig
from .methods import build_method
from .views import DecodedImages, MultiCropViews, collate_decoded, sample_key

__all__ = ["TrainingStopped", "cosine_schedule_array", "data_order", "run"]

log = logging.getLogger("pretrain")

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"


class TrainingStopped(RosepriorError):
    """The run stopped itself (non-finite loss, collapse); the last good checkpoint is kept."""


# ====== schedules ======


def cosine_schedule_array(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                          warmup_start: float = 0.0) -> np.ndarray:
    """One value per step: linear warm-up from ``warmup_start``, then cosine from ``base`` to ``final``.

    DINO's ``utils.cosine_scheduler``; the cosine part is lightly's ``cosine_schedule`` formula.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    steps = np.arange(total_steps - warmup_steps)
    span = max(len(steps) - 1, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / span))
    return np.concatenate([warmup, cosine])


# ====== data order ======


def data_order(num_samples: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(steps_per_epoch, global_batch) sample indices: a seeded permutation cut into global batches."""
    generator = torch.Generator().manual_seed(sample_key(seed, epoch, -1))
    perm = torch.randperm(num_samples, generator=generator).numpy()
    steps = num_samples // global_batch
    return perm[: steps * global_batch].reshape(steps, global_batch)


class GlobalBatchSlices(Sampler[list[int]]):
    """This process's contiguous slice of each global batch of one epoch, from ``start`` on."""

    def __init__(self, order: np.ndarray, rank: int, batch_size: int, start: int = 0) -> None:
        self.order, self.rank, self.batch_size, self.start = order, rank, batch_size, start

    def __len__(self) -> int:
        return len(self.order) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.batch_size
        for row in self.order[self.start :]:
            yield row[lo : lo + self.batch_size].tolist()


def _collate_views(batch: list, views: MultiCropViews | None, epoch: int) -> tuple[Any, ...]:
    images, sizes, indices = collate_decoded(batch)
    if views is None:  # views are made on the device in the loop
        return images, sizes, indices
    return views(images, sizes, indices, epoch), indices


# ====== checkpoints ======


class RunProgress:
    """The loop's position, saved with accelerate's state; everything else follows from the step."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (a meta.json written last), newest first."""
    folder = out_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if p.is_dir() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, keep: int, global_batch: int) -> Path:
    """accelerate's ``save_state`` into a temporary folder, renamed into place once complete.

    The rename is atomic, so a run killed while saving leaves the previous checkpoints intact.
    """
    folder = out_dir / CHECKPOINT_DIR
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / META_FILE, {"step": step, "global_batch": global_batch, "time": time.time()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_state(accelerator: Any, cfg: PretrainConfig, out_dir: Path, global_batch: int) -> Path | None:
    """Load the newest loadable checkpoint; a corrupt one is skipped with a warning.

    The step counts global batches, so a checkpoint only resumes under the same global batch.
    """
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        candidates = list_checkpoints(out_dir)
    else:
        path = Path(mode)
        if not (path / META_FILE).is_file():
            raise CheckpointError(f"checkpoint.resume={mode}: no {META_FILE} there; point it at a "
                                  f"{CHECKPOINT_DIR}/step_* folder, or use auto / never")
        candidates = [path]
    for path in candidates:
        written_with = _read_meta(path).get("global_batch", global_batch)
        if written_with != global_batch:
            raise CheckpointError(
                f"checkpoint {path} was written with a global batch of {written_with} images; this run has "
                f"{global_batch} (train.batch_size x processes). Resume with the same batch and process count, "
                "or set checkpoint.resume=never (or a new out_dir) to start over"
            )
        try:
            accelerator.load_state(str(path))
            return path
        except Exception as err:  # noqa: BLE001 - any failure to read means: try the previous one
            msg = f"checkpoint {path} cannot be loaded ({type(err).__name__}: {str(err)[:200]}); trying the previous one"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            accelerator.print(f"warning: {msg}")
    if candidates:
        raise CheckpointError(f"no checkpoint under {out_dir / CHECKPOINT_DIR} could be loaded; "
                              "delete the folder (or set checkpoint.resume=never) to start over")
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ====== monitoring ======


class Monitor:
    """TensorBoard scalars, ``metrics.jsonl`` and the progress bar (main process only)."""

    def __init__(self, cfg: PretrainConfig, out_dir: Path, enabled: bool, start_step: int, total_steps: int) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.jsonl = out_dir / "metrics.jsonl"
        if not enabled:
            return
        if start_step > 0 and self.jsonl.is_file():  # drop lines after the checkpoint we resumed from
            kept = [line for line in self.jsonl.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        if cfg.monitor.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step or None)
        if cfg.monitor.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class KNNMonitor:
    """kNN accuracy (faiss, cosine, temperature-weighted votes) of the exported backbone on a labelled set."""

    def __init__(self, cfg: PretrainConfig) -> None:
        from roseprior.data import ImageDataset
        from roseprior.splits import split_samples

        mon = cfg.monitor
        samples = load_labelled(mon.knn_root, cfg.data.classes)
        if len(samples) > mon.knn_max_images:
            rng = np.random.default_rng(cfg.seed)
            samples = [samples[i] for i in sorted(rng.choice(len(samples), mon.knn_max_images, replace=False))]
        splits = split_samples(samples, "1:1:0", group_by=cfg.data.group_by, seed=cfg.seed)
        if not splits["train"] or not splits["val"]:
            raise DataError(f"monitor.knn_root={mon.knn_root}: too few labelled images to split into bank and queries")
        self.cfg = cfg
        self.num_classes = len(cfg.data.classes)
        self.sets = {name: ImageDataset(splits[name], image_size=mon.knn_image_size) for name in ("train", "val")}
        self.labels = {name: np.array([s.label for s in splits[name]]) for name in ("train", "val")}

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        from sklearn.metrics import balanced_accuracy_score

        from roseprior.knn import knn_predict

        mean = torch.tensor(self.cfg.views.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.views.std, device=device).view(1, 3, 1, 1)
        modes = {m: m.training for m in backbone.modules()}  # a teacher mixes modes (see methods._common)
        backbone.eval()
        feats = {}
        for name, dataset in self.sets.items():
            loader = DataLoader(dataset, batch_size=64, num_workers=self.cfg.data.num_workers)
            chunks = []
            for images, _, _ in loader:
                x = (images.to(device).float() / 255.0 - mean) / std
                chunks.append(backbone.forward_embedding(x).float().cpu())
            feats[name] = torch.cat(chunks).numpy()
        for m, mode in modes.items():
            m.train(mode)
        probs = knn_predict(feats["train"], self.labels["train"], feats["val"], self.num_classes,
                            k=self.cfg.monitor.knn_k, temperature=self.cfg.monitor.knn_temperature)
        pred = probs.argmax(1)
        return {"knn_accuracy": float((pred == self.labels["val"]).mean()),
                "knn_balanced_accuracy": float(balanced_accuracy_score(self.labels["val"], pred))}


# ====== the run ======


def _param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """No weight decay on biases and norm parameters (DINO's ``get_params_groups``)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def _make_accelerator(cfg: PretrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # Every trainable parameter gets a gradient each step (DINO's frozen last layer has its gradient
    # dropped after backward), so DDP need not search for unused ones.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def run(cfg: PretrainConfig) -> Path:
    """Pretrain as ``cfg`` says; returns ``out_dir`` holding backbone.safetensors/.json and the logs."""
    from accelerate.utils import set_seed

    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    out_dir = Path(cfg.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    set_seed(cfg.seed)  # identical initialisation on every process

    # ====== preparing data ======
    root = resolve_root(cfg.data)
    if cfg.data.split_dir:  # a split is given: pretrain on its training images only, val/test stay unseen
        found = load_labelled(root, cfg.data.classes, split="train", split_dir=cfg.data.split_dir)
    else:
        found = load_unlabeled(root)
    samples = sorted(found, key=lambda s: s.path)
    samples = filter_readable(samples, out_dir if main else None, cfg.data.max_unreadable_fraction)
    dataset = DecodedImages([s.path for s in samples], cfg.views.source_max_side)
    global_batch = cfg.train.batch_size * world
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{root}: {len(dataset)} images are fewer than one global batch of {global_batch} "
                          f"(train.batch_size={cfg.train.batch_size} x {world} processes); lower train.batch_size")
    views = MultiCropViews(cfg.views, seed=cfg.seed)
    views_on_device = cfg.views.device == "device" or (cfg.views.device == "auto" and accelerator.device.type != "cpu")

    # ====== preparing model and loss ======
    backbone = backbones.create(cfg.model.name, **cfg.model.kwargs)
    method = build_method(cfg.method, backbone)
    if world > 1 and accelerator.device.type == "cuda" and cfg.model.sync_batchnorm:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)

    # ====== preparing optimizer ======
    optimizer = torch.optim.AdamW(_param_groups(method), lr=0.0)
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)
    trainable = [p for p in method.parameters() if p.requires_grad]

    # ====== schedules (one value per global step) ======
    t = cfg.train
    total_steps = t.epochs * steps_per_epoch
    run_steps = min(total_steps, t.max_steps) if t.max_steps else total_steps
    lr = t.lr * (global_batch / t.lr_reference_batch if t.lr_reference_batch else 1.0)
    schedules = {
        "lr": cosine_schedule_array(lr, t.min_lr, total_steps, round(t.warmup_epochs * steps_per_epoch)),
        "weight_decay": cosine_schedule_array(t.weight_decay, t.weight_decay_end, total_steps),
        "momentum": cosine_schedule_array(cfg.method.momentum_start, cfg.method.momentum_end, total_steps),
    }

    # ====== optionally resume ======
    progress = RunProgress()
    accelerator.register_for_checkpointing(progress)
    resumed = resume_state(accelerator, cfg, out_dir, global_batch)
    if resumed is not None:
        accelerator.print(f"pretrain: resumed from {resumed} at step {progress.step}")
    knn = KNNMonitor(cfg) if cfg.monitor.knn_root and main else None
    monitor = Monitor(cfg, out_dir, main, progress.step, run_steps)
    if main:
        accelerator.print(f"pretrain: {cfg.method.name} on {cfg.model.name}, {len(dataset)} images from {root}, "
                          f"{world} process(es) x batch {t.batch_size}, {steps_per_epoch} steps/epoch, "
                          f"{run_steps} steps, device {accelerator.device}")

    # ====== training ======
    method.train()
    collapsed_steps = 0
    last_checkpoint = resumed
    step = progress.step
    tic, images_seen = time.perf_counter(), 0
    try:
        while step < run_steps:
            epoch, start = divmod(step, steps_per_epoch)
            order = data_order(len(dataset), global_batch, cfg.seed, epoch)
            loader = DataLoader(
                dataset, batch_sampler=GlobalBatchSlices(order, accelerator.process_index, t.batch_size, start),
                collate_fn=partial(_collate_views, views=None if views_on_device else views, epoch=epoch),
                num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda",
            )
            for batch in loader:
                if step >= run_steps:
                    break
                # 1. hyperparameters of this step
                for group in optimizer.param_groups:
                    group["lr"] = float(schedules["lr"][step])
                    if group.get("apply_wd"):
                        group["weight_decay"] = float(schedules["weight_decay"][step])
                # 2. views, then the method's forward
                if views_on_device:
                    images, sizes, indices = batch
                    batch_views = views(images.to(accelerator.device, non_blocking=True), sizes, indices, epoch)
                else:
                    batch_views = {k: [v.to(accelerator.device) for v in vs] for k, vs in batch[0].items()}
                loss, metrics = method(batch_views, epoch)
                # 3. stop on a non-finite loss (all processes agree)
                not_finite = accelerator.reduce((~torch.isfinite(loss.detach())).float().view(1), "max")
                if not_finite.item() > 0:
                    raise TrainingStopped(
                        f"loss is {loss.item()} at step {step} (epoch {epoch}); stopped. The last good checkpoint "
                        f"is {last_checkpoint or 'none (no checkpoint yet)'}. Lower train.lr, raise "
                        "train.warmup_epochs or train.clip_grad, or use train.precision=no"
                    )
                # 4. backward, method hooks, clip, step
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if hasattr(unwrapped, "after_backward"):
                    unwrapped.after_backward(epoch)
                grad_norm = None
                if t.clip_grad > 0:
                    grad_norm = accelerator.clip_grad_norm_(trainable, t.clip_grad)
                optimizer.step()
                # 5. EMA teacher
                if hasattr(unwrapped, "after_step"):
                    unwrapped.after_step(float(schedules["momentum"][step]))
                step += 1
                progress.step = step
                images_seen += global_batch
                monitor.advance()
                # 6. collapse guard (all processes agree)
                collapsed = metrics.get("collapsed", torch.zeros((), device=accelerator.device))
                flag = accelerator.reduce(collapsed.detach().float().view(1), "max").item()
                collapsed_steps = collapsed_steps + 1 if flag > 0 and step > cfg.monitor.collapse_after_steps else 0
                if cfg.monitor.collapse_patience and collapsed_steps >= cfg.monitor.collapse_patience:
                    raise TrainingStopped(
                        f"the representation collapsed ({_collapse_text(metrics)}) for {collapsed_steps} steps "
                        f"in a row, at step {step}; stopped. The last good checkpoint is "
                        f"{last_checkpoint or 'none'}. Try a lower train.lr, a higher method.momentum_start, "
                        "or more views.n_local"
                    )
                # 7. log
                if step % t.log_every == 0 or step == run_steps or step == 1:
                    mean_loss = accelerator.reduce(loss.detach().float().view(1), "mean").item()
                    elapsed = time.perf_counter() - tic
                    values: dict[str, Any] = {
                        "epoch": epoch, "loss": mean_loss, "lr": float(schedules["lr"][step - 1]),
                        "weight_decay": float(schedules["weight_decay"][step - 1]),
                        "images_per_second": images_seen / max(elapsed, 1e-9),
                    }
                    if unwrapped.has_teacher:
                        values["momentum"] = float(schedules["momentum"][step - 1])
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    values.update({k: float(v) for k, v in metrics.items() if k != "collapsed"})
                    monitor.log(step, values)
                # 8. wall-clock budget (all processes agree): stop here, then checkpoint and export
                if t.max_minutes is not None:
                    over = float((time.perf_counter() - tic) / 60.0 > t.max_minutes)
                    if accelerator.reduce(torch.tensor([over], device=accelerator.device), "max").item() > 0:
                        accelerator.print(f"pretrain: train.max_minutes={t.max_minutes} spent at step {step}")
                        run_steps = step
                # 9. checkpoint and per-epoch kNN
                if step % cfg.checkpoint.every_steps == 0 and step < run_steps:
                    last_checkpoint = save_checkpoint(accelerator, out_dir, step, cfg.checkpoint.keep, global_batch)
                if step % steps_per_epoch == 0 and cfg.monitor.knn_root:
                    done_epochs = step // steps_per_epoch
                    if knn is not None and done_epochs % cfg.monitor.knn_every_epochs == 0:
                        scores = knn(_export_module(unwrapped, cfg), accelerator.device)
                        monitor.log(step, {"epoch": done_epochs - 1, **scores})
                        accelerator.print(f"pretrain: epoch {done_epochs - 1} kNN balanced accuracy "
                                          f"{scores['knn_balanced_accuracy']:.3f}")
                    accelerator.wait_for_everyone()
    finally:
        monitor.close()

    # ====== final checkpoint and export ======
    if last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:08d}"):
        save_checkpoint(accelerator, out_dir, step, cfg.checkpoint.keep, global_batch)
    if main:
        export = _export_module(unwrapped, cfg)
        provenance = {
            "stage": "pretrain", "method": cfg.method.name, "exported": _export_which(unwrapped, cfg),
            "steps": step, "epochs": step / steps_per_epoch, "images": len(dataset), "data_root": str(root),
            "global_batch": global_batch, "processes": world, "seed": cfg.seed, "config": to_dict(cfg),
        }
        # Record the normalisation the views used, so finetune and the probes feed the same.
        export.default_cfg = {**(getattr(export, "default_cfg", None) or {}),
                              "mean": tuple(cfg.views.mean), "std": tuple(cfg.views.std)}
        backbones.save(export, out_dir, provenance)
        accelerator.print(f"pretrain: wrote {out_dir / 'backbone.safetensors'} ({provenance['exported']} backbone)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def _export_which(method: nn.Module, cfg: PretrainConfig) -> str:
    if cfg.model.export == "auto":
        return "teacher" if method.has_teacher else "student"
    if cfg.model.export == "teacher" and not method.has_teacher:
        raise ConfigError(f"model.export=teacher but method '{cfg.method.name}' has no teacher; use auto or student")
    return cfg.model.export


def _export_module(method: nn.Module, cfg: PretrainConfig) -> nn.Module:
    return method.export_backbone(_export_which(method, cfg))


def _collapse_text(metrics: dict[str, torch.Tensor]) -> str:
    parts = [f"{k}={float(v):.4f}" for k, v in metrics.items() if k != "collapsed"]
    return ", ".join(parts) or "collapse flag set"
