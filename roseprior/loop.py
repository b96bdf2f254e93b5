"""The one training loop of pretrain and finetune: DINO's reference loop on accelerate.

A stage builds plain PyTorch objects and hands the loop a *step function* (forward, finite check,
backward, optimizer step: pretrain's SSL step, finetune's SAM step) and *hooks* (EMA teacher,
collapse guard, per-epoch validation or kNN). The loop owns what both share:

- **schedules as per-step arrays** (DINO's ``cosine_scheduler``): each optimizer group's
  ``base_lr`` and ``base_weight_decay`` are multiplied by ``lr[step]`` and ``weight_decay[step]``,
  so there is no scheduler state to save;
- **data order**: one seeded order per epoch, cut into global batches over the whole run; the
  loader is prepared by accelerate with ``split_batches``, so each process takes its contiguous
  slice and N processes x batch B see exactly what 1 process x batch N·B sees;
- **checkpoints** that never unpickle (``roseprior.checkpoint.save_state``: model, optimizer,
  per-process RNG and the stage's own state as safetensors + JSON), written to a temporary folder
  and renamed into place, resumed exactly after a SIGKILL, and refused when they belong to another
  run (other data, model, method or global batch);
- **monitoring**: TensorBoard, ``metrics.jsonl``, progress with rate and ETA, a non-finite loss
  agreed across processes (every process stops together, none waits forever in an all-reduce),
  and a wall-clock budget.

Step order, as DINO's ``train_one_epoch``: hyperparameters for this step -> ``step_fn`` -> hooks
``after_step`` -> log -> budget -> ``end_of_epoch`` -> checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from roseprior.checkpoint import atomic_write_json, load_state, save_state
from roseprior.config import CheckpointConfig, TrainConfig, save_config
from roseprior.errors import CheckpointError, DataError, RosepriorError
from roseprior.progress import Progress

__all__ = [
    "Hooks", "NonFiniteLoss", "TrainLoop", "TrainingStopped", "check_finite", "check_same_run", "cosine_schedule",
    "domain_batches", "keep_freed_memory", "make_accelerator", "run_identity", "seeded_permutation",
]

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
RUN_FILE = "run.json"

StepFn = Callable[[Any, int, int], tuple[torch.Tensor, dict[str, Any]]]  # (batch, step, epoch) -> (loss, metrics)


class TrainingStopped(RosepriorError):
    """The run stopped itself (non-finite loss, collapse); its last good checkpoint is kept."""


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite on some process; every process raises it at the same point."""


def check_finite(accelerator: Any, loss: torch.Tensor) -> None:
    """Raise ``NonFiniteLoss`` on every process when any process's loss is not finite.

    An all-reduce, so call it at the same point on every process (each step function does, after
    each forward): a check on one process alone would leave the others waiting in the next
    gradient all-reduce forever.
    """
    value = loss.detach().float()
    flag = (~torch.isfinite(value)).float().reshape(1)
    if accelerator.reduce(flag, "max").item() > 0:
        raise NonFiniteLoss(f"loss is {value.item()}" if flag.item() else "loss is not finite on another process")


def make_accelerator(precision: str) -> Any:
    """The accelerator for ``train.precision`` (auto: bf16 on a GPU, fp32 on the CPU).

    Every trainable parameter gets a gradient each step (DINO's frozen last layer has its gradient
    dropped after backward), so DDP need not search for unused ones.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if gpu else "no"
    return Accelerator(mixed_precision=precision, cpu=not gpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def run_identity(stage: str, accelerator: Any, train: TrainConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """What a run folder or checkpoint records about its run: stage, global batch, and the stage's own
    (data fingerprint, model, method); a resume must match it."""
    return {"stage": stage, "global_batch": train.batch_size * accelerator.num_processes, **identity}


def check_same_run(meta_path: Path, identity: dict[str, Any]) -> None:
    """Refuse a run folder or checkpoint whose recorded identity (``run.json``/``meta.json``) differs
    from ``identity``, naming what differs and the ways out."""
    if not meta_path.is_file():
        return
    try:
        theirs = json.loads(meta_path.read_text()).get("identity", {})
    except (OSError, json.JSONDecodeError):
        return  # unreadable: a checkpoint is then skipped as corrupt
    differ = [k for k in sorted(set(theirs) | set(identity)) if theirs.get(k) != identity.get(k)]
    if differ:
        details = "; ".join(f"{k}: {theirs.get(k)!r} there, {identity.get(k)!r} now" for k in differ[:3])
        raise CheckpointError(
            f"{meta_path.parent} holds another run ({details}); use a new out_dir, or set checkpoint.resume=never "
            "to start over in this one (its checkpoints and outputs are replaced)")


# ====== schedules ======


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per step: linear warm-up from ``warmup_start``, then cosine from ``base`` to ``final``.

    DINO's ``utils.cosine_scheduler``; the cosine part is lightly's ``cosine_schedule`` formula.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    steps = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps) - 1, 1)))
    return np.concatenate([warmup, cosine])


def lr_factors(train: TrainConfig, total_steps: int, steps_per_epoch: int) -> np.ndarray:
    """Per-step multiplier of every group's ``base_lr``: warm-up from 0, then cosine to ``min_lr_ratio`` (or flat)."""
    warmup = round(train.warmup_epochs * steps_per_epoch)
    final = train.min_lr_ratio if train.schedule == "cosine" else 1.0
    return cosine_schedule(1.0, final, total_steps, warmup)


