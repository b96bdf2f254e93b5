"""Labelled and unlabelled image lists, the embedded default data set, and the dataset the stages load.

Data arrives in two shapes: an ImageFolder tree (``root/{train,val,test}/{N,P}/...`` as the
users' "721"/"712" sets, or ``root/{N,P}/...``) or a CSV manifest (``path,label[,domain][,group]``
plus any other columns). Both become a list of ``Sample``; the class order always comes from the
config (``classes: [N, P]``, P positive), never from folder names sorted alphabetically, so label
1 means P whatever the folders are called on disk.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from roseprior.errors import DataError
from roseprior.imageio import IMAGE_EXTENSIONS, SkippedFiles, UnreadableImage, is_image_file, read_image

__all__ = [
    "MANIFEST_NAME",
    "SPLITS",
    "DecodedImages",
    "ImageDataset",
    "Sample",
    "filter_readable",
    "find_images",
    "load_labelled",
    "load_unlabeled",
    "load_where_known",
    "manifest_columns",
    "manifest_row",
    "read_during_run",
    "read_manifest",
    "resolve_root",
    "spread_indices",
    "acquisition_signature",
    "class_from_folders",
    "to_canonical",
    "with_pseudo_domains",
    "with_scales",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
# Manifest columns with a place of their own in Sample; every other column goes to Sample.extra.
_SAMPLE_COLUMNS = ("path", "label", "domain", "group")
_PROGRESS_MIN = 300  # show a progress bar when checking more images than this


@dataclass
class Sample:
    """One image: ``label`` indexes the config's ``classes`` (-1 when unlabelled)."""

    path: str
    label: int = -1
    domain: str | None = None
    group: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    zoom: float | None = None  # resampling factor to the canonical scale (``with_scales``); None: not resampled


# ---------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------


def find_images(root: str | Path) -> list[Path]:
    """Image files anywhere under ``root``, sorted by relative path; dot-files and dot-folders skipped.

    Symlinked files and folders are followed (``roseprior split --link`` trees are symlinks), each
    real folder once, so a link loop cannot recurse forever.
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"image folder {root} {what}")
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _has_image(folder: Path) -> bool:
    """Whether any image lies under ``folder`` (stops at the first one found)."""
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and is_image_file(f) for f in filenames):
            return True
    return False


def _extensions_text() -> str:
    return ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------


def read_manifest(path: str | Path, classes: Sequence[str] | None, split: str | None = None) -> list[Sample]:
    """Samples from a CSV manifest; relative paths are relative to the manifest's folder.

    ``classes=None`` reads it unlabelled (label -1, no ``label`` column needed; one that is there stays as text
    in ``extra``). ``split`` keeps only rows whose ``split`` column equals it.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(enumerate(reader, start=2))  # (line number, row); line 1 is the header
    except FileNotFoundError:
        raise DataError(f"manifest {path} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"manifest {path} cannot be read as UTF-8 CSV: {err}") from None
    required = ["path"] if classes is None else ["path", "label"]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"manifest {path} lacks the column(s) {', '.join(missing)}; it has: {', '.join(columns) or 'none'} "
            f"(expected a header like path,label[,domain][,group])"
        )
    if split is not None:
        if "split" not in columns:
            raise DataError(
                f"manifest {path} has no 'split' column to select '{split}' from; make splits with "
                f"`roseprior split --src {path} --out DIR` and set data.split_dir=DIR"
            )
        rows = [(line, r) for line, r in rows if (r.get("split") or "").strip() == split]
    if not rows:
        raise DataError(f"manifest {path} has no rows" + (f" with split '{split}'" if split else ""))

    base = path.parent
    class_index = {name: i for i, name in enumerate(classes)} if classes is not None else {}
    samples = []
    for line, row in rows:
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DataError(f"manifest {path}, line {line}: empty 'path'")
        label = -1
        if classes is not None:
            name = (row.get("label") or "").strip()
            if name not in class_index:
                raise DataError(
                    f"manifest {path}, line {line}: label '{name}' (file {rel}) is not one of the "
                    f"classes {', '.join(classes)}; fix the label or set data.classes"
                )
            label = class_index[name]
        extra = {k: (v or "") for k, v in row.items()
                 if k is not None and (k not in _SAMPLE_COLUMNS or (k == "label" and classes is None))}
        samples.append(
            Sample(
                path=str(base / rel),  # an absolute ``rel`` replaces ``base``
                label=label,
                domain=(row.get("domain") or "").strip() or None,
                group=(row.get("group") or "").strip() or None,
                extra=extra,
            )
        )
    if classes is not None:
        seen = {s.label for s in samples}
        absent = [c for i, c in enumerate(classes) if i not in seen]
        if absent:
            warnings.warn(f"manifest {path} has no rows of class {', '.join(absent)}", stacklevel=3)
    return samples


