"""Does the domain prior help, and does SAM? Random init vs a pretrain-stage backbone, SAM on and off.

On real cytology (``../shared/data/cric_cells``, split 7:2:1 grouped by ``source_image`` so the
cells of one field never straddle splits) each variant is fine-tuned with the same budget, data,
seed and architecture (the random-init model is built from the pretrained folder's own
backbone.json), selected on validation, and scored once on test. Prints a table (test balanced
accuracy, AUROC, ECE) and writes ``OUT/finetune_quality.json``.

    python benchmarks/finetune_quality.py --pretrained runs/pretrain_dino            # full budget
    python benchmarks/finetune_quality.py --pretrained DIR --max-images 400 --max-steps 3   # dry run
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from finetune.config import FinetuneConfig  # noqa: E402
from roseprior.checkpoint import atomic_write_json  # noqa: E402
from roseprior.config import load_config  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cric_cells"


def subset_manifest(data: Path, max_images: int, out: Path, seed: int) -> Path:
    """A manifest of whole ``source_image`` groups, about ``max_images`` rows, for quick runs."""
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["source_image"]].append(row)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    chosen: list[dict] = []
    for name in names:
        if len(chosen) >= max_images:
            break
        chosen.extend(groups[name])
    path = out / "manifest_subset.csv"
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in chosen:
            writer.writerow(dict(row, path=str((data / row["path"]).resolve())))
    return path


def architecture_of(pretrained: Path | None, init: str) -> tuple[str, dict]:
    """The registry name + kwargs random init must use to match the pretrained backbone exactly."""
    if pretrained is None:
        return init, {}
    meta = json.loads((pretrained / "backbone.json").read_text())
    kwargs = dict(meta.get("kwargs") or {})
    size = (meta.get("default_cfg") or {}).get("input_size")
    if size and "img_size" not in kwargs and not meta["name"].startswith("timm:"):
        kwargs["img_size"] = int(size[-1])  # the pretrained position grid, so the parameter shapes match
    return meta["name"], kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cric_cells folder (manifest.csv)")
    parser.add_argument("--pretrained", type=Path, default=None, help="a pretrain output folder (backbone.json)")
    parser.add_argument("--init", default="msht_tiny", help="architecture when no --pretrained is given")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_finetune_quality"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128, help="cric crops are 128 px")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-images", type=int, default=None, help="use about this many images (whole fields)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sam", nargs="+", default=["sam", "off"], choices=["sam", "asam", "off"])
    args = parser.parse_args(argv)

    if not (args.data / "manifest.csv").is_file():
        print(f"finetune_quality: {args.data}/manifest.csv not found; nothing to do", file=sys.stderr)
        return 2
    if args.pretrained is not None and not (args.pretrained / "backbone.json").is_file():
        print(f"finetune_quality: {args.pretrained} holds no backbone.json (a pretrain out_dir)", file=sys.stderr)
        return 2
    root = subset_manifest(args.data, args.max_images, args.out, args.seed) if args.max_images else args.data
    name, kwargs = architecture_of(args.pretrained, args.init)
    inits = [("random", name)] + ([("pretrained", str(args.pretrained))] if args.pretrained else [])
    if args.pretrained is None:
        print("finetune_quality: no --pretrained folder given; running random init only", file=sys.stderr)

    rows = []
    for init_kind, init in inits:
        for sam in args.sam:
            variant = f"{init_kind}_{sam}"
            overrides = [
                f"init={init}", f"sam={sam}", f"seed={args.seed}", f"out_dir={args.out / variant}",
                f"data.root={root}", "data.group_by=source_image",  # split_ratios: the 7:2:1 default
                "data.framing=cell",  # crops cut around one cell: --scale auto calibrates on whole resampled crops
                f"data.image_size={args.image_size}", f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "cam.enabled=false",
            ]
            if args.max_steps is not None:
                overrides.append(f"train.max_steps={args.max_steps}")
            cfg = load_config(FinetuneConfig, None, overrides)
            if init_kind == "random":
                cfg.model = dict(kwargs)
            from finetune.train import run

            start = time.perf_counter()
            metrics = run(cfg)
            test = metrics["test"]
            rows.append({
                "variant": variant, "init": init, "sam": sam, "seconds": round(time.perf_counter() - start, 1),
                "steps": metrics["steps"], "best_epoch": metrics["best_epoch"], "sizes": metrics["sizes"],
                "test": {k: test[k] for k in ("balanced_accuracy", "auroc", "ece", "sensitivity", "specificity", "n")},
                "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
            })

    print()
    print(f"{'variant':<18} {'test bal.acc':>12} {'AUROC':>8} {'ECE':>8} {'val bal.acc':>12} {'steps':>6} {'s':>7}")
    for r in rows:
        t = r["test"]
        auroc = "n/a" if t["auroc"] is None else f"{t['auroc']:.4f}"
        print(f"{r['variant']:<18} {t['balanced_accuracy']:>12.4f} {auroc:>8} {t['ece']:>8.4f} "
              f"{r['val_balanced_accuracy']:>12.4f} {r['steps']:>6} {r['seconds']:>7.1f}")
    report = {
        "data": str(args.data), "subset": str(root) if args.max_images else None, "architecture": name,
        "kwargs": kwargs, "budget": {"epochs": args.epochs, "max_steps": args.max_steps,
                                     "batch_size": args.batch_size, "image_size": args.image_size, "lr": args.lr},
        "seed": args.seed, "results": rows,
    }
    path = atomic_write_json(args.out / "finetune_quality.json", report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
