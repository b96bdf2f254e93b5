"""``roseprior adapt --run RUN --images NEW_SITE --out OUT [--no-bn] [--stain] [--scale auto|VALUE|none]``:
adapt a classifier to a new site without labels.

The new site's magnification comes first (``--scale``, ``auto`` by default: one value for the site, estimated
from its nuclei as ``finetune.predict --scale auto`` does). When it differs from the training scale, the
adapted run records it, its BatchNorm statistics are gathered on the site's images brought to the training
scale (as predict will show them to the model, not squeezed whole into its input), and predict uses it
unless told otherwise. Then three adaptations, each optional, written as a run folder that
``finetune.predict``, ``finetune.export`` and the probes accept like any other:

- **BatchNorm statistics moved to the new site** (after AdaBN, Li et al. 2016,
  https://arxiv.org/abs/1603.04779): a CNN's normalisation layers hold the training site's feature
  statistics; moving them by how the new site's differ from the training images' (both measured the same
  way, ``transfer_batchnorm``) removes much of a stain or scanner shift. The weights are unchanged; only
  the running means and variances move.
- **Stain normalisation of the inputs to the training set's reference** (Macenko, through torchstain):
  the stain of a sample of the run's training images becomes the target, the new site's stain is measured
  once over a sample of its images, and every new field is mapped from the one to the other by the same map
  before the model sees it (``best.json`` records both; predict applies it). One map for the site, not a
  Macenko estimate per field: per field, each field's darkest nuclei would be set to the target's darkness,
  and a dark nucleus is one of the signs of malignancy (``imageops.StainNormalizer.fit_source``). The optical
  density the two stain vectors do not explain (a third dye) passes through, so a site stained as the training
  set is left as it is.

- **Continued self-supervised pretraining on the new site, then the head refitted on the original
  labels** (``--ssl-steps N``): the backbone continues with the SimCLR CPU recipe (``pretrain``,
  ``model.init`` = the classifier's backbone, views at the classifier's input size) on the new site's
  images; BatchNorm statistics are then re-estimated on the run's training images and the head is
  refitted on their frozen features (the product's linear probe, C chosen on the run's validation
  split, folded into the linear head), with temperature and operating point refitted on validation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roseprior.data import ImageDataset, Sample, filter_readable, load_unlabeled, spread_indices
from roseprior.errors import DataError
from roseprior.progress import Progress
from roseprior.stage import command_main

from .model import Classifier, load_classifier, save_classifier
from .predict import parse_scale

__all__ = ["adapt", "main", "reestimate_batchnorm", "transfer_batchnorm"]

# Training images the stain target is fitted on, and new-site images its source, within a pixel budget for large
# inputs. Macenko's 99th-percentile concentration over 16 CRIC cells varied by up to 2x from one sample of the
# same site to another (haematoxylin 2.3-3.1, eosin 1.8-3.6), so a site mapped to its own stain came out up to a
# third lighter or darker; over 128 the spread was 0.96-1.07 and 0.79-1.15.
STAIN_SAMPLE, STAIN_SAMPLE_PIXELS = 128, 2**23
# A move of the share of fields called positive beyond this (absolute) is reported: without labels it is the one
# sign that the adapted statistics changed what the operating point means.
CALLED_POSITIVE_MOVE = 0.15
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "simclr_msht_tiny_cpu.yaml"


@torch.no_grad()
def reestimate_batchnorm(model: Classifier, samples: list[Sample], image_size: int, batch_size: int = 32,
                         transform: Any = None, augment: Any = None, passes: int = 1) -> int:
    """Replace every BatchNorm layer's running statistics by the cumulative average over ``samples``;
    returns the number of layers updated. Dropout stays off (the rest of the model in eval mode).

    ``augment`` should be the run's own training augmentation: the trained statistics were gathered on
    augmented batches (colour jitter widens every feature's spread), so statistics of plain images would
    not match what the weights were trained against."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every batch counts equally
        layer.train()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, image_size=image_size), batch_size=batch_size)
    # One view per image: the statistics describe what each forward pass sees, and the 8 readings of
    # decision.dihedral_mean would only cost 8x for the same figures.
    with Progress(len(samples) * passes, "adapt: BatchNorm statistics", unit="img") as progress, model.one_view():
        for _ in range(passes):
            for images, _, _ in loader:
                x = images.float().div_(255.0)
                x = transform(x) if transform is not None else x
                model(augment(x) if augment is not None else x)
                progress.update(len(images))
    for layer in layers:
        layer.momentum = 0.1
    model.eval()
    return len(layers)


