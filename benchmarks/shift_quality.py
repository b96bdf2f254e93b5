"""Do fine-tuned classifiers hold up under stain and scale shift, and do scale handling and adaptation help?

For each finetune run given, its own test split (the shared split of its config) is shifted, test
images only, and scored with ``finetune.predict``'s machinery, balanced accuracy at the classifier's own
decision:

- stain: HED jitter 0.1 and 0.2, a white-balance and brightness change, Macenko re-staining to a
  target that is not in the test split (the run's own training images, darkest and lightest), image by image
  (``macenko_to_``: each image's own stain measured and set to the target's, which on a crop of one cell also
  sets its nucleus to the target's darkness) and as one site (``macenko_site_to_``: the test split's stain
  measured once and every image mapped alike, as another laboratory's stain would move them all);
  each also after ``roseprior adapt`` on the shifted images (BatchNorm statistics re-estimated), and
  after ``roseprior adapt --stain`` (the shifted site's stain also mapped to the training set's by one Macenko map), each
  adapted run scored as predict scores it (at the site scale adapt recorded, when it read one);
- scale: zoom 0.25x, 0.5x, 2x, 4x in two ways, each predicted as trained (``--scale none``), at the
  known scale, and with the scale estimated from the nuclei (``--scale auto``, one estimate per site of the
  test split, as predict reads a folder per site):
  ``scale/``: at a fixed image size (a weaker or stronger objective on the same camera: the frame keeps
  its pixels, so zooming in loses the border and zooming out fills it with reflected content);
  ``resampled/``: the same objects at another magnification with the frame following them (a cell
  cropped around at that magnification, or a field photographed whole): every side times the factor.
  Nothing leaves or enters the frame, so the loss left is the scale's own (the detail a weaker
  objective never resolved). With ``--recalibrate``, ``estimated_scale`` also comes as if the run's images
  had been framed the other way (``data.framing``: camera fields or crops cut around one cell);
- frame: the same fields photographed through an eyepiece (``frame/eyepiece``: a round lit field, the corners
  black), as trained and with the scale estimated from the nuclei;
- folders of one case each (``--shifts cases``, not part of ``all``): the test split, unshifted, laid out as
  folders of ``CASE_SIZES`` fields of one class within a site, and predicted at the run's operating point with
  ``--scale auto`` (one estimate per folder, which reads a positive case's enlarged nuclei as magnification)
  and with ``--scale site`` (one per site).

    python benchmarks/shift_quality.py --runs runs/bench/finetune_quality/pretrained_off runs/bench/finetune_quality/random_off
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ZOOMS = (0.25, 0.5, 2.0, 4.0)
CASE_SIZES = (4, 8)  # fields per folder of one case


def test_images(run: Path, limit: int | None) -> tuple[list[np.ndarray], np.ndarray, list[Any], str, list[Any]]:
    """The run's test split (decoded) and its labels, its training samples, how its images were framed, and each
    test image's site (``domain``; None where the split names none)."""
    from finetune.config import FinetuneConfig
    from roseprior.config import load_config
    from roseprior.imageio import read_image
    from roseprior.splits import resolve_splits

    cfg = load_config(FinetuneConfig, run / "config.yaml")
    split = resolve_splits(cfg.data).readable(None, 1.0).splits
    test = split["test"][:: max(1, len(split["test"]) // limit)] if limit else split["test"]
    positive = cfg.data.classes.index(cfg.data.positive_class)
    return ([read_image(s.path) for s in test], np.array([int(s.label == positive) for s in test]), split["train"],
            cfg.data.framing, [s.domain for s in test])


def stain_shifts(images: list[np.ndarray], train_paths: list[str]) -> dict[str, list[np.ndarray]]:
    from roseprior import imageops
    from roseprior.imageio import read_image

    def batch_op(op: Any) -> list[np.ndarray]:
        out = []
        for i, img in enumerate(images):
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
            y = op(x, torch.Generator().manual_seed(i))
            out.append((y[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        return out

    train = [read_image(s.path) for s in train_paths[:: max(1, len(train_paths) // 64)][:64]]
    darkness = [float(t.mean()) for t in train]
    shifts = {
        "stain/none": images,  # what each remedy costs where nothing moved
        "stain/hed_0.1": batch_op(lambda x, g: imageops.hed_jitter(x, 0.1, generator=g)),
        "stain/hed_0.2": batch_op(lambda x, g: imageops.hed_jitter(x, 0.2, generator=g)),
        "stain/wb_brightness": batch_op(lambda x, g: imageops.brightness_shift(
            imageops.white_balance_shift(x, [1.15, 1.0, 0.85]), -0.1)),
    }
    alike = [img for img in images if img.shape == images[0].shape]
    site = torch.from_numpy(np.stack([alike[i] for i in np.linspace(0, len(alike) - 1, min(64, len(alike))).astype(int)])
                            ).permute(0, 3, 1, 2)
    try:
        site_stain = imageops.StainNormalizer("macenko").fit(site)  # the test split's stain, measured once
    except Exception:  # noqa: BLE001 - no Macenko shift then, as for a target it cannot use
        site_stain = None
    for name, pick in (("darkest", int(np.argmin(darkness))), ("lightest", int(np.argmax(darkness)))):
        target = torch.from_numpy(train[pick]).permute(2, 0, 1)[None]
        try:
            normalizer = imageops.StainNormalizer("macenko").fit(target)
        except Exception:  # noqa: BLE001 - a target Macenko cannot use is skipped, not fatal
            continue
        if site_stain is None:
            continue
        site_wide = normalizer.mapping(site_stain)
        shifts[f"stain/macenko_to_{name}_train_image"] = batch_op(lambda x, g, n=normalizer: n(x))
        shifts[f"stain/macenko_site_to_{name}_train_image"] = batch_op(lambda x, g, n=site_wide: n(x))
    return shifts


def zoomed(images: list[np.ndarray], factor: float) -> list[np.ndarray]:
    from roseprior import imageops

    out = []
    for img in images:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        out.append((imageops.zoom(x, factor)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


def resampled(images: list[np.ndarray], factor: float) -> list[np.ndarray]:
    from roseprior.scale import resample

    return [resample(img, factor) for img in images]


def through_the_eyepiece(image: np.ndarray, radius: float = 0.5, edge_px: float = 10.0) -> np.ndarray:
    """``image`` as a camera photographs it through an eyepiece: a round lit field of ``radius`` (of the shorter
    side; 0.5 leaves the corners, 21% of the frame, unlit) whose edge fades to black over ``edge_px``."""
    h, w = image.shape[:2]
    rows, cols = np.mgrid[:h, :w]
    lit = np.clip((radius * min(h, w) - np.hypot(rows - h / 2, cols - w / 2)) / edge_px, 0, 1)
    return (image * lit[..., None]).round().astype(np.uint8)


def group_scales(predictor: Any, images: list[np.ndarray], groups: list[np.ndarray]) -> np.ndarray:
    """Each image's scale when every group of indices is one folder: one ``--scale auto`` estimate per group."""
    from roseprior.scale import shared_scale

    scales = np.ones(len(images))
    for group in groups:
        scales[group] = shared_scale([images[i] for i in group], predictor.scale, predictor.source)[0]
    return scales


def site_groups(sites: list[Any]) -> list[np.ndarray]:
    """The indices of each site's images (one group for all when no image names a site)."""
    site_of = np.array([str(s) for s in sites])
    return [np.flatnonzero(site_of == s) for s in sorted(set(site_of))]


def balanced_accuracy(predictor: Any, images: list[np.ndarray], y: np.ndarray, scale: str | float | None,
                      sites: list[Any] | None = None) -> float:
    """At ``scale`` (None: squeezed whole; ``"auto"``: one estimate per site of ``sites``, as predict reads a
    folder per site, or one for all)."""
    import torchvision.transforms.v2.functional as TF
    from sklearn.metrics import balanced_accuracy_score

    from finetune.predict import field_probabilities

    positive = predictor.classes.index(predictor.positive_class)
    if scale == "auto":  # a folder of fields per site: one scale each, as finetune.predict estimates it
        scale = group_scales(predictor, images, site_groups(sites or [None] * len(images))).tolist()
    calls = []
    for index, img in enumerate(images):
        taken = scale[index] if isinstance(scale, list) else scale
        if taken is None:  # as trained: the whole field resized to the model's input (finetune.predict's default)
            side = predictor.image_size
            x = TF.resize(torch.from_numpy(img).permute(2, 0, 1), [side, side], antialias=True)
            p = predictor.probabilities(x[None].float().div_(255.0))[0]
        else:
            p, _ = field_probabilities(predictor, img, taken)
        calls.append(int(p.argmax() == positive))
    return float(balanced_accuracy_score(y, calls))


def case_folders(predictor: Any, images: list[np.ndarray], y: np.ndarray, sites: list[Any]) -> dict[str, Any]:
    """The test split as folders of one case each (``CASE_SIZES`` fields of one class within a site), scored at the
    run's operating point as ``finetune.predict`` writes its calls: ``--scale auto`` (one estimate per folder)
    against ``--scale site`` (one per site). Balanced accuracy, sensitivity, specificity and the scales read."""
    from sklearn.metrics import recall_score

    from finetune.predict import field_probabilities

    def scored(scales: np.ndarray) -> dict[str, Any]:
        calls = np.array([int(predictor.call(field_probabilities(predictor, img, s)[0]) == predictor.positive_class)
                          for img, s in zip(images, scales, strict=True)])
        sensitivity, specificity = recall_score(y, calls), recall_score(1 - y, 1 - calls)
        return {"balanced_accuracy": (sensitivity + specificity) / 2, "sensitivity": sensitivity,
                "specificity": specificity, "scales_read": {label: sorted({round(float(v), 2) for v in scales[y == c]})
                                                            for c, label in enumerate(("negative", "positive"))}}

    by_site = site_groups(sites)
    result = {"site": scored(group_scales(predictor, images, by_site))}
    for size in CASE_SIZES:
        cases = [members[start : start + size] for group in by_site for label in (0, 1)
                 for members in [group[y[group] == label]] for start in range(0, len(members), size)]
        result[f"auto_cases_of_{size}"] = scored(group_scales(predictor, images, cases))
    return result


def adapted_predictor(run: Path, images: list[np.ndarray], tmp: Path, stain: bool = False) -> Any:
    """The run adapted on the shifted, unlabelled test images themselves: BatchNorm statistics, and with
    ``stain`` every field mapped to the training set's stain first (``roseprior adapt --stain``)."""
    from PIL import Image

    from finetune.adapt import adapt
    from finetune.predict import load_predictor

    folder = Path(tempfile.mkdtemp(dir=tmp))
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return load_predictor(ckpt=str(adapt(run, folder, Path(tempfile.mkdtemp(dir=tmp)) / "adapted", stain=stain)))


def measure_run(run: Path, limit: int | None, tmp: Path, recalibrate: bool = False, shifts: str = "all"
                ) -> dict[str, Any]:
    from finetune.predict import load_predictor
    from finetune.train import current_training_scale
    from roseprior.scale import FRAMINGS, fields_scale, training_scale

    start = time.perf_counter()
    images, y, train_paths, framing, sites = test_images(run, limit)
    predictor = load_predictor(ckpt=str(run))
    # A run from before finetune recorded its training scale has none; --recalibrate rebuilds it with today's code,
    # and also as if the run's images had been framed the other way (data.framing), to show what that choice does.
    if predictor.scale is None or recalibrate:
        predictor.scale = training_scale(train_paths, predictor.image_size, framing=framing)
    else:  # as finetune.predict reads it: one of an older measure is rebuilt
        predictor.scale = current_training_scale(run, predictor.scale)
    framed_otherwise = {other: dataclasses.replace(predictor, scale=training_scale(
        train_paths, predictor.image_size, framing=other)) for other in FRAMINGS if recalibrate and other != framing}
    result: dict[str, Any] = {"run": str(run), "test_images": len(images), "clean": balanced_accuracy(
        predictor, images, y, None)}
    for name, shifted in (stain_shifts(images, train_paths) if shifts in ("all", "stain") else {}).items():
        adapted = {key: adapted_predictor(run, shifted, tmp, stain=key == "adapted_stain")
                   for key in ("adapted", "adapted_stain")}
        result[name] = {"as_trained": balanced_accuracy(predictor, shifted, y, None), **{
            # as finetune.predict scores an adapted run by default: at the site scale adapt recorded, if any
            key: balanced_accuracy(run_adapted, shifted, y, fields_scale(run_adapted.scale, None, None, ""))
            for key, run_adapted in adapted.items()}}
    trained_scale = (predictor.scale or {}).get("input_per_native", 1.0)
    for (kind, zoom), factor in itertools.product((("scale", zoomed), ("resampled", resampled)),
                                                  ZOOMS if shifts in ("all", "scale") else ()):
        shifted = zoom(images, factor)
        result[f"{kind}/{factor:g}"] = {"as_trained": balanced_accuracy(predictor, shifted, y, None),
                                       "known_scale": balanced_accuracy(predictor, shifted, y, factor),
                                       "estimated_scale": balanced_accuracy(predictor, shifted, y, "auto", sites)}
        for other, framed in framed_otherwise.items():
            result[f"{kind}/{factor:g}"][f"estimated_scale_as_{other}"] = balanced_accuracy(framed, shifted, y, "auto",
                                                                                            sites)
    if shifts in ("all", "scale", "frame"):  # the same fields photographed through an eyepiece: black corners
        shifted = [through_the_eyepiece(img) for img in images]
        result["frame/eyepiece"] = {"as_trained": balanced_accuracy(predictor, shifted, y, None),
                                    "estimated_scale": balanced_accuracy(predictor, shifted, y, "auto", sites)}
    if shifts == "cases":
        result["case_folders"] = case_folders(predictor, images, y, sites)
    result["trained_input_per_native"] = trained_scale
    result["framing"] = (predictor.scale or {}).get("reference", {}).get("framing", "field")
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="finetune out_dirs")
    parser.add_argument("--max-images", type=int, default=None, help="score about this many test images per run")
    parser.add_argument("--out", default=None, help="JSON to write")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shifts", choices=("all", "stain", "scale", "frame", "cases"), default="all",
                        help="measure only the stain shifts (and adaptation), only the zooms (and the eyepiece's "
                             "round field), only the eyepiece's, or only folders of one case each (--scale auto per "
                             "folder against --scale site)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="rebuild each run's scale reference with today's roseprior.scale (a run keeps the one "
                             "its finetune stored)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="shift_quality_") as tmp:
        for run in args.runs:
            results.append(measure_run(Path(run), args.max_images, Path(tmp), args.recalibrate, args.shifts))
    for r in results:
        print(f"\n{r['run']} ({r['test_images']} test images): clean {r['clean']:.3f}")
        for key, value in {**r, **{f"cases/{k}": v for k, v in r.get("case_folders", {}).items()}}.items():
            if isinstance(value, dict) and key != "case_folders":
                print(f"  {key:<38} " + "  ".join(f"{k} {v:.3f}" for k, v in value.items() if isinstance(v, float)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
