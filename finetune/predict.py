"""``python -m finetune.predict (--ckpt RUN | --model FILE.onnx) --images FOLDER --out preds.csv``.

The users' main use after training: score a folder of new fields, with a finetune run (PyTorch) or
with its export (``python -m finetune.export``; ONNX through onnxruntime, or TorchScript). Either
way the images get exactly the evaluation preprocessing (an eyepiece photograph's unlit frame painted as glass, as
in training; resized, antialiased, no augmentation; the mean over their flips and quarter turns when the run
reads fields so, ``decision.dihedral_mean``),
the probabilities are calibrated (the run's temperature), and ``predicted`` applies the run's
operating point (the threshold chosen on validation for ``decision.target_sensitivity``), not 0.5.
A file that cannot be decoded is listed in the CSV with its reason and never stops the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roseprior.adequacy import COLUMNS, NOT_ASSESSABLE, FieldQuality, measure, quality_cells
from roseprior.checkpoint import atomic_write_csv, atomic_write_json
from roseprior.data import Sample, load_where_known
from roseprior.errors import CheckpointError, DataError
from roseprior.features import resolve_device
from roseprior.imageio import UnreadableImage, read_image
from roseprior.metrics import format_with_intervals
from roseprior.progress import Progress
from roseprior.scale import TILE_BATCH, fields_scale
from roseprior.stage import command_main

__all__ = ["Predictor", "load_predictor", "main", "predict_paths"]

FieldHook = Callable[[Path, np.ndarray], None]  # (path, the decoded (H, W, 3) uint8 field)


@dataclass
class Predictor:
    """``probabilities(batch)`` for a float (B, 3, S, S) batch in [0, 1], and how to read them."""

    model: Callable[[torch.Tensor], np.ndarray]
    classes: list[str]
    positive_class: str
    image_size: int
    threshold: float  # call the positive class when its probability >= threshold
    source: str
    stain: Any = None  # a fitted StainNormalizer when the run was adapted with --stain
    scale: dict[str, Any] | None = None  # how the model saw its training images (``finetune.train.training_scale``)

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        return self.model(self.stain(x) if self.stain is not None else x)

    def call(self, p: np.ndarray) -> str:
        positive = self.classes.index(self.positive_class)
        if len(self.classes) == 2:
            return self.classes[positive] if p[positive] >= self.threshold else self.classes[1 - positive]
        return self.classes[int(p.argmax())]


def load_predictor(ckpt: str | None = None, model: str | None = None, device: str = "cpu") -> Predictor:
    """A run folder (``--ckpt``) or an exported file (``--model``: .onnx, or .pt/.ts TorchScript)."""
    if ckpt is not None:
        from .model import load_classifier

        return classifier_predictor(*load_classifier(ckpt), str(ckpt), device)
    path = Path(str(model))
    if not path.is_file():
        raise CheckpointError(f"--model {path} not found; export one with python -m finetune.export")
    if path.suffix == ".onnx":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            info = json.loads(session.get_modelmeta().custom_metadata_map["roseprior"])
        except (KeyError, json.JSONDecodeError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path} is not an ONNX model written by finetune.export ({str(err)[:200]})") from None
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> np.ndarray:
            return session.run(None, {name: x.numpy().astype(np.float32)})[0]

        runner = run_onnx
    else:
        files = {"roseprior.json": ""}
        try:
            scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
            info = json.loads(files["roseprior.json"])
        except (RuntimeError, ValueError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not a TorchScript model written by finetune.export "
                                  f"({' '.join(str(err).split())[:200]})") from None

        def run_script(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return scripted(x).float().numpy()

        runner = run_script
    if info.get("dihedral_mean"):  # the graph runs each field's 8 views as one batch: a few fields per call
        runner = _in_chunks(runner, max(1, TILE_BATCH // 8))
    return Predictor(runner, list(info["classes"]), info["positive_class"], int(info["image_size"]),
                     float(info["threshold"]), str(path), _stain(info), info.get("scale"))


def _in_chunks(runner: Callable[[torch.Tensor], np.ndarray], size: int) -> Callable[[torch.Tensor], np.ndarray]:
    """``runner`` called on at most ``size`` images at a time, so the graph holds no more images at once than
    PyTorch does (``roseprior.scale.TILE_BATCH``)."""
    def chunked(x: torch.Tensor) -> np.ndarray:
        return np.concatenate([runner(x[start : start + size]) for start in range(0, len(x), size)])

    return chunked


def classifier_predictor(classifier: Any, meta: dict[str, Any], source: str, device: str = "cpu") -> Predictor:
    """A ``Predictor`` for a classifier in memory and its ``best.json`` metadata (temperature, threshold, stain,
    scale), as ``load_predictor`` reads a run folder."""
    from .export import CalibratedClassifier

    net = CalibratedClassifier(classifier, meta.get("temperature", 1.0)).to(device).eval()

    def run_torch(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return net(x.to(device)).float().cpu().numpy()

    threshold = (meta.get("decision") or {}).get("threshold", 0.5)
    return Predictor(run_torch, list(meta["classes"]), meta["positive_class"], int(meta["image_size"]),
                     float(threshold), source, _stain(meta), meta.get("scale"))


def _stain(meta: dict[str, Any]) -> Any:
    """The stain normaliser an adapted run (``roseprior adapt --stain``) maps every field through, or None."""
    if not meta.get("stain_normalization"):
        return None
    from roseprior.imageops import StainNormalizer

    return StainNormalizer.from_state_dict(meta["stain_normalization"])


def _batches(paths: Sequence[Path], size: int, batch_size: int, on_field: FieldHook | None = None
             ) -> Iterator[tuple[list[Path], torch.Tensor | None, list]]:
    """Decoded batches as the model reads them (``squeezed``) in [0, 1], plus the (path, reason) of each file that
    did not decode."""
    for start in range(0, len(paths), batch_size):
        good, images, bad = [], [], []
        for path in paths[start : start + batch_size]:
            try:
                field = read_image(path)
            except UnreadableImage as err:
                bad.append((path, err.reason))
                continue
            if on_field is not None:
                on_field(path, field)
            images.append(squeezed(field, size))
            good.append(path)
        yield good, (torch.stack(images).float().div_(255.0) if images else None), bad


def squeezed(field: np.ndarray, size: int) -> torch.Tensor:
    """A field as the model reads it without ``--scale``, as in training (``roseprior.data.read_during_run``): its
    unlit frame painted as glass (``fill_unlit``), then resized whole to ``size`` square (antialiased), uint8
    (3, size, size). Black eyepiece corners cost three CRIC classifiers 0.19-0.26 of balanced accuracy; painted,
    0.02 at most (docs/results.md, "Fields photographed through an eyepiece")."""
    from torchvision.transforms.v2 import functional as F

    from roseprior.scale import fill_unlit

    return F.resize(torch.from_numpy(fill_unlit(field)).permute(2, 0, 1), [size, size], antialias=True)


def field_probabilities(predictor: Predictor, image: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """One field at the training scale (``scale``: how many times larger its objects appear than in the training
    fields), tiled at the model's input size (``roseprior.scale.training_tiles``, a batch at a time); the
    field's probabilities are the mean of its tiles'.

    The mean, not the maximum: one tile's call is noisy, and a maximum would let the noisiest tile of a
    large field decide it. The unlit frame is painted as glass first, as in training (``squeezed``). Returns
    (probabilities, number of tiles).
    """
    from roseprior.scale import fill_unlit, training_tiles

    total, count = 0.0, 0
    for batch in training_tiles(fill_unlit(image), predictor.scale, scale, predictor.image_size):
        total = total + predictor.probabilities(batch).sum(axis=0)
        count += len(batch)
    return total / count, count


def _folder_estimates(predictor: Predictor, paths: Sequence[Path], progress: bool, limit: int | None = None,
                      pooled: bool = False) -> Iterator[tuple[Path, list[Path], float, int]]:
    """(folder, its paths, its scale, fields measured) per folder of fields taken alike (class folders count with
    the folder above them, ``acquisition_folder``), or for all ``paths`` together (``pooled``: under the folder
    they share), measured on at most ``limit`` fields spread over it (``sampled_scale``), in a pass that keeps no
    field in memory."""
    from roseprior.scale import acquisition_folder, sampled_scale

    folders: dict[Path, list[Path]] = {}
    if pooled and paths:
        folders[Path(os.path.commonpath([p.parent for p in paths]))] = list(paths)
    else:
        for path in paths:
            folders.setdefault(acquisition_folder(path, predictor.classes), []).append(path)
    total = sum(min(len(group), limit or len(group)) for group in folders.values())
    with Progress(total, "scale", unit="img", enabled=progress) as bar:
        for folder, group in folders.items():
            scale, measured = sampled_scale(group, predictor.scale, predictor.source, limit, bar.update)
            yield folder, group, scale, measured


# Folders read this far apart under --scale auto get a warning: more than malignancy's own enlargement of a
# folder's nuclei within the estimate's error (SAME_SCALE) on either side, which is what folders of one case each
# look like (docs/results/scale_case_folders_synthetic.json).
CASE_SPREAD = 1.5


def folder_scales(predictor: Predictor, paths: Sequence[Path], progress: bool = True, pooled: bool = False
                  ) -> dict[Path, float]:
    """``--scale auto``: each path's scale, one per folder of fields (``_folder_estimates``); ``--scale site``
    (``pooled``): one for all of them. Each value is printed."""
    from roseprior.scale import SAME_SCALE

    from .train import current_training_scale

    if Path(predictor.source).is_dir():
        predictor.scale = current_training_scale(Path(predictor.source), predictor.scale)
    scales, read = {}, []
    for folder, group, scale, measured in _folder_estimates(predictor, paths, progress, pooled=pooled):
        scales.update(dict.fromkeys(group, scale))
        read.append(scale)
        print(f"finetune.predict: --scale {'site' if pooled else 'auto'}: {folder}: objects appear {scale:.2f}x as large as in the "
              f"training fields (midmean of {measured} of {len(group)} fields' estimates; within {SAME_SCALE:g}x of the "
              "training scale reads 1.00)", file=sys.stderr)
    if len(read) > 1 and max(read) / min(read) >= CASE_SPREAD:  # synthetic cases of one class: 0.71x (N) to 1.88x (P)
        print(f"finetune.predict: warning: folders read {min(read):.2f}x to {max(read):.2f}x. If each folder holds one "
              "case, its diagnosis reads as magnification (enlarged malignant nuclei) and a positive case's fields are "
              "shrunk toward benign size: --scale site takes all of them at one scale", file=sys.stderr)
    return scales


def check_scale(predictor: Predictor, paths: Sequence[Path], progress: bool = True) -> list[Path]:
    """Without ``--scale``: each folder's scale measured on up to ``roseprior.scale.CHECK_FIELDS`` of its
    fields, and a warning for each folder read ``OFF_SCALE`` or more from the training scale, whose fields
    squeezed whole show the model objects of another size than it was trained on (the issue's 4x lower
    magnification cost 17 points that way). Returns those folders; none when the run records no scale reference
    of today's measure."""
    from roseprior import scale as scales

    if ((predictor.scale or {}).get("reference") or {}).get("version") != scales.MEASURE_VERSION:
        return []
    flagged = []
    for folder, _, scale, measured in _folder_estimates(predictor, paths, progress, scales.CHECK_FIELDS):
        if measured and scales.is_off_scale(scale):
            flagged.append(folder)
            print(f"finetune.predict: warning: {folder}: objects appear {scale:.2f}x as large as in the training fields "
                  f"(nuclei of {measured} fields); squeezed whole into the model's input, they are shown at another "
                  "magnification than in training: --scale auto brings them to the training scale (--scale site "
                  "where each folder holds one case: a positive case's enlarged nuclei also read larger)", file=sys.stderr)
    return flagged


