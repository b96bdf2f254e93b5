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
AIM = 0.05  # issue 12: the worst shift within this of clean
PAGE_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
              "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{text-align:left}"
              ".ci{color:#777}.d{color:#345;font-size:12px}.warning{color:#a40}img{max-width:100%}")
# The reading the platform recommends for each kind of shift (the worst shift is judged on it): BatchNorm
# adaptation for a new stain, the scale estimated from the nuclei for a new magnification or frame.
REMEDY = {"stain": "adapted", "scale": "estimated_scale", "resampled": "estimated_scale", "frame": "estimated_scale"}


def test_images(run: Path, limit: int | None) -> tuple[list[np.ndarray], np.ndarray, list[Any], str, list[Any]]:
    """The run's test split (decoded) and its labels, its training samples, how its images were framed, and each
    test image's sample (its site is its ``domain``, None where the split names none; its ``group`` the field or
    slide the bootstrap resamples whole)."""
    from finetune.config import FinetuneConfig
    from roseprior.config import load_config
    from roseprior.imageio import read_image
    from roseprior.splits import resolve_splits

    cfg = load_config(FinetuneConfig, run / "config.yaml")
    split = resolve_splits(cfg.data).readable(None, 1.0).splits
    test = split["test"][:: max(1, len(split["test"]) // limit)] if limit else split["test"]
    positive = cfg.data.classes.index(cfg.data.positive_class)
    return ([read_image(s.path) for s in test], np.array([int(s.label == positive) for s in test]), split["train"],
            cfg.data.framing, test)


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


def positive_calls(predictor: Any, images: list[np.ndarray], scale: str | float | None,
                   sites: list[Any] | None = None) -> np.ndarray:
    """Each image called positive (1) or not at the classifier's own decision (the larger probability), at
    ``scale`` (None: squeezed whole; ``"auto"``: one estimate per site of ``sites``, as predict reads a folder per
    site, or one for all)."""
    from finetune.predict import field_probabilities, squeezed

    positive = predictor.classes.index(predictor.positive_class)
    if scale == "auto":  # a folder of fields per site: one scale each, as finetune.predict estimates it
        scale = group_scales(predictor, images, site_groups(sites or [None] * len(images))).tolist()
    calls = []
    for index, img in enumerate(images):
        taken = scale[index] if isinstance(scale, list) else scale
        if taken is None:  # as trained: the whole field resized to the model's input (finetune.predict's default)
            p = predictor.probabilities(squeezed(img, predictor.image_size)[None].float().div_(255.0))[0]
        else:
            p, _ = field_probabilities(predictor, img, taken)
        calls.append(int(p.argmax() == positive))
    return np.array(calls)


def with_uncertainty(y: np.ndarray, clean: np.ndarray, calls: dict[str, dict[str, np.ndarray]], groups: list[Any]
                     ) -> dict[str, Any]:
    """What reading the table needs: each reading's 95% interval, its difference from clean with the paired
    interval of that difference (the same test images both ways, whole ``groups`` resampled), the small-class
    warnings, and the worst shift: the one where the platform's own remedy (``REMEDY``) falls furthest below
    clean."""
    from roseprior.metrics import bootstrap_intervals, paired_difference, small_class_warnings

    def interval(c: np.ndarray) -> list[float] | None:
        return bootstrap_intervals(y, c, groups)["balanced_accuracy"]

    def reading(c: np.ndarray) -> dict[str, Any]:
        drop = paired_difference(y, c, clean, groups)
        return {"ci95": interval(c), "minus_clean": drop["difference"], "minus_clean_ci95": drop["ci95"]}

    readings = {shift: {name: reading(c) for name, c in by_reading.items()} for shift, by_reading in calls.items()}
    remedied = {shift: (REMEDY[shift.split("/")[0]], by_reading[REMEDY[shift.split("/")[0]]])
                for shift, by_reading in readings.items() if shift != "stain/none"}
    worst = min(remedied, key=lambda shift: remedied[shift][1]["minus_clean"], default=None)
    return {"clean_ci95": interval(clean), "readings": readings,
            "worst_shift": None if worst is None else {"shift": worst, "reading": remedied[worst][0],
                                                       **remedied[worst][1]},
            "warnings": small_class_warnings("the test split", y, ["negative", "positive"])}


def interval_text(interval: list[float] | None, signed: bool = False) -> str:
    """``[low, high]`` of an interval (``n/a`` when no resample could define it)."""
    spec = "+.3f" if signed else ".3f"
    return f"[{interval[0]:{spec}}, {interval[1]:{spec}}]" if interval else "[n/a]"


def drop_text(reading: dict[str, Any]) -> str:
    """A reading's difference from clean with its paired interval: ``-0.082 [-0.121, -0.043]``."""
    return f"{reading['minus_clean']:+.3f} {interval_text(reading['minus_clean_ci95'], signed=True)}"


def drops_figure(results: list[dict[str, Any]]) -> Any:
    """One panel per run: every shift as trained and with its remedy, as balanced accuracy minus clean with the
    paired 95% interval, beside the aim of staying within ``AIM`` of clean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(dict.fromkeys(shift for r in results for shift in r["uncertainty"]["readings"]))  # measured order
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results) + 1.6, 0.32 * len(shifts) + 1.4),
                             sharex=True, sharey=True, squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        readings = result["uncertainty"]["readings"]
        for offset, (label, colour, pick) in enumerate((("as trained", "0.6", lambda s: "as_trained"),
                                                        ("with its remedy (adapt; --scale auto)", "tab:blue",
                                                         lambda s: REMEDY[s.split("/")[0]]))):
            rows = [(i, readings[s][pick(s)]) for i, s in enumerate(shifts) if pick(s) in readings.get(s, {})]
            if not rows:
                continue
            y = np.array([i for i, _ in rows]) + (0.15 if offset else -0.15)
            x = np.array([r["minus_clean"] for _, r in rows])
            ci = np.array([r["minus_clean_ci95"] or [r["minus_clean"]] * 2 for _, r in rows])
            below, above = np.maximum(x - ci[:, 0], 0), np.maximum(ci[:, 1] - x, 0)  # a percentile interval may miss x
            ax.errorbar(x, y, xerr=[below, above], fmt="o", ms=4, color=colour, label=label, capsize=2)
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(-AIM, color="tab:red", lw=0.8, ls="--", label=f"aim: within {AIM} of clean")
        ax.set_title(f"{Path(result['run']).name} (clean {result['clean']:.3f}, {result['test_images']} images)",
                     fontsize=9)
        ax.set_xlabel("balanced accuracy minus clean")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(shifts)), shifts, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


def write_page(results: list[dict[str, Any]], json_path: Path) -> tuple[Path, Path]:
    """``json_path`` as people read it: the figure beside it (``.png``) and a page (``.html``) with the figure and,
    per run, every reading with its interval and its paired difference from clean."""
    import base64
    import html

    from eval_probes.report import figure_html, figure_png
    from roseprior.checkpoint import atomic_write, atomic_write_text

    encoded = figure_png(drops_figure(results))  # rendered once: the page's figure and the .png are the same bytes
    png = atomic_write(json_path.with_suffix(".png"), lambda path: path.write_bytes(base64.b64decode(encoded)))
    figure = figure_html(encoded, "Each shift's balanced accuracy minus clean, as trained and with the "
                         "platform's remedy (BatchNorm adaptation for stain, the scale read from the nuclei for zoom "
                         "and frame), with paired 95% bootstrap intervals; dashed: the aim.")

    def cell(reading: dict[str, Any], value: float) -> str:
        return (f"<td>{value:.3f} <span class='ci'>{interval_text(reading['ci95'])}</span><br>"
                f"<span class='d'>{drop_text(reading)}</span></td>")

    sections = []
    for r in results:
        unc = r["uncertainty"]
        names = sorted({name for by in unc["readings"].values() for name in by}, key=lambda n: (n != "as_trained", n))
        rows = "".join(f"<tr><th>{html.escape(shift)}</th>" + "".join(
            cell(by[name], r[shift][name]) if name in by else "<td></td>" for name in names) + "</tr>"
            for shift, by in unc["readings"].items())
        worst = unc["worst_shift"]
        summary = (f"clean {r['clean']:.3f} {interval_text(unc['clean_ci95'])} on {r['test_images']} test images"
                   + (f"; worst shift with its remedy: {worst['shift']} ({worst['reading']}), {drop_text(worst)} "
                      f"against clean (aim: within {AIM})" if worst else ""))
        warnings = "".join(f"<p class='warning'>warning: {html.escape(w)}</p>" for w in unc["warnings"])
        sections.append(f"<h2>{html.escape(r['run'])}</h2><p>{html.escape(summary)}</p>{warnings}"
                        f"<table><thead><tr><th>shift</th>{''.join(f'<th>{html.escape(n)}</th>' for n in names)}"
                        f"</tr></thead><tbody>{rows}</tbody></table>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>shift quality</title><style>{PAGE_STYLE}"
            f"</style></head><body><h1>Balanced accuracy under shift</h1><p>Each cell: balanced accuracy with its 95% "
            f"bootstrap interval; below it, the difference from clean with its paired interval.</p>{figure}"
            f"{''.join(sections)}</body></html>")
    return atomic_write_text(json_path.with_suffix(".html"), page), png


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
    from sklearn.metrics import balanced_accuracy_score

    from finetune.predict import load_predictor
    from finetune.train import current_training_scale
    from roseprior.scale import FRAMINGS, fields_scale, training_scale

    start = time.perf_counter()
    images, y, train_paths, framing, samples = test_images(run, limit)
    predictor = load_predictor(ckpt=str(run))
    # A run from before finetune recorded its training scale has none; --recalibrate rebuilds it with today's code,
    # and also as if the run's images had been framed the other way (data.framing), to show what that choice does.
    if predictor.scale is None or recalibrate:
        predictor.scale = training_scale(train_paths, predictor.image_size, framing=framing)
    else:  # as finetune.predict reads it: one of an older measure is rebuilt
        predictor.scale = current_training_scale(run, predictor.scale)
    framed_otherwise = {other: dataclasses.replace(predictor, scale=training_scale(
        train_paths, predictor.image_size, framing=other)) for other in FRAMINGS if recalibrate and other != framing}
    sites = [sample.domain for sample in samples]
    clean = positive_calls(predictor, images, None)
    calls: dict[str, dict[str, np.ndarray]] = {}
    for name, shifted in (stain_shifts(images, train_paths) if shifts in ("all", "stain") else {}).items():
        adapted = {key: adapted_predictor(run, shifted, tmp, stain=key == "adapted_stain")
                   for key in ("adapted", "adapted_stain")}
        calls[name] = {"as_trained": positive_calls(predictor, shifted, None), **{
            # as finetune.predict scores an adapted run by default: at the site scale adapt recorded, if any
            key: positive_calls(run_adapted, shifted, fields_scale(run_adapted.scale, None, None, ""))
            for key, run_adapted in adapted.items()}}
    trained_scale = (predictor.scale or {}).get("input_per_native", 1.0)
    for (kind, zoom), factor in itertools.product((("scale", zoomed), ("resampled", resampled)),
                                                  ZOOMS if shifts in ("all", "scale") else ()):
        shifted = zoom(images, factor)
        calls[f"{kind}/{factor:g}"] = {"as_trained": positive_calls(predictor, shifted, None),
                                       "known_scale": positive_calls(predictor, shifted, factor),
                                       "estimated_scale": positive_calls(predictor, shifted, "auto", sites)}
        for other, framed in framed_otherwise.items():
            calls[f"{kind}/{factor:g}"][f"estimated_scale_as_{other}"] = positive_calls(framed, shifted, "auto", sites)
    if shifts in ("all", "scale", "frame"):  # the same fields photographed through an eyepiece: black corners
        shifted = [through_the_eyepiece(img) for img in images]
        calls["frame/eyepiece"] = {"as_trained": positive_calls(predictor, shifted, None),
                                   "estimated_scale": positive_calls(predictor, shifted, "auto", sites)}
    result: dict[str, Any] = {"run": str(run), "test_images": len(images), "clean": float(balanced_accuracy_score(
        y, clean)), **{shift: {reading: float(balanced_accuracy_score(y, c)) for reading, c in by_reading.items()}
                       for shift, by_reading in calls.items()}}
    result["uncertainty"] = with_uncertainty(y, clean, calls, [s.group or s.path for s in samples])
    if shifts == "cases":
        result["case_folders"] = case_folders(predictor, images, y, sites)
    result["trained_input_per_native"] = trained_scale
    result["framing"] = (predictor.scale or {}).get("reference", {}).get("framing", "field")
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def print_run(r: dict[str, Any]) -> None:
    """One run's readings, each with its difference from clean and the paired interval, and its worst shift."""
    unc = r["uncertainty"]
    print(f"\n{r['run']} ({r['test_images']} test images): clean {r['clean']:.3f} {interval_text(unc['clean_ci95'])};"
          " each reading (minus clean [paired 95% interval])")
    for key, value in {**r, **{f"cases/{k}": v for k, v in r.get("case_folders", {}).items()}}.items():
        if isinstance(value, dict) and key not in ("case_folders", "uncertainty"):
            drops = unc["readings"].get(key, {})
            print(f"  {key:<38} " + "  ".join(f"{k} {v:.3f}" + (f" ({drop_text(drops[k])})" if k in drops else "")
                                              for k, v in value.items() if isinstance(v, float)))
    if unc["worst_shift"]:
        worst = unc["worst_shift"]
        print(f"  worst shift with its remedy: {worst['shift']} ({worst['reading']}) {drop_text(worst)} against "
              f"clean (aim: within {AIM})")
    for warning in unc["warnings"]:
        print(f"  warning: {warning}", file=sys.stderr)


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
    from roseprior.checkpoint import atomic_write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    results = []
    with tempfile.TemporaryDirectory(prefix="shift_quality_") as tmp:
        for run in args.runs:  # each run printed and written as it ends: a run of 505 cells takes 10-30 minutes
            results.append(measure_run(Path(run), args.max_images, Path(tmp), args.recalibrate, args.shifts))
            print_run(results[-1])
            if out:
                atomic_write_json(out, results)  # makes out's folder, as every atomic write does
    if out:
        page, png = write_page(results, out) if any(r["uncertainty"]["readings"] for r in results) else (None, None)
        print(f"\nwrote {out}" + (f", {page} and {png}" if page else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
