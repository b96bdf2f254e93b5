"""Pretraining throughput: images per second of the whole step (views, teacher, student, backward, EMA).

Runs ``python -m pretrain``'s loop for a few steps on a config (default: the tiny CPU config on
the synthetic default set) and reports the loop's own images/s, split into time spent making
views and time in the model, so a slow run shows where its time goes.

    python benchmarks/pretrain_throughput.py [--config configs/pretrain/dino_msht_tiny_cpu.yaml] [--steps 6]
    python benchmarks/pretrain_throughput.py --config configs/pretrain/dino_msht.yaml --steps 50 data.root=DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def time_views(cfg, batches: int) -> float:
    """Seconds per batch to decode and cut the views alone (no model)."""
    from pretrain.views import DecodedImages, MultiCropViews, collate_decoded
    from roseprior.data import load_unlabeled, resolve_root

    samples = sorted(load_unlabeled(resolve_root(cfg.data)), key=lambda s: s.path)
    dataset = DecodedImages([s.path for s in samples], cfg.views.source_max_side)
    views = MultiCropViews(cfg.views, seed=cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    for b in range(batches):
        idx = [(b * cfg.train.batch_size + i) % len(dataset) for i in range(cfg.train.batch_size)]
        images, sizes, indices = collate_decoded([dataset[i] for i in idx])
        views(images.to(device), sizes, indices, epoch=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/dino_msht_tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pretrain.config import PretrainConfig, validate
    from pretrain.loop import run
    from roseprior.config import load_config

    with tempfile.TemporaryDirectory(prefix="pretrain_throughput_") as tmp:
        overrides = [*args.overrides, f"out_dir={tmp}", f"train.max_steps={args.steps}", "monitor.progress=false",
                     "train.log_every=1", "checkpoint.every_steps=1000000"]
        cfg = validate(load_config(PretrainConfig, args.config, overrides))
        start = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rate = records[-1]["images_per_second"]
    views_s = time_views(cfg, batches=min(args.steps, 4))
    batch = cfg.train.batch_size
    step_s = batch / rate
    print(f"pretrain_throughput: {cfg.method.name} on {cfg.model.name}, batch {batch}, "
          f"{cfg.views.n_global} x {cfg.views.global_size} px + {cfg.views.n_local} x {cfg.views.local_size} px views, "
          f"{args.steps} steps, {wall:.0f} s wall including start-up")
    print(f"  {rate:.1f} images/s ({step_s:.2f} s/step), of which views {views_s:.2f} s/step "
          f"({100 * views_s / step_s:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