def predict_paths(predictor: Predictor, paths: Sequence[Path], batch_size: int = 16, progress: bool = True,
                  scale: str | float | Mapping[Path, float] | None = None, on_field: FieldHook | None = None
                  ) -> tuple[dict[Path, np.ndarray], list[tuple[Path, str]]]:
    """Class probabilities per readable path, and the unreadable paths with their reasons. ``scale``:
    None resizes each field to the model's input, as in training; a number, each path's number, or ``"auto"``
    (one estimate per folder of fields taken alike, ``folder_scales``) predicts at the training scale
    (``field_probabilities``). ``on_field(path, image)`` sees each decoded field as read (main measures its
    adequacy there, so it is decoded once more only for ``"auto"``'s estimate)."""
    probs: dict[Path, np.ndarray] = {}
    unreadable: list[tuple[Path, str]] = []
    if scale in ("auto", "site"):
        scale = folder_scales(predictor, paths, progress, pooled=scale == "site")
    with Progress(len(paths), "predict", unit="img", enabled=progress) as bar:
        if scale is not None:
            for path in paths:
                try:
                    field = read_image(path)
                except UnreadableImage as err:
                    unreadable.append((path, err.reason))
                else:
                    if on_field is not None:
                        on_field(path, field)
                    taken = scale[path] if isinstance(scale, Mapping) else scale
                    probs[path], _ = field_probabilities(predictor, field, taken)
                bar.update()
            return probs, unreadable
        for good, images, bad in _batches(paths, predictor.image_size, batch_size, on_field):
            unreadable.extend(bad)
            if images is not None:
                probs.update(zip(good, predictor.probabilities(images), strict=True))
            bar.update(len(good) + len(bad))
    return probs, unreadable


