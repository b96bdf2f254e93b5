"""Train/val/test splits: per class, seeded, group-aware; ``roseprior split``.

Size rule (one rule, every case): for a class of ``n`` images and ratios normalised to sum 1,
``val = floor(n * r_val)``, ``test = floor(n * r_test)``, ``train = n - val - test``. Ratios are
kept as exact fractions ("0.29" is 29/100), so 100 * 0.29 floors to 29, where floats give
28.999999999999996 and 28.
For N=1852, P=1240 and 7:2:1 that is N 1297/370/185 and P 868/248/124.

Grouped splits (``group_by``) keep every group (slide, patient, field) in one split, so
correlated images never straddle train and evaluation. Groups, not rows, are assigned, so a
group holding both classes still lands whole in one split. The per-class sizes above become
targets: groups are visited in a seeded shuffled order and each goes to the split where it most
reduces the L1 distance between the per-class counts and the targets (ties: the split that is
proportionally the emptiest); then single-group moves and pairwise swaps are applied while they
reduce that distance (``assign_groups``). On CRIC (229 fields of 1 to 89 cells) the counts hit
the targets exactly or within one image; with few, large groups they can only come close.

Output (``roseprior split --out OUT``): ``OUT/{train,val,test}.csv`` with columns ``path,label``
(label is the class name) plus the source's other columns. Paths are absolute, so OUT can live
anywhere; ``data.load_labelled(..., split=S, split_dir=OUT)`` reads them back. ``--link`` also
builds ``OUT/{train,val,test}/{class}/`` of symlinks for tools that want an ImageFolder tree.
Files with identical bytes in two splits are listed in ``OUT/duplicates_across_splits.csv``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from roseprior.data import (
    MANIFEST_NAME,
    SPLITS,
    Sample,
    load_labelled,
    load_where_known,
    manifest_columns,
    manifest_row,
    with_scales,
)
from roseprior.errors import ConfigError, DataError

__all__ = [
    "SplitSet",
    "add_parser",
    "is_labelled",
    "read_image_list",
    "resolve_splits",
    "split_fingerprint",
    "find_cross_split_duplicates",
    "group_key",
    "has_split_folders",
    "load_as_laid_out",
    "parse_ratios",
    "split_samples",
    "split_sizes",
    "write_image_list",
    "write_link_tree",
    "write_split_csvs",
]

DUPLICATES_NAME = "duplicates_across_splits.csv"
_PROGRESS_MIN = 300


# ---------------------------------------------------------------------------------------------
# Ratios and sizes
# ---------------------------------------------------------------------------------------------


def parse_ratios(ratios: str | Sequence[float | int | str | Fraction]) -> tuple[Fraction, Fraction, Fraction]:
    """``"7:2:1"``, ``"70:20:10"``, ``"0.7:0.2:0.1"`` or three numbers -> exact train:val:test fractions
    summing to 1."""
    parts = ratios.split(":") if isinstance(ratios, str) else list(ratios)
    if len(parts) != 3:
        raise ConfigError(f"split ratios {ratios!r} must be three numbers train:val:test, e.g. 7:2:1")
    try:
        # str() of a float is its shortest decimal form, so 0.7 becomes exactly 7/10.
        values = [p if isinstance(p, Fraction) else Fraction(str(p).strip()) for p in parts]
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"split ratios {ratios!r} must be numbers, e.g. 7:2:1 or 0.7:0.2:0.1") from None
    total = sum(values)
    if any(v < 0 for v in values) or total <= 0:
        raise ConfigError(f"split ratios {ratios!r} must be non-negative with a positive sum")
    train, val, test = (v / total for v in values)
    return train, val, test


def split_sizes(n: int, ratios: str | Sequence[float | int | str | Fraction]) -> dict[str, int]:
    """Sizes of one class of ``n`` images: val and test rounded down, train takes the rest."""
    _, r_val, r_test = parse_ratios(ratios)
    val = (n * r_val.numerator) // r_val.denominator
    test = (n * r_test.numerator) // r_test.denominator
    return {"train": n - val - test, "val": val, "test": test}


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def split_samples(
    samples: Sequence[Sample],
    ratios: str | Sequence[float | int | str | Fraction] = (0.7, 0.2, 0.1),
    group_by: str | None = None,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Split ``samples`` per class into ``{"train", "val", "test"}`` (see the module docstring).

    The result depends only on the set of samples, the ratios and the seed, not on input order.
    Each split is sorted by (label, path).
    """
    parse_ratios(ratios)  # fail early on bad ratios
    paths = Counter(s.path for s in samples)
    repeated = [p for p, k in paths.items() if k > 1]
    if repeated:
        raise DataError(
            f"{len(repeated)} image(s) are listed more than once (e.g. {repeated[0]}); a file listed "
            f"twice could land in two splits. Remove the repeated rows from the manifest"
        )
    ordered = sorted(samples, key=lambda s: s.path)
    if group_by:
        splits = _split_grouped(ordered, ratios, group_by, seed)
    else:
        splits = _split_per_class(ordered, ratios, seed)
    return {name: sorted(splits[name], key=lambda s: (s.label, s.path)) for name in SPLITS}


