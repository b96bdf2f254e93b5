"""Do the CAM figures sit on cells? Localisation scores of a finetuned classifier's maps on synthetic data.

The synthetic default set knows where its cells are (``roseprior.synth.cell_mask``: nuclei and
cytoplasm, not red blood cells or smear background). For every validation and test image this
scores each panel of the finetune CAM figure (Grad-CAM on the CNN stage, Grad-CAM on the last
decoder, the guided attention) against that mask, for the trained classifier and for the same
architecture at random init (the reference a map must beat to carry anything learnt):

- on-cell lift: mean map value on cells / mean map value overall (1: no preference);
- pointing game: how often the hottest pixel lies on a cell (chance: the cell area fraction);
- border lift: mean map value in the outer 10% band / overall (> 1: drawn to the edges).

    python benchmarks/cam_quality.py                  # finetunes msht_tiny from scratch first (~10 CPU min)
    python benchmarks/cam_quality.py --run runs/ft    # scores an existing finetune on the synthetic default
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/cam_quality.py` from anywhere
    sys.path.insert(0, str(REPO))

from finetune.cam import cam_maps, localisation_scores, write_cam_figures  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from roseprior.checkpoint import atomic_write_json  # noqa: E402
from roseprior.config import load_config  # noqa: E402

NAME = re.compile(r"^(?P<label>[A-Za-z]+)_(?P<index>\d+)\.jpg$")


def finetune(out: Path, epochs: int, threads: int) -> Path:
    from finetune.train import run

    torch.set_num_threads(threads)
    # From scratch on 210 images: a higher lr and more epochs than the smoke config, so the maps
    # scored are those of a classifier that works (test balanced accuracy about 0.9), at 128 px.
    overrides = [f"out_dir={out}", f"train.epochs={epochs}", "train.lr=5e-4", "data.image_size=128",
                 "cam.num_images=8"]
    run(load_config(FinetuneConfig, REPO / "configs" / "finetune" / "msht_tiny_cpu.yaml", overrides))
    return out


def panels(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The finetune CAM figure's maps for the predicted class."""
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    return cam_maps(model, images, predicted)


def score(model: torch.nn.Module, batches: list[tuple[torch.Tensor, np.ndarray]]) -> dict[str, dict[str, float]]:
    per_panel: dict[str, list[dict[str, float]]] = {}
    for images, masks in batches:
        for name, maps in panels(model, images).items():
            per_panel.setdefault(name, []).extend(localisation_scores(m, k) for m, k in zip(maps, masks, strict=True))
    return {name: {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} for name, rows in per_panel.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a finetune out_dir trained on the synthetic default")
    parser.add_argument("--out", default="runs/bench/cam_quality")
    parser.add_argument("--epochs", type=int, default=40, help="finetune epochs when --run is not given")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    import backbones
    from finetune.model import Classifier, load_classifier
    from finetune.train import load_splits
    from roseprior.data import ImageDataset
    from roseprior.synth import DEFAULT_SETTINGS, cell_mask

    out = Path(args.out)
    start = time.perf_counter()
    run_dir = Path(args.run) if args.run else finetune(out / "finetune", args.epochs, args.threads)
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    if cfg.data.root is not None:
        print(f"cam_quality: {run_dir} was trained on {cfg.data.root}; cell masks exist for the synthetic "
              "default only (data.root: null)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, meta = load_classifier(run_dir)
    splits = load_splits(cfg).splits
    samples = splits["val"] + splits["test"]
    size = cfg.data.image_size
    dataset = ImageDataset(samples, image_size=size)
    settings = {k: v for k, v in DEFAULT_SETTINGS.items() if k != "n_per_class"}
    batches = []
    for lo in range(0, len(samples), args.batch):
        rows = range(lo, min(lo + args.batch, len(samples)))
        images = torch.stack([dataset[i][0] for i in rows]).float().div(255.0)
        masks = []
        for i in rows:
            match = NAME.match(Path(samples[i].path).name)
            mask = cell_mask(match["label"], int(match["index"]), **settings)
            resized = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(size, size))
            masks.append(resized[0, 0].numpy() > 0.5)
        batches.append((images, np.stack(masks)))

    # The finetune CAM figures (this backbone's current target layers) for the same images.
    with torch.no_grad():
        probs = torch.cat([model.float()(images).softmax(1) for images, _ in batches]).numpy()
    labels = np.array([s.label for s in samples])
    figures = write_cam_figures(model, samples, {"probs": probs, "labels": labels, "indices": np.arange(len(samples))},
                                cfg, out / "cam")
    torch.manual_seed(0)
    random_init = Classifier(backbones.create(meta["backbone"], **meta.get("backbone_kwargs", {})),
                             meta["num_classes"], meta["mean"], meta["std"]).eval()
    results = {"trained": score(model.float().eval(), batches), "random_init": score(random_init, batches)}
    chance = float(np.mean([m.mean() for _, masks in batches for m in masks]))
    summary = {"run": str(run_dir), "images": len(samples), "image_size": size, "cell_area_fraction": chance,
               "seconds": round(time.perf_counter() - start, 1), **results}
    atomic_write_json(out / "cam_quality.json", summary)

    print(f"cam_quality: {len(samples)} val+test images of {run_dir} at {size} px; cells cover {chance:.2f} "
          "of each image on average (the pointing game's chance level)")
    print(f"  {'map':<28} {'model':<12} {'on-cell lift':>12} {'pointing':>9} {'border lift':>12}")
    for panel in results["trained"]:
        for which in ("trained", "random_init"):
            r = results[which].get(panel)
            if r:
                print(f"  {panel:<28} {which:<12} {r['on_mask_lift']:>12.2f} {r['pointing_hit']:>9.2f} "
                      f"{r['border_lift']:>12.2f}")
    print(f"  details: {out / 'cam_quality.json'}; figures: {', '.join(str(f) for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