def write_csv(out: Path, predictor: Predictor, paths: Sequence[Path], probs: dict[Path, np.ndarray],
              unreadable: list[tuple[Path, str]], qualities: dict[Path, FieldQuality], judge_all: bool = False,
              scale: float | Mapping[Path, float] | None = None, known: Mapping[Path, Sample] | None = None) -> Path:
    """One row per field, with its adequacy (``qualities``: ``roseprior.adequacy.FieldQuality`` per scored
    path): a flagged field is called ``not assessable`` rather than N or P, unless ``judge_all``. ``scale``
    (as ``predict_paths`` took it) fills the column ``scale``: how many times larger the field's objects were
    taken to appear than in training, empty for a field resized whole. ``known`` (``fields_to_score``) adds the
    column ``label``, each field's true class where its layout gave one."""
    reasons = dict(unreadable)

    def row(path: Path) -> list[str]:
        label = [predictor.classes[known[path].label] if path in known else ""] if known else []
        if path not in probs:
            return [str(path), *label, *([""] * (len(predictor.classes) + 1)), reasons.get(path, "unreadable"), "",
                    *([""] * (len(COLUMNS) - 1))]
        p, quality = probs[path], qualities[path]
        call = predictor.call(p) if quality.assessable or judge_all else NOT_ASSESSABLE
        taken = scale.get(path) if isinstance(scale, Mapping) else scale
        return [str(path), *label, *(f"{v:.6f}" for v in p), call, "", "" if taken is None else f"{taken:.4f}",
                *quality_cells(quality)]

    header = ["path", *(["label"] if known else []), *(f"p_{c}" for c in predictor.classes), "predicted", "error",
              "scale", *COLUMNS[1:]]
    return atomic_write_csv(out, header, map(row, paths))