@torch.no_grad()
def transfer_batchnorm(model: Classifier, trained_on: list[Sample], new_site: list[Sample], image_size: int,
                       batch_size: int = 32, transform: Any = None, augment: Any = None, passes: int = 1) -> int:
    """Move every BatchNorm layer's trained statistics by how the new site's differ from the training images',
    both measured the same way (``reestimate_batchnorm``): mean + (site - training), variance x (site /
    training); returns the number of layers moved. ``augment``: a callable returning a fresh, seeded augmentation.

    Not plain AdaBN, which replaces the statistics by the new site's: re-estimated on the run's own training
    images, they came out 3-8% lower in variance than the ones training left, and that alone moved a
    thresholded classifier's calls on a held-out site from 37% P to 14% (balanced accuracy 0.86 to 0.64).
    Moving the trained statistics by a difference cancels what the procedure adds; on the held-out synthetic
    sites it scored 0.931 / 0.835 against 0.930 / 0.834 unadapted and 0.841 / 0.769 with plain AdaBN."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    trained = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    measured = []
    for samples in (trained_on, new_site):
        reestimate_batchnorm(model, samples, image_size, batch_size, transform, augment() if augment else None, passes)
        measured.append([(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers])
    for layer, (mean, var), (train_mean, train_var), (site_mean, site_var) in zip(layers, trained, *measured,
                                                                                 strict=True):
        layer.running_mean.copy_(mean + site_mean - train_mean)
        layer.running_var.copy_(var * site_var / train_var.clamp_min(1e-12))
    return len(layers)


def adapt(run: str | Path, images: str | Path, out: str | Path, bn: bool = True, stain: bool = False,
          max_images: int = 2000, batch_size: int = 32, ssl_steps: int = 0, scale: str | float | None = "auto"
          ) -> Path:
    """Write the adapted run into ``out`` (best.* and backbone.*, plus the run's config and image list).
    ``scale``: how many times larger the new site's objects appear than the training images' (a value,
    ``"auto"`` to estimate it, None to take the site at the training scale)."""
    from roseprior.imageops import StainNormalizer
    from roseprior.splits import read_image_list

    run, out = Path(run), Path(out)
    if not (bn or stain or ssl_steps):
        raise DataError("adapt: nothing to do; keep --bn (the default), or add --stain or --ssl-steps N")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty; adapt writes a new run folder, choose another")
    model, meta = load_classifier(run)
    size = int(meta["image_size"])
    listed = load_unlabeled(images)  # a folder (sorted: a first max_images would be its first folders only) or a manifest
    new_site = filter_readable([Sample(listed[i].path) for i in spread_indices(len(listed), max_images)], None, 0.5)
    if not new_site:
        raise DataError(f"adapt: no readable images under {images}")
    transform, adapted = None, {"images": str(Path(images).resolve()), "new_site_images": len(new_site)}
    if meta.get("scale"):  # a run adapted before is adapted afresh: the scale of the site it was adapted to goes
        meta["scale"] = {k: v for k, v in meta["scale"].items() if k != "site_scale"}
    site_scale = new_site_scale(meta, new_site, scale, str(run))
    if site_scale is not None:  # the site's images as predict will show them: at the training scale, not squeezed
        trained = meta.get("scale") or {}
        new_site = [replace(sample, zoom=float(trained.get("input_per_native", 1.0)) / site_scale)
                    for sample in new_site]
        meta["scale"] = {**trained, "site_scale": site_scale}
        adapted["site_scale"] = site_scale
    if stain:
        seen = read_image_list(run) or {}
        train = [Sample(p) for p, split in seen.items() if split == "train"]
        if not train:
            raise DataError(f"adapt --stain: {run} lists no training images (training_images.csv) to take the "
                            "stain target from")
        sample = max(16, min(STAIN_SAMPLE, STAIN_SAMPLE_PIXELS // (size * size)))
        picked = filter_readable([train[i] for i in spread_indices(len(train), sample)], None, 0.5)
        normalizer = StainNormalizer("macenko").fit(ImageDataset(picked, image_size=size).stacked())
        site = [new_site[i] for i in spread_indices(len(new_site), sample)]
        normalizer.fit_source(ImageDataset(site, image_size=size).stacked())
        meta["stain_normalization"] = normalizer.state_dict()
        adapted["stain"] = (f"macenko, target fitted on {len(picked)} training images, the site's stain on "
                            f"{len(site)} of its images")
        transform = normalizer
    if ssl_steps:
        continue_pretraining(model, meta, new_site, out / "continued_pretraining", ssl_steps)
        adapted["continued_pretraining"] = {"steps": ssl_steps, **refit_head(model, meta, run, batch_size)}
    if bn:
        passes = 2 if _training_augment(run) is not None else 1
        trained_on = training_samples(run, len(new_site))
        if trained_on:
            adapted["batchnorm_layers"] = transfer_batchnorm(model, trained_on, new_site, size, batch_size, transform,
                                                             lambda: _training_augment(run), passes)
            adapted["batchnorm"] = f"moved by the new site's difference from {len(trained_on)} training images"
        else:
            print(f"adapt: {run}'s training images cannot be read; BatchNorm statistics are replaced by the new "
                  "site's (plain AdaBN, which can move the operating point)", file=sys.stderr)
            adapted["batchnorm_layers"] = reestimate_batchnorm(model, new_site, size, batch_size, transform,
                                                               _training_augment(run), passes)
            adapted["batchnorm"] = "replaced by the new site's"
        if not adapted["batchnorm_layers"]:
            adapted["batchnorm_layers"] = "none (the backbone has no BatchNorm)"
    keep = {k: v for k, v in meta.items() if k not in ("format", "backbone", "backbone_kwargs", "embed_dim",
                                                       "num_classes", "mean", "std")}
    adapted["called_positive"] = called_positive(run, model, meta, new_site, site_scale)
    before, after = adapted["called_positive"]["before"], adapted["called_positive"]["after"]
    if abs(after - before) > CALLED_POSITIVE_MOVE:
        print(f"adapt: warning: {after:.0%} of the new site's fields are called {meta['positive_class']} after "
              f"adapting, {before:.0%} before. The operating point was chosen on the training site's validation "
              "images; check the adapted run on a few labelled fields of the new site before relying on it",
              file=sys.stderr)
    save_classifier(model, out, {**keep, "adapted_from": str(run.resolve()), "adaptation": adapted})
    for name in ("config.yaml", "training_images.csv", "metrics.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    return out


def training_samples(run: Path, count: int) -> list[Sample]:
    """Up to ``count`` of the run's training images as it saw them (its config's split, each at its scale),
    spread over the split; none when they cannot be found."""
    from .train import run_splits

    resolved = run_splits(run)
    train = resolved[1]["train"] if resolved else []
    return [train[i] for i in spread_indices(len(train), count)]


def called_positive(run: Path, model: Classifier, meta: dict[str, Any], new_site: list[Sample],
                    site_scale: float | None, max_fields: int = 200) -> dict[str, float]:
    """The share of (up to ``max_fields`` of) the new site's fields called positive by the run as it was and as
    adapted, both at the site's scale: the one check of an adaptation that needs no label. On held-out synthetic
    sites, BatchNorm adaptation cut it from 37% to 9% (truth 51%) and balanced accuracy from 0.86 to 0.59."""
    from .predict import classifier_predictor, load_predictor, predict_paths

    paths = [Path(new_site[i].path) for i in spread_indices(len(new_site), max_fields)]
    shares = {}
    for when, predictor in (("before", load_predictor(ckpt=str(run))),
                            ("after", classifier_predictor(model, meta, "adapted"))):
        probs, _ = predict_paths(predictor, paths, progress=False, scale=site_scale)
        calls = [predictor.call(p) for p in probs.values()]
        shares[when] = calls.count(predictor.positive_class) / max(1, len(calls))
    return {**shares, "fields": len(paths)}


def new_site_scale(meta: dict[str, Any], new_site: list[Sample], scale: str | float | None, source: str
                   ) -> float | None:
    """The new site's relative scale (``--scale``), or None when it is the training scale: ``"auto"``
    estimates one value for the site (``roseprior.scale.shared_scale``, which takes a site read within
    ``SAME_SCALE`` at the training scale)."""
    from roseprior.imageio import read_image
    from roseprior.scale import shared_scale

    if scale is None or scale == 1.0:
        return None
    if scale in ("auto", "site"):  # one value for the site either way
        from .train import current_training_scale

        meta["scale"] = current_training_scale(Path(source), meta.get("scale"))
        if "reference" not in (meta.get("scale") or {}):
            print(f"adapt: {source} records no training scale, so the new site is taken at it; give --scale VALUE "
                  "if its magnification differs", file=sys.stderr)
            return None
        with Progress(len(new_site), "adapt: scale", unit="img") as progress:
            def fields() -> Any:
                for sample in new_site:
                    yield read_image(sample.path)
                    progress.update()

            scale, measured = shared_scale(fields(), meta["scale"], source)
        print(f"adapt: the new site's objects appear {scale:.2f}x as large as in the training images "
              f"(from the nuclei of {measured} of its images; 1.00: taken at the training scale)", file=sys.stderr)
        return None if scale == 1.0 else float(scale)
    return float(scale)


def continue_pretraining(model: Classifier, meta: dict[str, Any], images: list[Sample], out: Path, steps: int) -> None:
    """The classifier's backbone after ``steps`` of the SimCLR CPU recipe on ``images`` (in place)."""
    import backbones
    from pretrain.config import PretrainConfig
    from pretrain.loop import run as pretrain
    from roseprior.checkpoint import atomic_write_csv
    from roseprior.config import load_config

    backbones.save(model.backbone, out / "init")
    manifest = atomic_write_csv(out / "new_site_images.csv", ["path"], ([s.path] for s in images))
    cfg = load_config(PretrainConfig, RECIPE, [
        f"data.root={manifest}", f"out_dir={out / 'run'}", f"model.name={meta['backbone']}",
        f"model.init={out / 'init'}", f"train.max_steps={steps}", "train.lr=2.0e-4", f"train.batch_size={min(256, len(images))}",
        "train.warmup_epochs=0", f"views.global_size={meta['image_size']}", "views.scale_mode=area", "monitor.progress=false",
        f"views.mean={list(model.mean.flatten().tolist())}", f"views.std={list(model.std.flatten().tolist())}"])
    cfg.model.kwargs = dict(meta.get("backbone_kwargs") or {})
    pretrain(cfg)
    model.backbone.load_state_dict(backbones.load(out / "run").state_dict())