def _split_per_class(samples: list[Sample], ratios, seed: int) -> dict[str, list[Sample]]:
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        members = by_label[label]
        # One generator per class, so adding images of one class leaves the others' splits alone.
        random.Random(f"roseprior-split:{seed}:{label}").shuffle(members)
        sizes = split_sizes(len(members), ratios)
        val_end = sizes["val"]
        test_end = val_end + sizes["test"]
        splits["val"].extend(members[:val_end])
        splits["test"].extend(members[val_end:test_end])
        splits["train"].extend(members[test_end:])
    return splits


def group_key(sample: Sample, column: str) -> str | None:
    """The sample's value in ``column``: ``group``/``domain`` fields or a manifest column in ``extra``."""
    if column == "group":
        return sample.group
    if column == "domain":
        return sample.domain
    value = sample.extra.get(column)
    return value.strip() or None if isinstance(value, str) else value


def _split_grouped(samples: list[Sample], ratios, column: str, seed: int) -> dict[str, list[Sample]]:
    if not any(column in s.extra for s in samples) and column not in ("group", "domain"):
        available = sorted({k for s in samples for k in s.extra} | {"group", "domain"})
        raise DataError(f"cannot group by '{column}': no such column; available: {', '.join(available)}")
    groups: dict[str, list[Sample]] = defaultdict(list)
    missing = []
    for s in samples:
        key = group_key(s, column)
        if key is None:
            missing.append(s.path)
        else:
            groups[str(key)].append(s)
    if missing:
        raise DataError(
            f"{len(missing)} image(s) have no '{column}' value (e.g. {missing[0]}); fill the column in "
            f"or split without --group-by"
        )

    class_totals = Counter(s.label for s in samples)
    targets = {name: Counter() for name in SPLITS}
    for label, n in class_totals.items():
        for name, size in split_sizes(n, ratios).items():
            targets[name][label] = size
    group_counts = {key: Counter(s.label for s in members) for key, members in groups.items()}
    where = assign_groups(group_counts, targets, seed)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for key, members in groups.items():
        splits[where[key]].extend(members)
    return splits


_MAX_GROUPS_FOR_SWAPS = 1500  # pairwise swaps cost O(groups^2); past this, greedy + moves is precise enough


def assign_groups(
    group_counts: dict[str, Counter], targets: dict[str, Counter], seed: int = 0
) -> dict[str, str]:
    """Map each group to a split so per-class counts approach ``targets`` (split -> label -> count).

    1. Greedy: groups in a seeded shuffled order each go where they most lower the L1 distance
       between counts and targets (ties: the split proportionally furthest from full).
    2. Repair: single-group moves, then pairwise swaps of groups between splits, applied while
       they lower that distance. Every accepted change lowers an integer, so this ends.
    """
    filled = {name: Counter() for name in SPLITS}
    target_sums = {name: sum(targets[name].values()) for name in SPLITS}

    def change(name: str, add: Counter, remove: Counter | None = None) -> int:
        """L1 change of split ``name`` when ``add`` joins it and ``remove`` leaves it."""
        total = 0
        for c in set(add) | set(remove or ()):
            now = filled[name][c] - targets[name][c]
            total += abs(now + add[c] - (remove[c] if remove else 0)) - abs(now)
        return total

    def emptiness(name: str) -> Fraction:
        if target_sums[name] == 0:
            return Fraction(0)
        need = sum(max(0, targets[name][c] - filled[name][c]) for c in targets[name])
        return Fraction(need, target_sums[name])

    order = sorted(group_counts)
    random.Random(f"roseprior-split:{seed}").shuffle(order)
    where: dict[str, str] = {}
    for key in order:
        counts = group_counts[key]
        best = min(SPLITS, key=lambda name: (change(name, counts), -emptiness(name), SPLITS.index(name)))
        where[key] = best
        filled[best].update(counts)

    def move(key: str, dst: str) -> None:
        filled[where[key]].subtract(group_counts[key])
        filled[dst].update(group_counts[key])
        where[key] = dst

    improved = True
    while improved:
        improved = False
        for key in order:
            counts, src = group_counts[key], where[key]
            for dst in SPLITS:
                if dst != src and change(src, Counter(), counts) + change(dst, counts) < 0:
                    move(key, dst)
                    improved = True
                    break
        if improved or len(order) > _MAX_GROUPS_FOR_SWAPS:
            continue
        for i, a in enumerate(order):
            for b in order[i + 1 :]:
                split_a, split_b = where[a], where[b]
                if split_a == split_b:
                    continue
                ca, cb = group_counts[a], group_counts[b]
                if change(split_a, cb, ca) + change(split_b, ca, cb) < 0:
                    move(a, split_b)
                    move(b, split_a)
                    improved = True
    return where