def fields_to_score(images: str | Path, classes: Sequence[str]) -> tuple[list[Path], dict[Path, Sample]]:
    """The fields under ``images`` (every image of a folder, or a manifest's rows) and, for each whose class is
    known, a ``Sample`` with its label, site and group: in a folder, the innermost class folder it lies in
    (``N/``, ``P/``; ``images`` itself or any folder below it, so a site folder of class folders, or only ``P/``,
    is read too); in a manifest, its ``label``, ``domain`` and ``group`` columns. Predict scores those fields
    against their labels."""
    rows = load_where_known(images, classes)
    paths = [Path(s.path) for s in rows]
    return paths, {path: row for path, row in zip(paths, rows, strict=True) if row.label >= 0}


def score_known(predictor: Predictor, probs: Mapping[Path, np.ndarray], known: Mapping[Path, Sample]
                ) -> dict[str, Any] | None:
    """Balanced accuracy, sensitivity and specificity at the run's operating point, AUROC and ECE of the scored
    fields whose class is known, with 95% bootstrap intervals (whole groups when the manifest names them) and
    the same per site (``domain``, else the folder of fields taken alike); None when no scored field has a
    label. What a user checks a run on a new site with."""
    from roseprior.metrics import binary_metrics, with_intervals
    from roseprior.scale import acquisition_folder

    scored = [path for path in probs if path in known]
    if not scored:
        return None
    positive = predictor.classes.index(predictor.positive_class)

    def metrics(paths: list[Path], where: str) -> dict[str, Any]:
        labels = np.array([known[path].label for path in paths])
        p = np.array([probs[path][positive] for path in paths])
        groups = [known[path].group or str(path) for path in paths]
        return with_intervals(binary_metrics(labels == positive, p, predictor.threshold), labels, p, predictor.classes,
                              positive, where, groups, predictor.threshold)

    sites: dict[str, list[Path]] = {}
    for path in scored:
        site = known[path].domain or str(acquisition_folder(path, predictor.classes))
        sites.setdefault(site, []).append(path)
    return {"source": predictor.source, "threshold": predictor.threshold, "positive_class": predictor.positive_class,
            "all": metrics(scored, "the labelled set"),
            "per_site": {site: metrics(paths, f"the labelled set of {site}") for site, paths in sorted(sites.items())} if len(sites) > 1 else {}}