def class_from_folders(path: Path, root: Path, classes: Sequence[str]) -> int:
    """The class of the image at ``path`` under ``root`` from the innermost folder on the way named after one of
    ``classes`` (``root`` itself counts; case ignored), or -1: how a folder that is not a labelled set as a whole
    (only ``P/``, class folders at some depth) still says what its fields are."""
    index = {c.casefold(): i for i, c in enumerate(classes)}
    folders = (root.name, *path.relative_to(root).parts[:-1])
    return next((index[name.casefold()] for name in reversed(folders) if name.casefold() in index), -1)


def manifest_columns(samples: Sequence[Sample]) -> list[str]:
    """The header of a manifest that ``read_manifest`` reads ``samples`` back from: path, label, then domain and
    group when any sample has one, then the source's other columns in the order first seen."""
    columns = ["path", "label"]
    columns += [name for name in ("domain", "group") if any(getattr(s, name) is not None for s in samples)]
    for s in samples:
        columns.extend(k for k in s.extra if k not in columns)
    return columns


def manifest_row(sample: Sample, columns: Sequence[str], classes: Sequence[str], path: str) -> list[str]:
    """``sample`` as a row under ``columns`` (``manifest_columns``): ``path`` as given (absolute, or relative to
    the manifest), the class name (empty when unlabelled), then its own columns."""
    row = {**sample.extra, "path": path, "label": classes[sample.label] if sample.label >= 0 else "",
           "domain": sample.domain or "", "group": sample.group or ""}
    return [row.get(column, "") for column in columns]


# ---------------------------------------------------------------------------------------------
# Labelled and unlabelled data
# ---------------------------------------------------------------------------------------------


def load_labelled(
    root: str | Path,
    classes: Sequence[str],
    split: str | None = None,
    split_dir: str | Path | None = None,
) -> list[Sample]:
    """Labelled samples from a class-folder tree or a manifest, optionally one split of them.

    Where they come from, in order:
      1. ``split`` and ``split_dir``: ``split_dir/{split}.csv`` as written by ``roseprior split``;
      2. ``root`` a .csv file: that manifest (``split`` filters on its ``split`` column);
      3. ``split`` given: the folder ``root/{split}``, else ``root/manifest.csv``'s ``split`` column;
      4. ``root/manifest.csv``: that manifest, paths relative to ``root``;
      5. class folders ``root/{class}/...``, ``root/{train,val,test}/{class}/...`` (all splits), or
         ``root/{domain}/{class}/...`` (one folder per site: ``Sample.domain`` is the folder name).
    """
    classes = _check_classes(classes)
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split '{split}'; valid: {', '.join(SPLITS)} (or none for all data)")
    if split is not None and split_dir is not None:
        csv_path = Path(split_dir) / f"{split}.csv"
        if not csv_path.is_file():
            raise DataError(
                f"split file {csv_path} not found; make it with `roseprior split --src DATA --out {split_dir}` "
                f"or point data.split_dir at the folder holding train.csv, val.csv and test.csv"
            )
        return read_manifest(csv_path, classes)
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data root {root} does not exist; set data.root to an image folder or a manifest .csv"
        )
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"data root {root} is a file but not a .csv manifest")
        return read_manifest(root, classes, split=split)
    if split is not None:
        if (root / split).is_dir():
            return _load_folder(root / split, classes)
        if (root / MANIFEST_NAME).is_file():
            return read_manifest(root / MANIFEST_NAME, classes, split=split)
        raise DataError(
            f"{root} has no '{split}' folder; make splits with `roseprior split --src {root} --out DIR` "
            f"and set data.split_dir=DIR"
        )
    return _load_folder(root, classes)


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str) or not classes:
        raise DataError(f"data.classes must be a list of class names such as [N, P], got {classes!r}")
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise DataError(f"data.classes lists a class twice: {classes}")
    return classes