# ---------------------------------------------------------------------------------------------
# The resolver every stage uses
# ---------------------------------------------------------------------------------------------


@dataclass
class SplitSet:
    """The train/val/test lists of one data set under one set of split settings, and how they were made."""

    splits: dict[str, list[Sample]]
    source: str  # how the lists were obtained (shown in reports)
    fingerprint: str = ""  # of the (split, path, label) lists: equal fingerprints, equal splits

    def __post_init__(self) -> None:
        self.fingerprint = self.fingerprint or split_fingerprint(self.splits)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.splits[name]) for name in SPLITS}

    def describe(self) -> dict[str, object]:
        """What a run records in its provenance."""
        return {"source": self.source, "fingerprint": self.fingerprint, "sizes": self.sizes()}

    def readable(self, out_dir: str | Path | None, max_fraction: float) -> SplitSet:
        """The same split without the images that do not decode (one pass, listed in
        ``out_dir/skipped_files.csv``); train and val must keep images. The fingerprint stays the
        split's own, so every stage records the same one."""
        from roseprior.data import filter_readable

        everything = [s for name in SPLITS for s in self.splits[name]]
        readable = {s.path for s in filter_readable(everything, out_dir, max_fraction)}
        kept = {name: [s for s in self.splits[name] if s.path in readable] for name in SPLITS}
        for name in ("train", "val"):
            if not kept[name]:
                raise DataError(f"the {name} split is empty ({self.source}); add images or change data.split_ratios")
        return SplitSet(kept, self.source, self.fingerprint)