def metrics_path(out: Path) -> Path:
    """Where predict writes the scores of the labelled fields beside its CSV: ``preds.csv`` -> ``preds.metrics.json``."""
    return out.with_suffix(".metrics.json")


def parse_scale(text: str) -> str | float:
    """``--scale``: none, auto, site or a positive number (shared with ``roseprior adapt``, which estimates one
    scale for the site in any case)."""
    if text in ("none", "auto", "site"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be none, auto, site or a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a finetune out_dir (best.safetensors + best.json)")
    source.add_argument("--model", help="a file written by python -m finetune.export (.onnx, or .pt TorchScript)")
    parser.add_argument("--images", required=True,
                        help="folder of images (searched recursively), or a manifest CSV (path[,label][,domain][,group]); "
                             "fields whose class is known (a class folder such as N/ or P/ at any depth, or the "
                             "manifest's label) are also scored, into OUT with .metrics.json")
    parser.add_argument("--out", required=True, help="CSV: path, p_<class>..., predicted, error, scale (what the field was taken at; empty: resized whole), adequacy columns")
    parser.add_argument("--batch-size", type=_positive_int, default=16,
                        help="fields read at a time (an export that reads 8 views of each, dihedral_mean in its "
                             "metadata, is fed 4 fields per call whatever this says)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ... (--ckpt)")
    parser.add_argument("--scale", default=None, type=parse_scale,
                        help="none (the default, unless the run was adapted to a site at another magnification by "
                             "roseprior adapt, whose scale it then takes): resize each field to the model's input "
                             "(as in training; by default a folder whose nuclei read 1.5x or more off the training "
                             "scale is warned about); VALUE: the fields' objects "
                             "appear VALUE times as large as in the training fields; auto: estimate that from the "
                             "nuclei, one value per folder (the midmean of its fields' estimates; class folders such as N/ and P/ "
                             "count with the folder above them); site: one estimate for every field given, for "
                             "folders that each hold one case (one diagnosis), whose enlarged malignant nuclei "
                             "would read as magnification. With VALUE, auto or site each field "
                             "is resampled to the training scale and tiled, and its probabilities are the mean of "
                             "its tiles'")
    parser.add_argument("--mpp", type=float, default=None,
                        help="micrometres per pixel of the fields, for a run trained with data.target_mpp: each field "
                             "is resampled to the training scale and tiled, as with --scale")
    parser.add_argument("--judge-all", action="store_true",
                        help="call N or P even on fields flagged not assessable (out of focus, too few cells, faint)")
    args = parser.parse_args(argv)

    def run() -> int:
        out = Path(args.out)
        if out.is_dir():  # checked before any work, not after every prediction
            raise DataError(f"--out {out} is a folder; give the path of the CSV file to write, e.g. {out / 'preds.csv'}")
        predictor = load_predictor(args.ckpt, args.model, str(resolve_device(args.device)))
        scale = fields_scale(predictor.scale, args.scale, args.mpp, predictor.source)
        if args.scale is None and scale is not None:
            print(f"finetune.predict: {predictor.source} was adapted to a site whose objects appear {scale:.2f}x as "
                  "large as in training (roseprior adapt): its fields are brought to the training scale; --scale "
                  "none resizes them whole instead", file=sys.stderr)
        paths, known = fields_to_score(args.images, predictor.classes)
        if not paths:
            raise DataError(f"no images under {args.images}")
        if scale is None and args.scale is None:  # not asked for --scale none: say when the scale is off
            check_scale(predictor, paths)
        if scale in ("auto", "site"):  # resolved here, so that the CSV says what each field was taken at
            scale = folder_scales(predictor, paths, pooled=scale == "site")
        qualities: dict[Path, FieldQuality] = {}
        probs, unreadable = predict_paths(predictor, paths, args.batch_size, scale=scale,
                                          on_field=lambda path, field: qualities.__setitem__(path, measure(field)))
        try:
            write_csv(out, predictor, paths, probs, unreadable, qualities, args.judge_all, scale, known)
            scores = score_known(predictor, probs, known)
            if scores is not None:
                atomic_write_json(metrics_path(out), scores)
        except OSError as err:
            raise DataError(f"cannot write {out}: {err.strerror}") from None
        print(f"finetune.predict: {len(probs)} image(s) scored with {predictor.source}, {len(unreadable)} "
              f"unreadable -> {out}; predicted = {predictor.positive_class} when p_{predictor.positive_class} >= "
              f"{predictor.threshold:.4f}")
        if scores is not None:
            for site, result in {"labelled fields": scores["all"], **scores["per_site"]}.items():
                print(f"  {site}: {result['n']} field(s): {format_with_intervals(result)}")
            for warning in scores["all"]["warnings"]:
                print(f"  warning: {warning}", file=sys.stderr)
            print(f"  scores of the fields whose class the layout gave, every scored field at the operating point "
                  f"(not assessable ones too) -> {metrics_path(out)}")
        elif metrics_path(out).exists():  # not ours to delete, but it no longer describes the CSV beside it
            print(f"finetune.predict: warning: {metrics_path(out)} is left from an earlier run; no field here lies in a "
                  "class folder (or has a manifest label), so it was not rewritten", file=sys.stderr)
        for path, reason in unreadable[:20]:
            print(f"  unreadable: {path}: {reason}", file=sys.stderr)
        return 0

    return command_main("finetune.predict", run)


if __name__ == "__main__":
    sys.exit(main())