def refit_head(model: Classifier, meta: dict[str, Any], run: Path, batch_size: int) -> dict[str, Any]:
    """Refit the linear head on the run's training features (BatchNorm statistics of the training images
    first), then temperature and operating point on its validation split; returns what was fitted."""
    from roseprior.calibration import apply_temperature, fit_temperature, operating_point
    from roseprior.config import load_config
    from roseprior.features import extract_features
    from roseprior.imageops import dihedral_views
    from roseprior.probes import ProbeProtocol, fit_linear

    from .config import FinetuneConfig
    from .train import load_splits

    splits = load_splits(load_config(FinetuneConfig, run / "config.yaml")).splits
    size = int(meta["image_size"])
    reestimate_batchnorm(model, splits["train"], size, batch_size, augment=_training_augment(run), passes=2)
    stats = (model.mean.flatten().tolist(), model.std.flatten().tolist())
    # Training fields are read as trained (one view); validation as the run will call them, so temperature and
    # threshold are chosen on that reading: with the head linear, the mean of the views' features gives the
    # mean of their logits.
    feats = {"train": extract_features(model.backbone, splits["train"], size, batch_size=batch_size, stats=stats),
             "val": extract_features(model.backbone, splits["val"], size, batch_size=batch_size, stats=stats,
                                     views=dihedral_views if model.dihedral_mean else None)}
    labels = {k: np.array([s.label for s in splits[k]]) for k in ("train", "val")}
    probe = fit_linear(feats["train"], labels["train"], feats["val"], labels["val"], ProbeProtocol().linear_c)
    scaler, linear = probe.model[0], probe.model[-1]
    weight = linear.coef_ / scaler.scale_  # the standardisation folded into the weights
    bias = linear.intercept_ - weight @ scaler.mean_
    if len(weight) == 1:  # binary: sklearn's one logit is P's minus N's
        weight, bias = np.concatenate([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    model.head.weight.data, model.head.bias.data = torch.from_numpy(weight).float(), torch.from_numpy(bias).float()
    logits = feats["val"] @ weight.T + bias
    meta["temperature"] = fit_temperature(logits, labels["val"])
    positive = list(meta["classes"]).index(meta.get("positive_class", meta["classes"][-1]))
    target = meta["decision"]["target_sensitivity"]
    point = operating_point(labels["val"] == positive, apply_temperature(logits, meta["temperature"])[:, positive],
                            target)
    meta["decision"] = {"threshold": point["threshold"], "target_sensitivity": target}
    return {"head_c": probe.c, "temperature": meta["temperature"], "val_balanced_accuracy": probe.val_scores[probe.c]}


def _training_augment(run: Path) -> Any:
    """The run's training augmentation (from its config.yaml), seeded, or None when it has none."""
    from roseprior.config import load_config

    from .augment import TrainAugment
    from .config import FinetuneConfig

    if not (run / "config.yaml").is_file():
        return None
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    return TrainAugment(cfg.augment, seed=cfg.seed)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adapt", help="adapt a finetune run to a new site without labels",
                                   description=__doc__.split("\n\n")[0])
    _arguments(parser)
    parser.set_defaults(func=_run)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a finetune out_dir")
    parser.add_argument("--images", required=True,
                        help="the new site's images: a folder (searched recursively; labels unused) or a manifest CSV")
    parser.add_argument("--out", required=True, help="the new run folder to write")
    parser.add_argument("--no-bn", dest="bn", action="store_false", help="keep the BatchNorm statistics as trained")
    parser.add_argument("--stain", action="store_true", help="normalise inputs to the training set's stain")
    parser.add_argument("--max-images", type=int, default=2000, help="new-site images used (default 2000)")
    parser.add_argument("--scale", default="auto", type=parse_scale,
                        help="auto (the default; site is the same): estimate the new site's magnification from its "
                             "nuclei, one value for the site; VALUE: its objects appear VALUE times as large as in the training "
                             "images; none: take it at the training scale. A scale other than the training one is "
                             "recorded in OUT, and finetune.predict brings the site's fields to the training scale")
    parser.add_argument("--ssl-steps", type=int, default=0,
                        help="continue self-supervised pretraining on the new site for N steps, then refit the head")


def _run(args: argparse.Namespace) -> int:
    path = adapt(args.run, args.images, args.out, args.bn, args.stain, args.max_images, ssl_steps=args.ssl_steps,
                 scale=None if args.scale == "none" else args.scale)
    info = json.loads((path / "best.json").read_text())["adaptation"]
    print(f"adapt: wrote {path} ({', '.join(f'{k}: {v}' for k, v in info.items() if k != 'images')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.adapt", description=__doc__.split("\n\n")[0])
    _arguments(parser)
    return command_main("finetune.adapt", lambda: _run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