def split_fingerprint(splits: dict[str, list[Sample]]) -> str:
    """A digest of which image (absolute path) with which label is in which split."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for path, label, zoom in sorted((os.path.abspath(s.path), s.label, s.zoom or 0) for s in splits.get(name, [])):
            digest.update((f"{name}\0{path}\0{label}" + (f"\0{zoom:.6g}" if zoom else "") + "\n").encode())
    return digest.hexdigest()[:20]


def resolve_splits(data_cfg, root: str | Path | None = None) -> SplitSet:
    """The one rule by which every stage gets train/val/test for ``data_cfg`` (a ``DataConfig``).

    In order: ``data.split_dir`` (CSVs from ``roseprior split``); the data's own split (``train/``,
    ``val/``, ``test/`` folders, or a manifest ``split`` column); else ``split_samples`` with
    ``data.split_ratios`` and ``data.group_by``, seeded by ``data.split_seed`` alone, so the same
    data and settings give the same lists in pretrain, finetune, the probes and the benchmarks.
    With no validation images, a fifth of train (grouped alike) becomes validation. Nothing is
    decoded or written here: ``SplitSet.readable`` drops unreadable images.
    """
    from roseprior.data import resolve_root

    root = Path(root) if root is not None else resolve_root(data_cfg)
    classes, seed = list(data_cfg.classes), data_cfg.split_seed
    if data_cfg.split_dir:
        splits = {name: load_labelled(root, classes, split=name, split_dir=data_cfg.split_dir) for name in SPLITS}
        source = f"split files in {data_cfg.split_dir}"
    elif has_split_folders(root, classes):
        splits = {name: load_labelled(root, classes, split=name) if (root / name).is_dir() else [] for name in SPLITS}
        source = f"split folders under {root}"
    else:
        samples = load_labelled(root, classes)
        own = {s.extra.get("split", "").strip() for s in samples}
        if own <= set(SPLITS) and "train" in own:
            splits = {name: [s for s in samples if s.extra["split"].strip() == name] for name in SPLITS}
            source = f"the 'split' column of {root}"
        else:
            splits = split_samples(samples, data_cfg.split_ratios, group_by=data_cfg.group_by, seed=seed)
            source = (f"{data_cfg.split_ratios} split of {root}"
                      + (f" grouped by {data_cfg.group_by}" if data_cfg.group_by else "") + f", split_seed {seed}")
    if not splits["val"] and splits["train"]:
        inner = split_samples(splits["train"], "4:1:0", group_by=data_cfg.group_by, seed=seed)
        splits["train"], splits["val"] = inner["train"], inner["val"]
        source += "; val carved from train (4:1)"
    return SplitSet({name: with_scales(part, data_cfg) for name, part in splits.items()}, source)


IMAGE_LIST = "training_images.csv"


def write_image_list(out_dir: str | Path, parts: dict[str, Sequence[Sample]]) -> Path:
    """``out_dir/training_images.csv`` (path, split): the images a run trained or selected on, so the
    probes can tell when a checkpoint has seen their test images."""
    from roseprior.checkpoint import atomic_write_csv

    return atomic_write_csv(Path(out_dir) / IMAGE_LIST, ["path", "split"],
                            ([os.path.realpath(s.path), name] for name, samples in parts.items() for s in samples))


def read_image_list(folder: str | Path) -> dict[str, str] | None:
    """``{real path: split}`` from a run folder's ``training_images.csv``; None when it has none."""
    path = Path(folder) / IMAGE_LIST
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: row["split"] for row in csv.DictReader(fh)}


def has_split_folders(root: Path, classes: Sequence[str]) -> bool:
    """Whether ``root`` holds its own split as ``train/``, ``val/``, ``test/`` folders (not class folders)."""
    return root.is_dir() and (root / "train").is_dir() and not any((root / c).is_dir() for c in classes)


def load_as_laid_out(root: str | Path, classes: Sequence[str]) -> list[Sample]:
    """Every image under ``root`` with all that its layout says of it, for tools that write a manifest back
    (``roseprior scale``): a labelled set as every stage reads it (label; ``domain`` from site folders; its own
    split in ``extra["split"]``, from split folders or a manifest column; a manifest's other columns), an
    unlabelled manifest as it is, and any other folder as every image in it, labelled by ``class_from_folders``."""
    root = Path(root)
    if has_split_folders(root, classes):
        return [replace(s, extra={**s.extra, "split": name}) for name in SPLITS if (root / name).is_dir()
                for s in load_labelled(root, classes, split=name)]
    if is_labelled(root, classes):
        return load_labelled(root, classes)
    return load_where_known(root, classes)  # a folder with no image is refused in one line, not written as an empty CSV


def is_labelled(root: Path, classes: Sequence[str]) -> bool:
    """Whether ``root`` is a labelled set (split files aside): class folders, split folders, folders of
    class folders per domain, or a manifest with a ``label`` column."""
    manifest = root if root.is_file() else root / MANIFEST_NAME
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            return "label" in [c.strip() for c in next(csv.reader(fh), [])]
    if not root.is_dir():
        return False
    if (root / "train").is_dir() or any((root / c).is_dir() for c in classes):
        return True
    return any(all((d / c).is_dir() for c in classes) for d in root.iterdir() if d.is_dir())


# ---------------------------------------------------------------------------------------------
# Outputs: CSVs, symlink tree, duplicate report
# ---------------------------------------------------------------------------------------------


def write_split_csvs(splits: dict[str, list[Sample]], out: str | Path, classes: Sequence[str]) -> list[Path]:
    """Write ``out/{train,val,test}.csv``: absolute path, class name, then the source's columns."""
    from roseprior.checkpoint import atomic_write_csv

    columns = manifest_columns([s for name in SPLITS for s in splits[name]])
    return [atomic_write_csv(Path(out) / f"{name}.csv", columns,
                             (manifest_row(s, columns, classes, os.path.abspath(s.path)) for s in splits[name]))
            for name in SPLITS]


