"""Does pretraining give a domain prior? SSL on real cytology, probed on held-out fields.

Pretrains with a recipe (``--config``, default ``configs/pretrain/simclr_msht_tiny_cpu.yaml``) on
``../shared/data/cric_cells`` (labels unused) within a CPU time budget, then scores
the pretrained backbone and the same backbone at random init with the same probes on the same
held-out fields: kNN (faiss, cosine, k=20, temperature-weighted) and a linear probe (logistic
regression, balanced class weights), both as balanced accuracy. Fields (``source_image``) are split
80/20, so no field's cells are on both sides.

    python benchmarks/pretrain_quality.py --minutes 30      # the full check
    python benchmarks/pretrain_quality.py --minutes 3       # a smoke run
    python benchmarks/pretrain_quality.py --config configs/pretrain/dino_msht_tiny_cpu.yaml   # another recipe

Probes see whole images resized to the recipe's global view size (``--eval-size`` to change it),
normalised as the views were.

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
    """The recipe is ``args.config``; the benchmark sets only the data, the output and the seed."""
    return [
        f"data.root={data_csv}", f"out_dir={out}", f"seed={args.seed}", "train.log_every=10",
        "checkpoint.every_steps=1000000", "monitor.collapse_after_steps=1000000",
        f"data.num_workers={args.workers}", *args.set,
    ]


def load_recipe(args: argparse.Namespace, overrides: list[str]):
    from pretrain.config import PretrainConfig, validate
    from roseprior.config import load_config

    return validate(load_config(PretrainConfig, args.config, overrides))


def write_manifest(samples: list, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path"])
        writer.writerows([[s.path] for s in samples])
    return path


def time_step(args: argparse.Namespace, manifest: Path, out: Path) -> float:
    """Seconds of one warm training step (views, teacher, student, backward, EMA), timed in-process."""
    import backbones
    from pretrain.methods import build_method
    from pretrain.views import DecodedImages, MultiCropViews, collate_decoded
    from roseprior.data import load_unlabeled

    cfg = load_recipe(args, pretrain_overrides(args, manifest, out))
    method = build_method(cfg.method, backbones.create(cfg.model.name, **cfg.model.kwargs)).train()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.0)
    views = MultiCropViews(cfg.views, seed=cfg.seed)
    dataset = DecodedImages([s.path for s in load_unlabeled(manifest)[: cfg.train.batch_size]])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        images, sizes, indices = collate_decoded([dataset[i] for i in range(len(dataset))])
        loss, _ = method(views(images, sizes, indices, epoch=0), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if method.has_teacher:
            method.after_step(0.99)
        times.append(time.perf_counter() - start)
    return times[-1]


def run_pretrain(args: argparse.Namespace, overrides: list[str]) -> float:
    from pretrain.loop import run

    start = time.perf_counter()
    run(load_recipe(args, overrides))
    return time.perf_counter() - start


def pretrain_within_budget(args: argparse.Namespace, recipe, manifest: Path, out: Path, budget_s: float,
                           n_images: int) -> float:
    """Pretrain into ``out/pretrain`` with schedules sized to the budget; returns the seconds spent.

    The number of steps comes from the time of one warm step, so the cosine schedules end when the
    budget does; ``train.max_minutes`` stops the run if the machine turns out slower.
    """
    start = time.perf_counter()
    step_s = 1.1 * time_step(args, manifest, out / "calibration")  # 10% margin: logging, checkpoints
    calib_s = time.perf_counter() - start
    steps_per_epoch = n_images // recipe.train.batch_size
    steps = max(1, int((budget_s - calib_s) / step_s))
    epochs = max(1, -(-steps // steps_per_epoch))  # the schedule spans whole epochs; max_steps cuts the last
    max_steps = min(steps, epochs * steps_per_epoch)
    print(f"pretrain_quality: ~{step_s:.1f} s/step -> {max_steps} steps ({max_steps / steps_per_epoch:.2f} epochs "
          f"of {steps_per_epoch} steps)")
    overrides = pretrain_overrides(args, manifest, out / "pretrain") + [
        f"train.epochs={epochs}", f"train.max_steps={max_steps}",
        f"train.warmup_epochs={0.1 * max_steps / steps_per_epoch}",
        f"train.max_minutes={max((budget_s - calib_s - 20.0) / 60.0, 0.1)}",  # 20 s: start-up, export
    ]
    return calib_s + run_pretrain(args, overrides)


@torch.no_grad()
def embed(backbone: torch.nn.Module, samples: list, size: int, mean: list[float], std: list[float],
          batch: int = 128) -> np.ndarray:
    """Pooled embeddings of whole images resized to ``size``, normalised as the pretrain views were."""
    from roseprior.data import ImageDataset

    backbone.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, image_size=size), batch_size=batch)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    feats = [backbone.forward_embedding((images.float() / 255.0 - mean) / std) for images, _, _ in loader]
    return torch.cat(feats).numpy()


def probe(backbone: torch.nn.Module, train: list, test: list, size: int, norm: tuple[list, list]) -> dict[str, float]:
    """kNN and linear-probe balanced accuracy on ``test``; the linear probe's C is chosen by 5-fold
    cross-validation over the training fields (grouped by ``source_image``), never on ``test``."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    from roseprior.knn import knn_predict

    f_train, f_test = embed(backbone, train, size, *norm), embed(backbone, test, size, *norm)
    y_train = np.array([s.label for s in train])
    y_test = np.array([s.label for s in test])
    knn = knn_predict(f_train, y_train, f_test, num_classes=2, k=20, temperature=0.07).argmax(1)
    scaler = StandardScaler().fit(f_train)
    x_train = scaler.transform(f_train)
    folds = list(GroupKFold(5).split(x_train, y_train, groups=[s.extra.get("source_image", s.group) for s in train]))
    linear = LogisticRegressionCV(Cs=np.logspace(-3, 1, 9).tolist(), cv=folds, scoring="balanced_accuracy",
                                  class_weight="balanced", max_iter=10000, l1_ratios=(0.0,),  # plain L2
                                  use_legacy_attributes=False)
    linear.fit(x_train, y_train)
    return {
        "knn_balanced_accuracy": float(balanced_accuracy_score(y_test, knn)),
        "linear_balanced_accuracy": float(balanced_accuracy_score(y_test, linear.predict(scaler.transform(f_test)))),
        "linear_C": float(np.ravel(linear.C_)[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--minutes", type=float, default=30.0, help="pretraining budget, calibration included")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain" / "simclr_msht_tiny_cpu.yaml"),
                        help="the pretrain recipe (default: the small-budget SimCLR one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further pretrain config override (repeatable), e.g. method.name=dino")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="probe input size, whole images resized (default: the recipe's global view size)")
    parser.add_argument("--max-eval-images", type=int, default=None, help="cap train/test probe sets (quick runs)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="probe the backbone an earlier run left in --out instead of pretraining again")
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
    recipe = load_recipe(args, pretrain_overrides(args, manifest, out / "pretrain"))
    run_dir = out / "pretrain"
    previous = out / "quality.json"
    if args.reuse and (run_dir / "backbone.safetensors").is_file() and previous.is_file():
        print(f"pretrain_quality: --reuse: probing the backbone already in {run_dir}")
        pretrain_s = json.loads(previous.read_text())["pretrain_seconds"]
    else:
        pretrain_s = pretrain_within_budget(args, recipe, manifest, out, budget_s, len(train))
    eval_size = args.eval_size or recipe.views.global_size
    norm = (list(recipe.views.mean), list(recipe.views.std))

    rng = np.random.default_rng(args.seed)
    if args.max_eval_images:
        train = [train[i] for i in sorted(rng.choice(len(train), min(args.max_eval_images, len(train)), replace=False))]
        test = [test[i] for i in sorted(rng.choice(len(test), min(args.max_eval_images, len(test)), replace=False))]
    torch.manual_seed(args.seed)
    random_init = backbones.create(recipe.model.name, **recipe.model.kwargs)
    results = {
        "pretrained": probe(backbones.load(run_dir), train, test, eval_size, norm),
        "random_init": probe(random_init, train, test, eval_size, norm),
    }
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_done = max((m["step"] for m in metrics), default=0)
    gain = results["pretrained"]["knn_balanced_accuracy"] - results["random_init"]["knn_balanced_accuracy"]
    summary = {
        "minutes_budget": args.minutes, "pretrain_seconds": round(pretrain_s, 1), "steps": steps_done,
        "train_cells": len(train), "test_cells": len(test), "config": args.config, "overrides": args.set,
        "model": recipe.model.name, "method": recipe.method.name, "eval_size": eval_size, **results,
        "knn_gain_points": round(100 * gain, 1),
        "aims": {"knn_gain_10_points": gain >= 0.10,
                 "linear_probe_0_80": results["pretrained"]["linear_balanced_accuracy"] >= 0.80},
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"pretrain_quality: {steps_done} {recipe.method.name} steps in {pretrain_s:.0f} s on "
          f"{recipe.model.name}; probes at {eval_size} px on {len(train)} train / {len(test)} held-out cells")
    print(f"  {'backbone':<12} {'kNN bal.acc':>12} {'linear bal.acc':>15} {'linear C (CV)':>14}")
    for name, r in results.items():
        print(f"  {name:<12} {r['knn_balanced_accuracy']:>12.3f} {r['linear_balanced_accuracy']:>15.3f} "
              f"{r['linear_C']:>14.3g}")
    print(f"  kNN gain over random init: {100 * gain:+.1f} points (aim >= +10); "
          f"linear probe {'meets' if summary['aims']['linear_probe_0_80'] else 'below'} 0.80 aim")
    print(f"  details: {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