def _load_folder(root: Path, classes: list[str]) -> list[Sample]:
    if (root / MANIFEST_NAME).is_file():
        return read_manifest(root / MANIFEST_NAME, classes)
    has_class_folders = any((root / c).is_dir() for c in classes)
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    if split_dirs and not has_class_folders:
        return [s for name in split_dirs for s in _load_folder(root / name, classes)]
    domains = [] if has_class_folders else _domain_folders(root, classes)
    if domains:
        return [replace(s, domain=d.name) for d in domains for s in _load_class_folders(d, classes)]
    return _load_class_folders(root, classes)


def _domain_folders(root: Path, classes: list[str]) -> list[Path]:
    """``root/<domain>/<class>/...`` (one folder per site or scanner): the domain folders, else []."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in SPLITS)
    if len(folders) >= 2 and all(all((d / c).is_dir() for c in classes) for d in folders):
        return folders
    return []


def _load_class_folders(root: Path, classes: list[str]) -> list[Sample]:
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples: list[Sample] = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DataError(
                f"class folder {folder} is missing: expected one folder per class ({', '.join(classes)}) "
                f"under {root}, found {', '.join(present) or 'no folders'}; or give a manifest.csv (path,label)"
            )
        images = find_images(folder)
        if not images:
            raise DataError(
                f"class folder {folder} is empty: no image files ({_extensions_text()}) in it or below it"
            )
        samples.extend(Sample(path=str(p), label=index) for p in images)
    for name in present:
        if name not in classes and _has_image(root / name):
            raise DataError(
                f"folder {root / name} holds images but '{name}' is not one of the classes "
                f"{', '.join(classes)}; move it out of {root} or add it to data.classes"
            )
    return samples


def load_unlabeled(root: str | Path) -> list[Sample]:
    """Every image under a folder tree (labels ignored), or every row of a manifest .csv."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return read_manifest(root, classes=None)
    images = find_images(root)
    if not images:
        raise DataError(
            f"no images under {root} (looked for {_extensions_text()}, any case; dot-files and dot-folders are skipped)"
        )
    return [Sample(path=str(p)) for p in images]


def load_where_known(root: str | Path, classes: Sequence[str]) -> list[Sample]:
    """Every image of a folder or manifest (``load_unlabeled``), each with the class its layout gives where it
    gives one, -1 elsewhere: in a folder its innermost class folder (``class_from_folders``), in a manifest its
    ``label`` column. For sets that need not be labelled as a whole: a new site predict scores, a folder
    ``roseprior scale`` measures."""
    root = Path(root)
    by_name = {c.casefold(): i for i, c in enumerate(classes)}
    return [replace(s, label=by_name.get(s.extra.get("label", "").strip().casefold(), -1)) if root.is_file()
            else replace(s, label=class_from_folders(Path(s.path), root, classes)) for s in load_unlabeled(root)]


def resolve_root(data_cfg: Any) -> Path:
    """``data.root`` as a path, or the embedded synthetic data set when it is null."""
    if data_cfg.root is None:
        from roseprior.synth import default_dataset  # lazy: only runs that use the default pay for it

        return Path(default_dataset())
    root = Path(data_cfg.root).expanduser()
    if not root.exists():
        raise DataError(
            f"data.root {root} does not exist; set data.root to an image folder or manifest .csv, "
            f"or to null for the built-in synthetic data"
        )
    return root


# ---------------------------------------------------------------------------------------------
# Physical scale
# ---------------------------------------------------------------------------------------------

SCALE_COLUMNS = ("mpp", "relative_scale")  # manifest columns giving an image's scale


def acquisition_signature(path: str | Path) -> list[float]:
    """What tells one site's or session's images from another's, from a 1/8-scale decode: the log stain
    strength (H, E, DAB; ``imageops.stain_strength``) and the log colour of the glass (each channel's 99th
    percentile: white balance and brightness)."""
    import numpy as np
    import torch
    from PIL import Image

    from roseprior import imageops

    with Image.open(path) as img:
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # JPEG: decoded at 1/8 scale
        rgb = np.array(img.convert("RGB"))
    strength = imageops.stain_strength([torch.from_numpy(rgb).permute(2, 0, 1)])[0].log().tolist()
    glass = np.log(np.percentile(rgb.reshape(-1, 3), 99, axis=0).clip(1, 255) / 255.0).tolist()
    return strength + glass