def write_link_tree(splits: dict[str, list[Sample]], out: str | Path, classes: Sequence[str]) -> Path:
    """Build ``out/{train,val,test}/{class}/`` of symlinks to the images (an ImageFolder tree)."""
    out = Path(out)
    for name in SPLITS:
        _remove_link_tree(out / name, strict=True)
        for cls in classes:
            (out / name / cls).mkdir(parents=True, exist_ok=True)
        used: dict[int, set[str]] = defaultdict(set)
        for s in splits[name]:
            target = Path(os.path.abspath(s.path))
            link_name = _unique_name(target.name, used[s.label])
            (out / name / classes[s.label] / link_name).symlink_to(target)
    return out


def _unique_name(name: str, used: set[str]) -> str:
    """``a.jpg``, then ``a_1.jpg``, ``a_2.jpg``: manifests may hold equal file names in different folders."""
    candidate, k = name, 0
    stem, suffix = os.path.splitext(name)
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}{suffix}"
    used.add(candidate)
    return candidate


def _remove_link_tree(root: Path, strict: bool) -> bool:
    """Remove a symlink tree left by an earlier ``--link`` run; never touch a real file.

    With ``strict``, a tree holding real files is an error; otherwise it is left alone.
    """
    if not root.exists() and not root.is_symlink():
        return True
    real_files = [
        Path(d) / f for d, _, files in os.walk(root) for f in files if not (Path(d) / f).is_symlink()
    ]
    if real_files:
        if strict:
            raise DataError(
                f"{root} holds real files (e.g. {real_files[0]}), not links from an earlier "
                f"`roseprior split --link`; choose another --out"
            )
        return False
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            (Path(dirpath) / f).unlink()
        for d in dirnames:
            p = Path(dirpath) / d
            p.unlink() if p.is_symlink() else p.rmdir()
    root.rmdir()
    return True


def _file_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_cross_split_duplicates(splits: dict[str, list[Sample]]) -> list[tuple[str, str, str]]:
    """``(hash, split, path)`` for every file whose exact bytes also appear in another split, or in the
    same split under another label (the same image called both N and P).

    Only files whose size matches another file's are hashed (equal bytes need equal sizes), so a
    typical data set is mostly stat-ed, not read.
    """
    from roseprior.progress import Progress

    by_size: dict[int, list[tuple[str, Sample]]] = defaultdict(list)
    for name in SPLITS:
        for s in splits[name]:
            by_size[os.path.getsize(s.path)].append((name, s))
    candidates = [item for items in by_size.values() if len(items) > 1 for item in items]
    by_hash: dict[str, list[tuple[str, Sample]]] = defaultdict(list)
    with Progress(len(candidates), "hashing for duplicates", unit="file",
                  enabled=len(candidates) > _PROGRESS_MIN) as progress:
        for name, sample in candidates:
            by_hash[_file_hash(sample.path)].append((name, sample))
            progress.update()
    rows = [
        (digest, name, sample.path)
        for digest, items in by_hash.items()
        if len({n for n, _ in items}) > 1 or len({s.label for _, s in items}) > 1
        for name, sample in items
    ]
    return sorted(rows, key=lambda r: (r[0], SPLITS.index(r[1]), r[2]))


def write_duplicates_csv(rows: list[tuple[str, str, str]], out: str | Path) -> Path:
    """``out/duplicates_across_splits.csv`` (hash,split,path); header only when there are none."""
    from roseprior.checkpoint import atomic_write_csv

    return atomic_write_csv(Path(out) / DUPLICATES_NAME, ["hash", "split", "path"], rows)


