"""Pretraining throughput: end-to-end images/s against the same step on views already in memory.

Two numbers from one run, same config, same process:

- end to end: ``python -m pretrain``'s own loop (images read from disk, decoded, cut into views,
  teacher, student, backward, clip, optimizer, EMA), its images/s over the steps after warm-up;
- ceiling: the same method, optimizer and step sequence on one batch of views made once and kept
  on the device, so no data work at all.

Their ratio is how much of the model's speed the data pipeline lets through (aim: >= 0.9). The
time to make one batch of views alone is printed too, so a low ratio shows where time goes.

    python benchmarks/pretrain_throughput.py [--config configs/pretrain/dino_msht_tiny_cpu.yaml] [--steps 6]
    python benchmarks/pretrain_throughput.py --config configs/pretrain/dino_msht.yaml --steps 50 data.root=DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_batch(cfg: Any) -> list[Any]:
    """The decoded images of one training batch (the first images the loop would read)."""
    from pretrain.loop import pretrain_images
    from pretrain.views import DecodedImages

    _, samples, _ = pretrain_images(cfg)
    dataset = DecodedImages([s.path for s in samples], cfg.views.source_max_side)
    return [dataset[i % len(dataset)] for i in range(cfg.train.batch_size)]


def time_views(cfg: Any, batches: int) -> float:
    """Seconds per batch to decode and cut the views alone (no model), where the loop cuts them."""
    from pretrain.loop import pretrain_images
    from pretrain.views import DecodedImages, MultiCropViews, collate_decoded

    _, samples, _ = pretrain_images(cfg)
    dataset = DecodedImages([s.path for s in samples], cfg.views.source_max_side)
    views = MultiCropViews(cfg.views, seed=cfg.seed)
    cuda = torch.cuda.is_available() and cfg.views.device != "loader"
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    for b in range(batches):
        idx = [(b * cfg.train.batch_size + i) % len(dataset) for i in range(cfg.train.batch_size)]
        images, sizes, indices = collate_decoded([dataset[i] for i in idx])
        views([img.to(device) for img in images], sizes, indices, epoch=0)
    _sync(device)
    return (time.perf_counter() - start) / batches


def ceiling_rate(cfg: Any, steps: int, warmup: int) -> float:
    """Images/s of the loop's own step (``pretrain.loop.make_step``) plus its after-step hook work
    (EMA teacher, collapse flag), on one batch of views kept on the device: no data work."""
    import backbones
    from pretrain.loop import ViewCollate, make_step
    from pretrain.methods import build_method
    from pretrain.views import MultiCropViews
    from roseprior.loop import make_accelerator

    accelerator = make_accelerator(cfg.train.precision)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, backbones.create(cfg.model.name, **cfg.model.kwargs))
    optimizer = torch.optim.AdamW(backbones.param_groups(method, cfg.train.lr, cfg.train.weight_decay))
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)
    with torch.no_grad():
        views, _ = ViewCollate(MultiCropViews(cfg.views, seed=cfg.seed))(_first_batch(cfg), 0)
    batch = ({k: [v.to(device) for v in vs] for k, vs in views.items()},)
    step = make_step(accelerator, method, optimizer, cfg, None)
    method.train()

    def one_step() -> None:
        _, metrics = step(batch, 0, 0)
        if unwrapped.has_teacher:
            unwrapped.after_step(cfg.method.momentum_start)
        collapsed = metrics.get("collapsed", torch.zeros((), device=device))
        accelerator.reduce(collapsed.detach().float().view(1), "max").item()

    for _ in range(warmup):
        one_step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        one_step()
        _sync(device)
        times.append(time.perf_counter() - start)
    rate = cfg.train.batch_size / statistics.median(times)
    accelerator.free_memory()
    return rate


def end_to_end_rate(cfg: Any, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s after warm-up, wall seconds) of ``pretrain.loop.run`` itself on the config's data.

    The loop logs cumulative images/s since its first step; with a record every step, the time at
    step k is k * batch / rate_k, so each step's duration needs no change to the loop. Both rates
    use the median step after warm-up: on a shared machine a neighbour's burst then moves neither.
    """
    from pretrain.loop import run

    start = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    at = {r["step"]: r["step"] * cfg.train.batch_size / r["train/images_per_second"]
          for r in records if "train/images_per_second" in r}
    durations = [at[k] - at[k - 1] for k in sorted(at) if k > max(warmup, 1) and k - 1 in at]
    if not durations:
        raise RuntimeError(f"pretrain logged no step after the {warmup} warm-up steps; raise --steps")
    return cfg.train.batch_size / statistics.median(durations), wall


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    """Both rates and their ratio for the command line ``argv`` (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/dino_msht_tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps, after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, cudnn, workers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pretrain.config import PretrainConfig
    from roseprior.config import load_config
    from roseprior.loop import keep_freed_memory

    keep_freed_memory()  # the loop's allocator setting, for the ceiling too (it speeds the step itself on a CPU)

    with tempfile.TemporaryDirectory(prefix="pretrain_throughput_") as tmp:
        overrides = [*args.overrides, f"out_dir={tmp}", f"train.max_steps={args.warmup + args.steps}",
                     "monitor.progress=false", "monitor.tensorboard=false", "train.log_every=1",
                     "checkpoint.every_steps=1000000", "checkpoint.resume=never"]
        cfg = load_config(PretrainConfig, args.config, overrides)
        ceiling = ceiling_rate(cfg, args.steps, args.warmup)
        end_to_end, wall = end_to_end_rate(cfg, args.steps, args.warmup)
    views_s = time_views(cfg, batches=min(args.steps, 4))
    cuda = torch.cuda.is_available()
    return {
        "method": cfg.method.name, "model": cfg.model.name, "batch": cfg.train.batch_size,
        "views": f"{cfg.views.n_global} x {cfg.views.global_size} px + {cfg.views.n_local} x {cfg.views.local_size} px",
        "steps": args.steps, "warmup": args.warmup, "num_workers": cfg.data.num_workers,
        "end_to_end_images_per_s": end_to_end, "ceiling_images_per_s": ceiling, "ratio": end_to_end / ceiling,
        "views_s_per_batch": views_s, "wall_s": wall, "threads": args.threads, "device": "cuda" if cuda else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    r = measure(argv)
    step_s = r["batch"] / r["end_to_end_images_per_s"]
    print(f"pretrain_throughput: {r['method']} on {r['model']}, batch {r['batch']}, {r['views']} views, "
          f"{r['warmup']} + {r['steps']} steps, {r['wall_s']:.0f} s wall including start-up")
    print(f"  end to end (disk -> views -> step): {r['end_to_end_images_per_s']:8.1f} images/s ({step_s:.2f} s/step)")
    print(f"  ceiling (views already in memory) : {r['ceiling_images_per_s']:8.1f} images/s")
    print(f"  ratio (end to end / ceiling)      : {r['ratio']:.2f}  (aim >= 0.9)")
    print(f"  making one batch of views alone   : {r['views_s_per_batch']:.2f} s ({100 * r['views_s_per_batch'] / step_s:.0f}% "
          "of an end-to-end step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
