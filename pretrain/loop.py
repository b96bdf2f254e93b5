"""Pretraining: an SSL method's step on the shared training loop (``roseprior.loop``).

Read top to bottom, as DINO's ``train_dino``: data, model, optimizer, schedules, step, hooks,
export. The loop (schedules as arrays, data order, checkpoints, logging, resume) is the one
finetune runs on too; what is pretrain's own is here: multi-crop views, the method's step, the
EMA teacher, the collapse guard, the kNN monitor and the backbone export.

Distributed runs equal one process with the global batch: the data order is one seeded order per
epoch cut into global batches, each process takes a contiguous slice of each, and augmentation is
keyed per sample (``pretrain.views``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import backbones
from roseprior.checkpoint import atomic_write_csv
from roseprior.config import to_dict
from roseprior.data import (
    Sample,
    filter_readable,
    load_unlabeled,
    resolve_root,
    with_pseudo_domains,
    with_scales,
)
from roseprior.errors import ConfigError, DataError
from roseprior.loop import (
    Hooks,
    TrainingStopped,
    TrainLoop,
    check_finite,
    cosine_schedule,
    domain_batches,
    make_accelerator,
)
from roseprior.splits import SplitSet, is_labelled, resolve_splits, split_fingerprint, write_image_list

from .config import PretrainConfig
from .methods import build_method
from .views import DecodedImages, MultiCropViews, StainBank, collate_decoded

__all__ = ["make_step", "pretrain_images", "run"]

log = logging.getLogger("pretrain")


def check_view_sizes(views: Any, backbone: nn.Module, name: str) -> None:
    """Refuse, before the first step, view sizes the backbone cannot take (MSHT: multiples of its 32-px token
    grid), naming the key: the model would otherwise fail on the first batch."""
    multiple = getattr(backbone, "input_multiple", 1)
    sizes = {"views.global_size": views.global_size, **({"views.local_size": views.local_size} if views.n_local else {})}
    for key, size in sizes.items():
        if size % multiple:
            options = ", ".join(str(multiple * k) for k in (1, 2, 3) if multiple * k != size)
            raise ConfigError(f"{key}={size}: {name} takes image sides that are multiples of {multiple} (e.g. {options})")


def pretrain_images(cfg: PretrainConfig) -> tuple[Path, list[Sample], SplitSet | None]:
    """The images SSL sees: a labelled set's training split (the split every stage resolves, so the
    images later used for validation and testing stay unseen), else every image under ``data.root``."""
    root = resolve_root(cfg.data)
    if cfg.data.split_dir or is_labelled(root, cfg.data.classes):
        split = resolve_splits(cfg.data, root=root)
        return root, sorted(split.splits["train"], key=lambda s: s.path), split
    return root, sorted(with_scales(load_unlabeled(root), cfg.data), key=lambda s: s.path), None


class ViewCollate:
    """A batch of decoded images (padded to one size), cut into views here when ``views`` is given
    (in the loader's workers), else left for the step to cut on the device."""

    def __init__(self, views: MultiCropViews | None) -> None:
        self.views = views

    def __call__(self, items: list[Any], epoch: int) -> tuple[Any, ...]:
        images, sizes, indices = collate_decoded(items)
        return (images, sizes, indices) if self.views is None else (self.views(images, sizes, indices, epoch), indices)


def make_step(accelerator: Any, method: nn.Module, optimizer: Any, cfg: PretrainConfig,
              views: MultiCropViews | None) -> Any:
    """The step: (views) -> method forward -> stop if not finite -> backward -> method hook -> clip -> update.

    ``views`` given: the batch holds decoded images and views are cut here, on the device;
    otherwise the loader's workers made them.
    """
    unwrapped = accelerator.unwrap_model(method)
    trainable = [p for p in method.parameters() if p.requires_grad]

    def step(batch: Any, index: int, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        batch_views = views(*batch, epoch) if views is not None else batch[0]
        loss, metrics = method(batch_views, epoch)
        check_finite(accelerator, loss)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if hasattr(unwrapped, "after_backward"):
            unwrapped.after_backward(epoch)
        if cfg.train.clip_grad:
            metrics["grad_norm"] = accelerator.clip_grad_norm_(trainable, cfg.train.clip_grad)
        optimizer.step()
        return loss, metrics

    return step


def run(cfg: PretrainConfig) -> Path:
    """Pretrain as ``cfg`` says; returns ``out_dir`` holding backbone.safetensors/.json and the logs."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train.precision)
    main, world = accelerator.is_main_process, accelerator.num_processes
    out_dir = Path(cfg.out_dir)

    # ====== preparing data ======
    root, samples, split = pretrain_images(cfg)
    identity = {"data": split.fingerprint if split else split_fingerprint({"train": samples}),
                "model": cfg.model.name, "model_kwargs": cfg.model.kwargs, "init": cfg.model.init, "method": cfg.method.name}
    loop = TrainLoop(accelerator, cfg.train, cfg.checkpoint, out_dir, identity=identity, seed=cfg.seed,
                     name="pretrain", tensorboard=cfg.monitor.tensorboard, progress=cfg.monitor.progress)
    samples = filter_readable(samples, out_dir if main else None, cfg.data.max_unreadable_fraction)
    if not samples:
        raise DataError(f"no readable images under {root}")
    pseudo = bool(cfg.train.pseudo_domains) and not any(s.domain for s in samples)
    if pseudo:  # the data names no site: clusters of colour stand in for sites
        samples = with_pseudo_domains(samples, cfg.train.pseudo_domains, cfg.seed, cfg.monitor.progress and main)
    dataset = DecodedImages(samples, cfg.views.source_max_side)
    loop.plan(len(dataset))
    views = MultiCropViews(cfg.views, seed=cfg.seed, stain_bank=StainBank.build(dataset) if cfg.views.stain_swap else None)
    views_on_device = cfg.views.device == "device" or (cfg.views.device == "auto" and accelerator.device.type != "cpu")

    # ====== preparing model and loss ======
    set_seed(cfg.seed)  # identical initialisation on every process
    backbone = backbones.set_input_stats(backbones.load_init(cfg.model.init, cfg.model.name, **cfg.model.kwargs),
                                         cfg.views.mean, cfg.views.std)
    check_view_sizes(cfg.views, backbone, cfg.model.name)
    method = build_method(cfg.method, backbone)
    if world > 1 and accelerator.device.type == "cuda" and cfg.model.sync_batchnorm:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)

    # ====== preparing optimizer and schedules (one value per global step) ======
    t = cfg.train
    lr = t.lr * (loop.global_batch / t.lr_reference_batch if t.lr_reference_batch else 1.0)
    optimizer = torch.optim.AdamW(backbones.param_groups(method, lr, t.weight_decay), lr=lr)
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)
    loop.schedules["weight_decay"] = cosine_schedule(1.0, t.weight_decay_end / t.weight_decay if t.weight_decay else 1.0,
                                                     loop.total_steps)
    if unwrapped.has_teacher:
        loop.schedules["momentum"] = cosine_schedule(cfg.method.momentum_start, cfg.method.momentum_end,
                                                     loop.total_steps)

    # ====== optionally resume, then the loader from where we are ======
    loop.start(cfg, unwrapped, optimizer)
    if pseudo and main:  # which cluster each image fell in, to look at
        atomic_write_csv(out_dir / "pseudo_domains.csv", ["path", "domain"], ((s.path, s.domain) for s in samples))
    order = domain_batches(cfg.seed, [s.domain for s in samples], loop.global_batch) if t.batch_by_domain else None
    loader = loop.loader(dataset, ViewCollate(None if views_on_device else views), order, cfg.data.num_workers)
    accelerator.print(f"pretrain: {cfg.method.name} on {cfg.model.name}, {len(dataset)} images from {root}"
                      + (f" (training split: {split.source})" if split else "")
                      + f", {world} process(es) x batch {t.batch_size}, {loop.steps_per_epoch} steps/epoch, "
                      f"{loop.run_steps} steps, device {accelerator.device}")

    # ====== training ======
    knn = KnnMonitor(cfg) if cfg.monitor.knn_root and main else None
    collapsed_run = [0]

    def after_step(index: int, metrics: dict[str, Any]) -> None:
        if unwrapped.has_teacher:
            unwrapped.after_step(float(loop.schedules["momentum"][index]))
        flag = metrics.get("collapsed", torch.zeros((), device=accelerator.device))
        collapsed = accelerator.reduce(flag.detach().float().reshape(1), "max").item() > 0
        collapsed_run[0] = collapsed_run[0] + 1 if collapsed and index >= cfg.monitor.collapse_after_steps else 0
        if cfg.monitor.collapse_patience and collapsed_run[0] >= cfg.monitor.collapse_patience:
            raise TrainingStopped(
                f"the representation collapsed ({_collapse_text(metrics)}) for {collapsed_run[0]} steps in a row; "
                "try a lower train.lr, a higher method.momentum_start, or more views.n_local")

    def end_of_epoch(epoch: int, partial: bool) -> dict[str, Any] | None:
        if not cfg.monitor.knn_root or partial or (epoch + 1) % cfg.monitor.knn_every_epochs:
            return None
        scores = knn(export_backbone(unwrapped, cfg), accelerator.device) if knn is not None else None
        accelerator.wait_for_everyone()
        if scores:
            accelerator.print(f"pretrain: epoch {epoch} kNN balanced accuracy {scores['knn/balanced_accuracy']:.3f}")
        return scores

    method.train()
    step = loop.run(loader, make_step(accelerator, method, optimizer, cfg, views if views_on_device else None),
                    Hooks(after_step, end_of_epoch))

    # ====== export ======
    if main:
        export = export_backbone(unwrapped, cfg)
        provenance = {
            "stage": "pretrain", "method": cfg.method.name, "exported": _export_which(unwrapped, cfg),
            "steps": step, "epochs": step / loop.steps_per_epoch, "images": len(dataset), "data_root": str(root),
            "split": split.describe() if split else None, "global_batch": loop.global_batch, "processes": world,
            "seed": cfg.seed, "config": to_dict(cfg),
        }
        backbones.save(export, out_dir, provenance)
        write_image_list(out_dir, {"train": samples})
        accelerator.print(f"pretrain: wrote {out_dir / 'backbone.safetensors'} ({provenance['exported']} backbone)")
    accelerator.wait_for_everyone()
    return out_dir


def _export_which(method: nn.Module, cfg: PretrainConfig) -> str:
    if cfg.model.export == "auto":
        return "teacher" if method.has_teacher else "student"
    return cfg.model.export


def export_backbone(method: nn.Module, cfg: PretrainConfig) -> nn.Module:
    """The backbone that is saved (teacher or student), carrying the input statistics of the views."""
    return backbones.set_input_stats(method.export_backbone(_export_which(method, cfg)), cfg.views.mean, cfg.views.std)


def _collapse_text(metrics: dict[str, Any]) -> str:
    parts = [f"{k}={float(v):.4f}" for k, v in metrics.items() if k != "collapsed"]
    return ", ".join(parts) or "collapse flag set"


class KnnMonitor:
    """kNN balanced accuracy of the exported backbone on a labelled set, by the probes' protocol:
    bank = its train split, k chosen on its val split, scored on its test split."""

    def __init__(self, cfg: PretrainConfig) -> None:
        mon = cfg.monitor
        same = mon.knn_root == cfg.data.root
        data = replace(cfg.data, root=mon.knn_root, split_dir=cfg.data.split_dir if same else None)
        splits = resolve_splits(data).readable(None, cfg.data.max_unreadable_fraction).splits
        rng = np.random.default_rng(cfg.seed)
        self.splits = {name: [part[i] for i in sorted(rng.choice(len(part), mon.knn_max_images, replace=False))]
                       if len(part) > mon.knn_max_images else part for name, part in splits.items()}
        if not self.splits["test"]:
            raise DataError(f"monitor.knn_root={mon.knn_root}: its test split is empty; add images or change "
                            "data.split_ratios")
        self.cfg = cfg

    def __call__(self, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        from sklearn.metrics import balanced_accuracy_score

        from roseprior.features import extract_features
        from roseprior.probes import ProbeProtocol, fit_knn

        size, protocol = self.cfg.monitor.knn_image_size, ProbeProtocol()
        feats = {k: extract_features(backbone, v, size, batch_size=64, device=device) for k, v in self.splits.items()}
        y = {k: np.array([s.label for s in v]) for k, v in self.splits.items()}
        probe = fit_knn(feats["train"], y["train"], feats["val"], y["val"], len(self.cfg.data.classes),
                        protocol.knn_k, protocol.knn_temperature, protocol.knn_approximate_above)
        pred = probe.predict_proba(feats["test"]).argmax(1)
        return {"knn/balanced_accuracy": float(balanced_accuracy_score(y["test"], pred)), "knn/k": probe.k}