# ---------------------------------------------------------------------------------------------
# roseprior split
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "split",
        help="split a labelled image set into train/val/test (per class, seeded, optionally grouped)",
        description=(
            "Split a class-folder tree or a manifest into OUT/train.csv, val.csv, test.csv "
            "(absolute paths; read back with data.split_dir=OUT). Per class: val = floor(n*r_val), "
            "test = floor(n*r_test), train = the rest. With --group-by no group straddles splits."
        ),
    )
    parser.add_argument("--src", required=True, help="class-folder tree (SRC/N, SRC/P) or manifest .csv")
    parser.add_argument("--out", required=True, help="output folder for train.csv, val.csv, test.csv")
    parser.add_argument("--ratios", default="7:2:1", help="train:val:test, e.g. 7:2:1, 70:20:10, 0.7:0.2:0.1")
    parser.add_argument(
        "--group-by", default=None, metavar="COLUMN", help="manifest column kept whole (slide, patient)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the shuffle (default 0)")
    parser.add_argument(
        "--link", action="store_true", help="also build OUT/{train,val,test}/{class}/ of symlinks"
    )
    parser.add_argument(
        "--classes", default="N,P", help="class names in label order, comma-separated (default N,P)"
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier split in --out (a folder `roseprior split` wrote)")
    parser.set_defaults(func=run_split)
    return parser


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be new or empty, or (with ``--overwrite``) an earlier ``roseprior split`` output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder")
    if not any(out.iterdir()):
        return
    if not (out / "split.json").is_file():
        raise DataError(f"--out {out} is not empty and holds no split.json from an earlier `roseprior split`; "
                        "choose a new folder")
    if not overwrite:
        raise DataError(f"--out {out} holds an earlier split; pass --overwrite to replace it, or choose a new folder")
    for name in SPLITS:  # what would block the link tree is found before anything is written
        tree = out / name
        real = [Path(d) / f for d, _, files in os.walk(tree) for f in files if not (Path(d) / f).is_symlink()]
        if real:
            raise DataError(f"{tree} holds real files (e.g. {real[0]}), not links from an earlier "
                            "`roseprior split --link`; choose another --out")


def empty_parts(splits: dict[str, list[Sample]], classes: Sequence[str]) -> list[str]:
    """``"val/P"`` for every split that holds no image of a class."""
    return [f"{name}/{cls}" for name in SPLITS for i, cls in enumerate(classes)
            if not any(s.label == i for s in splits[name])]


def run_split(args: argparse.Namespace) -> int:
    from roseprior.checkpoint import atomic_write_json

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    ratios = parse_ratios(args.ratios)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    samples = load_labelled(args.src, classes)
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(samples)} listed images do not exist (e.g. {missing[0]}); fix {args.src}"
        )
    for s in samples:  # a link tree (an earlier --link output) points at the real images: list those
        s.path = os.path.realpath(s.path)
    splits = split_samples(samples, ratios, group_by=args.group_by, seed=args.seed)

    write_split_csvs(splits, out, classes)
    if args.link:
        write_link_tree(splits, out, classes)
    else:
        for name in SPLITS:  # a stale link tree from an earlier --link run would disagree with the CSVs
            _remove_link_tree(out / name, strict=False)
    duplicates = find_cross_split_duplicates(splits)
    dup_csv = write_duplicates_csv(duplicates, out)

    counts = {
        name: {cls: sum(s.label == i for s in splits[name]) for i, cls in enumerate(classes)}
        for name in SPLITS
    }
    groups = (
        {name: len({group_key(s, args.group_by) for s in splits[name]}) for name in SPLITS}
        if args.group_by
        else None
    )
    atomic_write_json(
        out / "split.json",
        {
            "src": os.path.abspath(args.src),
            "ratios": args.ratios,
            "seed": args.seed,
            "group_by": args.group_by,
            "classes": classes,
            "counts": counts,
            "groups": groups,
            "paths": "absolute",
            "fingerprint": split_fingerprint(splits),
        },
    )

    header = (
        f"{'split':<6}"
        + "".join(f"{c:>8}" for c in classes)
        + f"{'total':>8}"
        + (f"{'groups':>8}" if groups else "")
    )
    print(header)
    for name in SPLITS:
        row = f"{name:<6}" + "".join(f"{counts[name][c]:>8}" for c in classes) + f"{len(splits[name]):>8}"
        print(row + (f"{groups[name]:>8}" if groups else ""))
    print(f"wrote {out}/train.csv, val.csv, test.csv" + (" and the --link tree" if args.link else ""))
    empty = empty_parts(splits, classes)
    if empty:
        print(f"warning: {', '.join(empty)} hold no images (a class too small for ratios {args.ratios}); "
              "a stage given this split cannot train, select or score that class there", file=sys.stderr)
    if duplicates:
        n_sets = len({d for d, _, _ in duplicates})
        print(
            f"warning: {n_sets} set(s) of identical files fall in more than one split or carry two labels, so "
            f"they leak between training and evaluation or contradict each other; see {dup_csv}",
            file=sys.stderr,
        )
    return 0