# ====== data order ======


def seeded_permutation(seed: int) -> Callable[[int, int], np.ndarray]:
    """``order(n, epoch)``: a permutation of ``range(n)`` that depends on (seed, epoch) only."""

    def order(n: int, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(hash((int(seed), int(epoch), -1)) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(n, generator=generator).numpy()

    return order


def domain_batches(seed: int, domains: Sequence[str | None], batch_size: int) -> Callable[[int, int], np.ndarray]:
    """``order(n, epoch)`` whose global batches each hold one domain's images (``Sample.domain``): the negatives
    of a contrastive loss then share the anchor's site, so telling images apart by site earns nothing. Each
    domain's shuffled images are cut into batches, the batches shuffled; a domain's remainder (fewer than a
    batch) goes to the end, where mixed batches are left over. Depends on (seed, epoch) only."""
    by_domain: dict[str | None, list[int]] = {}
    for index, domain in enumerate(domains):
        by_domain.setdefault(domain, []).append(index)

    def order(n: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(hash((int(seed), int(epoch), -3)) & 0x7FFF_FFFF_FFFF_FFFF)
        batches, rest = [], []
        for indices in by_domain.values():
            shuffled = rng.permutation(indices)
            full = len(shuffled) // batch_size * batch_size
            batches += list(shuffled[:full].reshape(-1, batch_size))
            rest += shuffled[full:].tolist()
        return np.concatenate([*(batches[i] for i in rng.permutation(len(batches))),
                               rng.permutation(np.asarray(rest, dtype=np.int64))]).astype(np.int64)

    return order


class RunBatches(Sampler[list[int]]):
    """Global batches for steps ``start .. total`` of a run; item ``epoch * n + i`` is sample i in that epoch.

    ``order(n, epoch)`` gives an epoch's sample order (at least ``steps_per_epoch * batch_size``
    indices); the incomplete last global batch of an epoch is dropped.
    """

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, total: int, start: int,
                 order: Callable[[int, int], np.ndarray]) -> None:
        self.n, self.batch_size, self.steps_per_epoch = n, batch_size, steps_per_epoch
        self.total, self.start, self.order = total, start, order

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, None
        for step in range(self.start, self.total):
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.order(self.n, e)
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield [int(epoch * self.n + j) for j in rows]


def keep_freed_memory(*_: Any) -> None:
    """Keep freed blocks of up to 128 MiB in this process's heap instead of handing them back to the OS.

    glibc maps each block above 128 KiB-32 MiB afresh and unmaps it when freed, and trims the heap top,
    so every step's new view, batch and activation tensors are page-faulted in again, one fault per 4 KiB:
    10-20% of CPU view-making (``benchmarks/views.py``) and 5-10% of a CPU recipe step, on any
    processor. PyTorch's CPU performance guide gets the same by preloading jemalloc or tcmalloc; this needs
    no preload. Blocks above 128 MiB (a decoded 8000 x 6000 field) still go back at once, so a huge image
    costs its memory only while it is used (``benchmarks/memory.py``: peak 0.99x with one such field).
    A no-op where libc is not glibc. Takes and ignores a worker id: it is a loader's ``worker_init_fn`` too.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 128 << 20)
    mallopt(m_trim_threshold, 256 << 20)


class _RunItems:
    """``dataset[epoch * n + i]`` -> ``(epoch, dataset[i])``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> tuple[int, Any]:
        epoch, index = divmod(key, self.n)
        return epoch, self.dataset[index]


class _RunCollate:
    """``collate(items, epoch)`` on the items of one batch (one epoch per batch)."""

    def __init__(self, collate: Callable[[list[Any], int], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[tuple[int, Any]]) -> Any:
        return self.collate([item for _, item in batch], batch[0][0])


# ====== monitoring ======


class Monitor:
    """TensorBoard scalars, ``metrics.jsonl`` and the progress display (main process only)."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, total_steps: int, name: str,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled, self.writer, self.progress = enabled, None, None
        self.jsonl = out_dir / "metrics.jsonl"
        if not enabled:
            return
        if self.jsonl.is_file():  # lines past the step we start from belong to an abandoned attempt
            kept = [line for line in self.jsonl.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step or None)
        self.progress = Progress(total_steps, name, unit="step", initial=start_step, enabled=progress)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "epoch" and np.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        if self.progress is not None and "train/loss" in values:
            self.progress.set_postfix(loss=f"{values['train/loss']:.4f}")

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()


# ====== the loop ======


@dataclass
class Hooks:
    """What a stage adds to each step and epoch; each may raise ``TrainingStopped``.

    ``after_step(index, metrics)``: after the optimizer step (EMA teacher, collapse guard);
    ``index`` is the 0-based index of the step just taken (its schedule entry). ``end_of_epoch(epoch, partial)``: after the last
    step of an epoch, or after the run's last step when it ends mid-epoch (``partial``); returns
    values to log (validation metrics, kNN accuracy) or None.
    """

    after_step: Callable[[int, dict[str, Any]], None] | None = None
    end_of_epoch: Callable[[int, bool], dict[str, Any] | None] | None = None


class TrainLoop:
    """One training run in ``out_dir``: resume, train, checkpoint. See the module docstring."""

    def __init__(self, accelerator: Any, train: TrainConfig, checkpoint: CheckpointConfig, out_dir: str | Path,
                 *, identity: dict[str, Any], seed: int, name: str, tensorboard: bool = True,
                 progress: bool = True) -> None:
        """Refuses at once (before anything is written) an ``out_dir`` that holds another run."""
        self.accelerator, self.train, self.checkpoint_cfg = accelerator, train, checkpoint
        self.out_dir, self.name, self.seed = Path(out_dir), name, seed
        self.main = accelerator.is_main_process
        self.global_batch = train.batch_size * accelerator.num_processes
        self.identity = run_identity(name, accelerator, train, identity)
        self.state: dict[str, Any] = {}  # the stage's own JSON-able progress (best epoch, ...), checkpointed
        self.objects: dict[str, Any] = {}
        self.per_process: dict[str, Any] = {}
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.flags = {"tensorboard": tensorboard, "progress": progress}
        if checkpoint.resume != "never":
            check_same_run(self.out_dir / RUN_FILE, self.identity)

    def plan(self, num_samples: int) -> None:
        """Steps per epoch, steps in all and the lr schedule, for ``num_samples`` training images."""
        self.num_samples = num_samples
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{num_samples} training images are fewer than one global batch of {self.global_batch} "
                f"(train.batch_size={self.train.batch_size} x {self.accelerator.num_processes} processes); "
                "lower train.batch_size")
        self.total_steps = self.train.epochs * self.steps_per_epoch
        self.run_steps = min(self.total_steps, self.train.max_steps) if self.train.max_steps else self.total_steps
        self.schedules: dict[str, np.ndarray] = {"lr": lr_factors(self.train, self.total_steps, self.steps_per_epoch)}

    # ------------------------------------------------------------------ start and resume

    def start(self, config: Any, model: torch.nn.Module, optimizer: Any, **per_process: Any) -> int:
        """Resume from the newest usable checkpoint (or start at 0), then write ``config.yaml``.

        ``model`` and ``optimizer`` are saved once; ``per_process`` objects (anything with
        ``state_dict``/``load_state_dict``, e.g. an augmentation generator) once per process, with
        each process's torch RNG. Refuses an ``out_dir`` that holds another run.
        """
        self.objects = {"model": model, "optimizer": optimizer}
        self.per_process = per_process
        mode = self.checkpoint_cfg.resume
        candidates = self._checkpoints() if mode == "auto" else [] if mode == "never" else [Path(mode)]
        if mode not in ("auto", "never") and not (Path(mode) / META_FILE).is_file():
            raise CheckpointError(f"checkpoint.resume={mode}: no {META_FILE} there; point it at a "
                                  f"{CHECKPOINT_DIR}/step_* folder, or use auto / never")
        for path in candidates:
            check_same_run(path / META_FILE, self.identity)
            try:
                self._load(path)
            except (CheckpointError, RuntimeError, ValueError, KeyError) as err:
                msg = f"checkpoint {path} cannot be loaded ({str(err)[:200]}); trying the previous one"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                self.accelerator.print(f"warning: {msg}")
                continue
            self.last_checkpoint = path
            self.accelerator.print(f"{self.name}: resumed from {path} at step {self.step}")
            break
        else:
            if candidates:
                raise CheckpointError(f"no checkpoint under {self.out_dir / CHECKPOINT_DIR} could be loaded; "
                                      "set checkpoint.resume=never (or a new out_dir) to start over")
        if self.main:
            if mode == "never":
                shutil.rmtree(self.out_dir / CHECKPOINT_DIR, ignore_errors=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.out_dir)
            atomic_write_json(self.out_dir / RUN_FILE, {"identity": self.identity})
        self.accelerator.wait_for_everyone()
        return self.step

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints (``meta.json`` is written last), newest first."""
        folder = self.out_dir / CHECKPOINT_DIR
        found = [p for p in folder.glob("step_*") if p.is_dir() and (p / META_FILE).is_file()] if folder.is_dir() else []
        return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)

    def _load(self, path: Path) -> None:
        meta = json.loads((path / META_FILE).read_text())
        device = str(self.accelerator.device)
        self.objects["model"].load_state_dict(load_state(path, "model", device))
        self.objects["optimizer"].load_state_dict(load_state(path, "optimizer"))
        rank = self.accelerator.process_index
        own = load_state(path, f"process{rank}") if (path / f"process{rank}.json").is_file() else None
        if own is not None:
            torch.set_rng_state(own["torch_rng"])
            if torch.cuda.is_available() and own.get("cuda_rng"):
                torch.cuda.set_rng_state_all(own["cuda_rng"])
            for key, obj in self.per_process.items():
                obj.load_state_dict(own[key])
        self.step, self.state = int(meta["step"]), dict(meta.get("state", {}))

    def save_checkpoint(self) -> Path:
        """Model, optimizer, per-process RNG and state into ``checkpoints/step_N``, renamed into place
        once complete; the oldest beyond ``checkpoint.keep`` are deleted."""
        acc, folder = self.accelerator, self.out_dir / CHECKPOINT_DIR
        final, tmp = folder / f"step_{self.step:08d}", folder / f".tmp_step_{self.step:08d}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_state(self.objects["model"].state_dict(), tmp, "model")
            save_state(self.objects["optimizer"].state_dict(), tmp, "optimizer")
        acc.wait_for_everyone()
        own = {"torch_rng": torch.get_rng_state(), **{k: o.state_dict() for k, o in self.per_process.items()}}
        if torch.cuda.is_available():
            own["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_state(own, tmp, f"process{acc.process_index}")
        acc.wait_for_everyone()
        if self.main:
            atomic_write_json(tmp / META_FILE, {"step": self.step, "identity": self.identity, "state": self.state,
                                                "time": time.time()})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._checkpoints()[self.checkpoint_cfg.keep :]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    # ------------------------------------------------------------------ data

    def loader(self, dataset: Any, collate: Callable[[list[Any], int], Any],
               order: Callable[[int, int], np.ndarray] | None = None, num_workers: int = 0) -> Any:
        """The training loader from the current step on, prepared by accelerate (``split_batches``)."""
        from accelerate.data_loader import prepare_data_loader

        batches = RunBatches(len(dataset), self.global_batch, self.steps_per_epoch, self.run_steps, self.step,
                             order or seeded_permutation(self.seed))
        keep_freed_memory()  # batches are collated (views cut) in this process or in the workers
        loader = DataLoader(_RunItems(dataset), batch_sampler=batches, collate_fn=_RunCollate(collate),
                            num_workers=num_workers, pin_memory=self.accelerator.device.type == "cuda",
                            persistent_workers=num_workers > 0, worker_init_fn=keep_freed_memory)
        acc = self.accelerator
        return prepare_data_loader(loader, acc.device, num_processes=acc.num_processes,
                                   process_index=acc.process_index, split_batches=True, put_on_device=True,
                                   rng_types=None)

    # ------------------------------------------------------------------ the loop

    def _set_hyperparameters(self, optimizer: Any) -> None:
        lr, wd = self.schedules["lr"][self.step], self.schedules.get("weight_decay")
        for group in optimizer.param_groups:
            group["lr"] = group.get("base_lr", group["lr"]) * float(lr)
            if wd is not None and "base_weight_decay" in group:
                group["weight_decay"] = group["base_weight_decay"] * float(wd[self.step])

    def _log_values(self, optimizer: Any, loss: torch.Tensor, metrics: dict[str, Any], rate: float,
                    epoch: int) -> dict[str, Any]:
        acc = self.accelerator
        values: dict[str, Any] = {"epoch": epoch, "train/loss": acc.reduce(loss.detach().float().reshape(1), "mean").item(),
                                  "train/images_per_second": rate}
        for group in optimizer.param_groups:
            values[f"lr/{group.get('part', 'all')}"] = group["lr"]
        values["train/weight_decay"] = max(g.get("weight_decay", 0.0) for g in optimizer.param_groups)
        for key, array in self.schedules.items():
            if key not in ("lr", "weight_decay"):
                values[f"train/{key}"] = float(array[self.step - 1])
        for key, value in metrics.items():
            if key != "collapsed":
                values[f"train/{key}"] = float(value)
        return values

    def run(self, loader: Any, step_fn: StepFn, hooks: Hooks | None = None) -> int:
        """Train from ``self.step`` to the run's last step; returns the step reached."""
        hooks, acc, optimizer = hooks or Hooks(), self.accelerator, self.objects["optimizer"]
        monitor = Monitor(self.out_dir, self.main, self.step, self.run_steps, self.name, **self.flags)
        tic, seen = time.perf_counter(), 0
        try:
            for batch in loader:
                epoch = self.step // self.steps_per_epoch
                # 1. hyperparameters of this step; 2. the stage's step (forward, finite check, backward, update)
                self._set_hyperparameters(optimizer)
                loss, metrics = step_fn(batch, self.step, epoch)
                # 3. the step is taken; hooks (EMA teacher, collapse guard)
                self.step += 1
                seen += self.global_batch
                monitor.advance()
                if hooks.after_step is not None:
                    hooks.after_step(self.step - 1, metrics)
                # 4. log
                if self.step % self.train.log_every == 0 or self.step in (1, self.run_steps):
                    rate = seen / max(time.perf_counter() - tic, 1e-9)
                    monitor.log(self.step, self._log_values(optimizer, loss, metrics, rate, epoch))
                # 5. wall-clock budget (all processes agree): this is the last step
                if self.train.max_minutes is not None:
                    over = torch.tensor([float((time.perf_counter() - tic) / 60 > self.train.max_minutes)],
                                        device=acc.device)
                    if acc.reduce(over, "max").item() > 0:
                        acc.print(f"{self.name}: train.max_minutes={self.train.max_minutes} spent at step {self.step}")
                        self.run_steps = self.step
                # 6. end of an epoch (or of the run, mid-epoch), then checkpoint
                at_epoch_end = self.step % self.steps_per_epoch == 0
                if hooks.end_of_epoch is not None and (at_epoch_end or self.step == self.run_steps):
                    values = hooks.end_of_epoch(epoch, not at_epoch_end)
                    if values:
                        monitor.log(self.step, {"epoch": epoch, **values})
                if self.step % self.checkpoint_cfg.every_steps == 0 or self.step == self.run_steps:
                    self.save_checkpoint()
                if self.step >= self.run_steps:
                    break
        except TrainingStopped as err:
            hint = (" Lower train.lr, raise train.warmup_epochs, set train.clip_grad, or use train.precision=no."
                    if isinstance(err, NonFiniteLoss) else "")
            raise TrainingStopped(
                f"{err} at step {self.step} (epoch {self.step // self.steps_per_epoch}); stopped. The last good "
                f"checkpoint is {self.last_checkpoint or 'none (no checkpoint yet)'}.{hint}") from None
        finally:
            monitor.close()
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step_{self.step:08d}":
            self.save_checkpoint()  # a resumed, already finished run: nothing new, but state is on disk
        return self.step