def spread_indices(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over ``range(count)``, first and last included: a sample that follows
    the data set's order (its folders, its sites) rather than a random draw."""
    import numpy as np

    return np.unique(np.linspace(0, count - 1, min(limit, count)).round().astype(int)).tolist()


def with_pseudo_domains(samples: Sequence[Sample], k: int, seed: int = 0, progress: bool = True) -> list[Sample]:
    """``samples`` with ``domain`` set to one of ``k`` clusters (``pseudo0``..) of their acquisition signature
    (standardised; scikit-learn's k-means), for data that names no site: what ``train.batch_by_domain``
    and stain swaps then draw within and across. Deterministic for a seed, so every process agrees."""
    import numpy as np
    from sklearn.cluster import KMeans

    from roseprior.progress import Progress

    signatures = []
    with Progress(len(samples), "pseudo-domains: colour signatures", unit="img", enabled=progress) as bar, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for signature in pool.map(acquisition_signature, [s.path for s in samples]):
            signatures.append(signature)
            bar.update()
    x = np.asarray(signatures)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    clusters = KMeans(n_clusters=min(k, len(samples)), n_init=10, random_state=seed).fit_predict(x)
    return [replace(s, domain=f"pseudo{c}") for s, c in zip(samples, clusters, strict=True)]


def with_scales(samples: Sequence[Sample], data_cfg: Any) -> list[Sample]:
    """``samples`` with ``zoom`` set to the factor that brings each image to ``data.target_mpp``.

    An image's scale comes from its manifest row (``mpp``: micrometres per pixel, or
    ``relative_scale`` as ``roseprior scale`` writes it: 2.0 = objects appear twice as large as at
    the canonical scale), else from ``data.mpp`` (one scale for the whole set). Without
    ``data.target_mpp`` nothing changes: images are resized whole to ``image_size`` as before.
    """
    if data_cfg.target_mpp is None:
        if any(s.extra.get("mpp") for s in samples):
            log.warning("the manifest gives each image's mpp but data.target_mpp is null: images are resized whole to "
                        "image_size, whatever their scale; set data.target_mpp to resample them to one scale")
        return list(samples)
    out = []
    for sample in samples:
        column = next((c for c in SCALE_COLUMNS if (sample.extra.get(c) or "").strip()), None)
        if column is None and data_cfg.mpp is None:
            raise DataError(f"{sample.path} has no scale: give the manifest an 'mpp' column (micrometres per pixel) "
                            "or a 'relative_scale' column (`roseprior scale`), or set data.mpp for the whole set")
        text = sample.extra[column].strip() if column else str(data_cfg.mpp)
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0 or value == float("inf"):
            raise DataError(f"{sample.path}: {column or 'data.mpp'} '{text}' is not a positive number")
        zoom = 1.0 / value if column == "relative_scale" else value / data_cfg.target_mpp
        out.append(replace(sample, zoom=zoom))
    return out


def to_canonical(image: Any, zoom: float | None, max_side: int | None = None) -> Any:
    """A uint8 (3, H, W) tensor resampled by ``zoom``, then shrunk so that its longer side is at most
    ``max_side``; untouched when neither applies."""
    from roseprior import imageops

    factor = zoom or 1.0
    if max_side and max(image.shape[1:]) * factor > max_side:
        factor = max_side / max(image.shape[1:])
    return image if factor == 1.0 else imageops.resample(image[None], factor)[0]


def _window(image: Any, size: int, random: bool) -> Any:
    """A ``size`` square of a canonical-scale image: centred, or placed at random (training); a side
    shorter than ``size`` is mirrored out to it, as ``roseprior.scale.tile_batches`` does for a small field."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape[1:]
    if height < size or width < size:
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        image = F.pad(image[None].float(), (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                      mode=mode)[0].to(torch.uint8)
        height, width = image.shape[1:]
    if random:
        top, left = (int(torch.randint(0, n - size + 1, ())) for n in (height, width))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


# ---------------------------------------------------------------------------------------------
# Decoding check and the dataset
# ---------------------------------------------------------------------------------------------


def _read_error(path: str) -> str | None:
    try:
        read_image(path, check_only=True)
    except UnreadableImage as err:
        return err.reason
    return None


def filter_readable(
    samples: Sequence[Sample],
    out_dir: str | Path | None = None,
    max_fraction: float = 0.05,
) -> list[Sample]:
    """Keep the samples whose image decodes; list the others in ``out_dir/skipped_files.csv``.

    Each file is decoded once, up front, so a bad file is reported by name before training rather
    than crashing a DataLoader worker mid-epoch. Raises ``DataError`` when more than
    ``max_fraction`` of them are unreadable (a wrong root or a broken export, not a stray file).
    """
    from roseprior.progress import Progress

    skipped = SkippedFiles()
    readable: list[Sample] = []
    # PIL releases the GIL while decoding, so a few threads cut the wall time of this pass.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, Progress(
            len(samples), "checking images", unit="img", enabled=len(samples) > _PROGRESS_MIN) as progress:
        for sample, reason in zip(samples, pool.map(_read_error, [s.path for s in samples]), strict=True):
            if reason is None:
                readable.append(sample)
            else:
                skipped.add(sample.path, reason)
            progress.update()
    if out_dir is not None:
        skipped.write_csv(out_dir)
    skipped.check(len(samples), max_fraction)
    if skipped:
        where = f"; see {skipped.csv_path}" if skipped.csv_path else ""
        log.warning("skipped %d of %d unreadable images%s", len(skipped), len(samples), where)
    return readable


def read_during_run(path: str | Path) -> Any:
    """``read_image`` for a file that decoded when the run started, as every stage shows it to a model: the unlit
    frame of a photograph through an eyepiece painted as background glass (``roseprior.scale.fill_unlit``, as
    ``finetune.predict`` does), so black corners are neither learned as a site's mark nor met only at prediction.
    Failing now is a ``DataError`` that says so (the file changed or vanished mid-run), not a decoder traceback."""
    from roseprior.scale import fill_unlit

    try:
        return fill_unlit(read_image(path))
    except UnreadableImage as err:
        raise DataError(f"{path} became unreadable during the run ({err.reason}); restore or remove it, then run "
                        "the same command again (training resumes from its last checkpoint)") from None


class ImageDataset:
    """Map-style dataset: ``ds[i]`` is ``(image, label, i)`` with ``image`` a uint8 (3, S, S) tensor.

    Images are resized (antialiased) to ``image_size`` square when it is given, then ``transform``
    is applied. A sample with a ``zoom`` (``with_scales``) is instead resampled to the canonical
    scale and a window of ``image_size`` is cut from it: centred, or at random with ``random_window``
    (training), so a field is never squeezed into the model's input. It is a plain class rather than a ``torch.utils.data.Dataset`` subclass so that
    importing this module (``roseprior split``, ``roseprior --help``) does not load torch;
    ``DataLoader`` needs only ``__len__`` and ``__getitem__``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        random_window: bool = False,
    ):
        self.samples = list(samples)
        self.image_size = image_size
        self.transform = transform
        self.random_window = random_window
        self._warned_small = False  # one warning per dataset (per worker process), not per image

    def __len__(self) -> int:
        return len(self.samples)

    def stacked(self) -> Any:
        """Every image as one uint8 (N, 3, S, S) batch: for the handful a stain fit or a thumbnail sheet needs."""
        import torch

        return torch.stack([self[i][0] for i in range(len(self))])

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        import torch

        sample = self.samples[index]
        image = torch.from_numpy(read_during_run(sample.path)).permute(2, 0, 1).contiguous()
        size = self.image_size
        if sample.zoom is not None:
            image = to_canonical(image, sample.zoom)
            if size is not None:
                image = _window(image, size, self.random_window)
        elif size is not None:
            height, width = image.shape[-2:]
            if (height < size or width < size) and not self._warned_small:
                self._warned_small = True
                warnings.warn(
                    f"{sample.path} is {width}x{height} px, smaller than image_size {size}: upsampling it "
                    f"(other images smaller than {size} px in this dataset are upsampled without a warning)",
                    stacklevel=2,
                )
            if (height, width) != (size, size):
                from torchvision.transforms.v2 import functional as F

                image = F.resize(image, [size, size], antialias=True)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label, index


class DecodedImages:
    """Images as uint8 (3, H, W) tensors plus their index, for views cut later (pretraining): each at
    the canonical scale when its sample has a ``zoom``, and no longer than ``source_max_side``."""

    def __init__(self, samples: Sequence[Sample | str | Path], source_max_side: int | None = None) -> None:
        self.samples = [s if isinstance(s, Sample) else Sample(str(s)) for s in samples]
        self.source_max_side = source_max_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import numpy as np
        import torch

        sample = self.samples[index]
        image = torch.from_numpy(np.ascontiguousarray(read_during_run(sample.path))).permute(2, 0, 1)
        return to_canonical(image, sample.zoom, self.source_max_side), index
