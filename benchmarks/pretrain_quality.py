"""Does pretraining give a domain prior? DINO on real cytology, probed on held-out fields.

Pretrains on ``../shared/data/cric_cells`` (labels unused) within a CPU time budget, then scores
the pretrained backbone and the same backbone at random init with the same probes on the same
held-out fields: kNN (faiss, cosine, k=20, temperature-weighted) and a linear probe (logistic
regression, balanced class weights), both as balanced accuracy. Fields (``source_image``) are split
80/20, so no field's cells are on both sides.

    python benchmarks/pretrain_quality.py --minutes 30      # the full check
    python benchmarks/pretrain_quality.py --minutes 3       # a smoke run

Aim (30 minutes): kNN balanced accuracy >= random init + 10 points; linear probe >= 0.80.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/pretrain_quality.py` from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cric_cells"


def pretrain_overrides(args: argparse.Namespace, data_csv: Path, out: Path) -> list[str]:
    return [
        f"data.root={data_csv}", f"out_dir={out}", f"seed={args.seed}", f"model.name={args.model}",
        f"model.kwargs={{norm: {args.norm}}}", "method.name=dino", "method.momentum_start=0.99",
        "method.dino.out_dim=4096", "method.dino.hidden_dim=512", "method.dino.bottleneck_dim=128",
        f"views.global_size={args.global_size}", f"views.local_size={args.local_size}",
        f"views.n_local={args.n_local}", "views.scale_mode=magnification", "views.magnification=[0.75,2.0]",
        "views.cross_magnification=true", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
        "train.log_every=10", "checkpoint.every_steps=1000000", "monitor.collapse_after_steps=1000000",
        f"data.num_workers={args.workers}",
    ]


def write_manifest(samples: list, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path"])
        writer.writerows([[s.path] for s in samples])
    return path


def time_step(args: argparse.Namespace, manifest: Path, out: Path) -> float:
    """Seconds of one warm training step (views, teacher, student, backward, EMA), timed in-process."""
    import backbones
    from pretrain.config import PretrainConfig, validate
    from pretrain.methods import build_method
    from pretrain.views import DecodedImages, MultiCropViews, collate_decoded
    from roseprior.config import load_config
    from roseprior.data import load_unlabeled

    cfg = validate(load_config(PretrainConfig, None, pretrain_overrides(args, manifest, out)))
    method = build_method(cfg.method, backbones.create(cfg.model.name, **cfg.model.kwargs)).train()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.0)
    views = MultiCropViews(cfg.views, seed=cfg.seed)
    dataset = DecodedImages([s.path for s in load_unlabeled(manifest)[: args.batch]])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        images, sizes, indices = collate_decoded([dataset[i] for i in range(len(dataset))])
        loss, _ = method(views(images, sizes, indices, epoch=0), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(0.99)
        times.append(time.perf_counter() - start)
    return times[-1]


def run_pretrain(overrides: list[str]) -> float:
    from pretrain.config import PretrainConfig, validate
    from pretrain.loop import run
    from roseprior.config import load_config

    start = time.perf_counter()
    run(validate(load_config(PretrainConfig, None, overrides)))
    return time.perf_counter() - start


@torch.no_grad()
def embed(backbone: torch.nn.Module, samples: list, size: int, batch: int = 128) -> np.ndarray:
    from roseprior.data import ImageDataset

    backbone.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, image_size=size), batch_size=batch)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # the pretrain views' default normalisation
    std = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)
    feats = [backbone.forward_embedding((images.float() / 255.0 - mean) / std) for images, _, _ in loader]
    return torch.cat(feats).numpy()


def probe(backbone: torch.nn.Module, train: list, test: list, size: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from roseprior.knn import knn_predict

    f_train, f_test = embed(backbone, train, size), embed(backbone, test, size)
    y_train = np.array([s.label for s in train])
    y_test = np.array([s.label for s in test])
    knn = knn_predict(f_train, y_train, f_test, num_classes=2, k=20, temperature=0.07).argmax(1)
    scaler = StandardScaler().fit(f_train)
    linear = LogisticRegression(max_iter=3000, class_weight="balanced", C=0.1)
    linear.fit(scaler.transform(f_train), y_train)
    return {
        "knn_balanced_accuracy": float(balanced_accuracy_score(y_test, knn)),
        "linear_balanced_accuracy": float(balanced_accuracy_score(y_test, linear.predict(scaler.transform(f_test)))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--minutes", type=float, default=30.0, help="pretraining budget, calibration included")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--model", default="msht_tiny")
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="per 256 images (scaled by the batch)")
    parser.add_argument("--global-size", type=int, default=96)
    parser.add_argument("--local-size", type=int, default=64)
    parser.add_argument("--n-local", type=int, default=2)
    parser.add_argument("--eval-size", type=int, default=128, help="probe input size (CRIC crops are 128 px)")
    parser.add_argument("--max-eval-images", type=int, default=None, help="cap train/test probe sets (quick runs)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import backbones
    from roseprior.data import load_labelled
    from roseprior.splits import split_samples

    data = Path(args.data)
    if not data.exists():
        print(f"pretrain_quality: {data} not found (the shared development data); nothing to do", file=sys.stderr)
        return 2
    samples = load_labelled(data, ["N", "P"])
    for s in samples:
        s.group = s.extra.get("source_image") or s.group
    splits = split_samples(samples, "8:2:0", group_by="source_image", seed=args.seed)
    train, test = splits["train"], splits["val"]
    fields = {name: len({s.extra["source_image"] for s in part}) for name, part in (("train", train), ("test", test))}
    print(f"pretrain_quality: {len(train)} train cells ({fields['train']} fields), {len(test)} held-out cells "
          f"({fields['test']} fields); pretraining budget {args.minutes} min")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pretrain_quality_"))
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(train, out / "pretrain_images.csv")  # training fields only, no labels
    budget_s = args.minutes * 60.0

    # Size the run (and so its schedules) to the budget from the time of one warm step.
    start = time.perf_counter()
    step_s = 1.1 * time_step(args, manifest, out / "calibration")  # 10% margin: logging, checkpoints
    calib_s = time.perf_counter() - start
    steps_per_epoch = len(train) // args.batch
    steps = max(1, int((budget_s - calib_s) / step_s))
    epochs = max(1, -(-steps // steps_per_epoch))  # the schedule spans whole epochs; max_steps cuts the last
    max_steps = min(steps, epochs * steps_per_epoch)
    print(f"pretrain_quality: ~{step_s:.1f} s/step -> {max_steps} steps ({max_steps / steps_per_epoch:.2f} epochs "
          f"of {steps_per_epoch} steps)")
    run_dir = out / "pretrain"
    overrides = pretrain_overrides(args, manifest, run_dir) + [
        f"train.epochs={epochs}", f"train.max_steps={max_steps}",
        f"train.warmup_epochs={0.1 * max_steps / steps_per_epoch}",
        f"train.max_minutes={max((budget_s - calib_s - 20.0) / 60.0, 0.1)}",  # 20 s: start-up, export
    ]
    train_s = run_pretrain(overrides)

    rng = np.random.default_rng(args.seed)
    if args.max_eval_images:
        train = [train[i] for i in sorted(rng.choice(len(train), min(args.max_eval_images, len(train)), replace=False))]
        test = [test[i] for i in sorted(rng.choice(len(test), min(args.max_eval_images, len(test)), replace=False))]
    torch.manual_seed(args.seed)
    random_init = backbones.create(args.model, norm=args.norm)
    results = {
        "pretrained": probe(backbones.load(run_dir), train, test, args.eval_size),
        "random_init": probe(random_init, train, test, args.eval_size),
    }
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_done = max((m["step"] for m in metrics), default=0)
    gain = results["pretrained"]["knn_balanced_accuracy"] - results["random_init"]["knn_balanced_accuracy"]
    summary = {
        "minutes_budget": args.minutes, "pretrain_seconds": round(calib_s + train_s, 1), "steps": steps_done,
        "train_cells": len(train), "test_cells": len(test), "model": args.model, **results,
        "knn_gain_points": round(100 * gain, 1),
        "aims": {"knn_gain_10_points": gain >= 0.10,
                 "linear_probe_0_80": results["pretrained"]["linear_balanced_accuracy"] >= 0.80},
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"pretrain_quality: {steps_done} DINO steps in {calib_s + train_s:.0f} s on {args.model}; "
          f"probes on {len(train)} train / {len(test)} held-out cells")
    print(f"  {'backbone':<12} {'kNN bal.acc':>12} {'linear bal.acc':>15}")
    for name, r in results.items():
        print(f"  {name:<12} {r['knn_balanced_accuracy']:>12.3f} {r['linear_balanced_accuracy']:>15.3f}")
    print(f"  kNN gain over random init: {100 * gain:+.1f} points (aim >= +10); "
          f"linear probe {'meets' if summary['aims']['linear_probe_0_80'] else 'below'} 0.80 aim")
    print(f"  details: {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
