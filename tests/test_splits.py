"""Splits: the documented size rule, group integrity, determinism, the CSV/link outputs and `roseprior split`."""

from __future__ import annotations

import csv
import os
import random
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from roseprior import cli
from roseprior.data import Sample, load_labelled
from roseprior.errors import ConfigError, DataError
from roseprior.splits import (
    SPLITS,
    assign_groups,
    find_cross_split_duplicates,
    parse_ratios,
    split_samples,
    split_sizes,
    write_split_csvs,
)

USERS_CLASSES = {0: 1852, 1: 1240}  # the users' N and P counts


def _fake_samples(counts: dict[int, int], groups: int | None = None, seed: int = 0) -> list[Sample]:
    """Fake samples (no files); with ``groups``, each gets a random group that may mix classes."""
    rng = random.Random(seed)
    samples = []
    for label, n in counts.items():
        for i in range(n):
            extra = {"slide": f"s{rng.randrange(groups)}"} if groups else {}
            samples.append(Sample(f"/data/{label}/{i:05d}.png", label, extra=extra))
    return samples


def _counts(splits: dict[str, list[Sample]]) -> dict[str, tuple[int, int]]:
    return {name: (sum(s.label == 0 for s in v), sum(s.label == 1 for s in v)) for name, v in splits.items()}


# ----------------------------------------------------------------------------------------------
# Ratios and the size rule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["7:2:1", "70:20:10", "0.7:0.2:0.1", (0.7, 0.2, 0.1), (7, 2, 1)])
def test_parse_ratios_forms_agree(text):
    assert parse_ratios(text) == (Fraction(7, 10), Fraction(1, 5), Fraction(1, 10))


@pytest.mark.parametrize("bad", ["7:2", "a:b:c", "-1:1:1", "0:0:0", "7:2:1:1"])
def test_parse_ratios_refuses(bad):
    with pytest.raises(ConfigError, match="ratios"):
        parse_ratios(bad)


@pytest.mark.parametrize(
    "ratios, expected_n, expected_p",
    [
        ("7:2:1", (1297, 370, 185), (868, 248, 124)),
        ("0.7:0.2:0.1", (1297, 370, 185), (868, 248, 124)),
        ("7:1:2", (1297, 185, 370), (868, 124, 248)),
        ((0.7, 0.1, 0.2), (1297, 185, 370), (868, 124, 248)),
    ],
)
def test_users_split_sizes(ratios, expected_n, expected_p):
    for n, expected in [(1852, expected_n), (1240, expected_p)]:
        sizes = split_sizes(n, ratios)
        assert (sizes["train"], sizes["val"], sizes["test"]) == expected


def test_split_sizes_use_exact_fractions():
    # In floats 100 * 0.29 is 28.999999999999996, which floors to 28; exactly it is 29.
    assert split_sizes(100, "0.61:0.29:0.1") == {"train": 61, "val": 29, "test": 10}
    assert split_sizes(100, (0.61, 0.29, 0.1)) == {"train": 61, "val": 29, "test": 10}
    assert split_sizes(10, "8:2:0") == {"train": 8, "val": 2, "test": 0}


@pytest.mark.parametrize("ratios", ["7:2:1", "7:1:2"])
def test_split_samples_gives_the_users_counts(ratios):
    splits = split_samples(_fake_samples(USERS_CLASSES), ratios, seed=3)
    expected = {
        "7:2:1": {"train": (1297, 868), "val": (370, 248), "test": (185, 124)},
        "7:1:2": {"train": (1297, 868), "val": (185, 124), "test": (370, 248)},
    }[ratios]
    assert _counts(splits) == expected
    paths = [s.path for name in SPLITS for s in splits[name]]
    assert len(paths) == len(set(paths)) == 1852 + 1240  # every sample once


def test_split_is_deterministic_and_seeded():
    samples = _fake_samples({0: 60, 1: 40})
    first = split_samples(samples, "7:2:1", seed=5)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert split_samples(shuffled, "7:2:1", seed=5) == first  # input order does not matter
    other = split_samples(samples, "7:2:1", seed=6)
    assert {s.path for s in other["test"]} != {s.path for s in first["test"]}


def test_repeated_paths_refused():
    samples = _fake_samples({0: 5, 1: 5})
    with pytest.raises(DataError, match="listed more than once"):
        split_samples(samples + samples[:1])


# ----------------------------------------------------------------------------------------------
# Grouped splits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_groups_never_straddle_splits(seed):
    samples = _fake_samples({0: 300, 1: 140}, groups=35, seed=seed)  # groups mix both classes
    splits = split_samples(samples, "7:2:1", group_by="slide", seed=seed)
    where: dict[str, set[str]] = {}
    for name, members in splits.items():
        for s in members:
            where.setdefault(s.extra["slide"], set()).add(name)
    assert all(len(names) == 1 for names in where.values()), {g: n for g, n in where.items() if len(n) > 1}
    assert sorted(s.path for v in splits.values() for s in v) == sorted(s.path for s in samples)
    # Each split lands near its per-class target (within one group's size).
    biggest = max(Counter((s.extra["slide"], s.label) for s in samples).values())
    for label, n in ((0, 300), (1, 140)):
        for name, target in split_sizes(n, "7:2:1").items():
            assert abs(sum(s.label == label for s in splits[name]) - target) <= biggest


def test_grouped_split_is_deterministic_and_varies_with_seed():
    samples = _fake_samples({0: 200, 1: 100}, groups=40)
    a = split_samples(samples, "7:2:1", group_by="slide", seed=0)
    assert split_samples(list(reversed(samples)), "7:2:1", group_by="slide", seed=0) == a
    b = split_samples(samples, "7:2:1", group_by="slide", seed=1)
    assert {s.extra["slide"] for s in a["test"]} != {s.extra["slide"] for s in b["test"]}


def test_assign_groups_reaches_exact_targets_when_possible():
    # Twelve groups of 5 N + 5 P; 6:3:3 of 60 per class can be met exactly (6, 3 and 3 groups).
    groups = {f"g{i}": Counter({0: 5, 1: 5}) for i in range(12)}
    targets = {
        "train": Counter({0: 30, 1: 30}),
        "val": Counter({0: 15, 1: 15}),
        "test": Counter({0: 15, 1: 15}),
    }
    for seed in range(10):
        where = assign_groups(groups, targets, seed)
        assert Counter(where.values()) == {"train": 6, "val": 3, "test": 3}


def test_group_column_errors():
    samples = _fake_samples({0: 5, 1: 5}, groups=3)
    with pytest.raises(DataError, match="cannot group by 'patient'.*slide"):
        split_samples(samples, group_by="patient")
    samples[0].extra["slide"] = " "
    with pytest.raises(DataError, match="1 image\\(s\\) have no 'slide' value"):
        split_samples(samples, group_by="slide")


# ----------------------------------------------------------------------------------------------
# Outputs and the command
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def src_tree(tmp_path, write_image) -> Path:
    """20 N and 10 P distinct images."""
    root = tmp_path / "src"
    for i in range(20):
        write_image(root / "N" / f"n{i:02d}.png", seed=i)
    for i in range(10):
        write_image(root / "P" / f"p{i:02d}.png", seed=100 + i)
    return root


def test_csvs_read_back_with_load_labelled(tmp_path):
    samples = [
        Sample("/d/a.png", 0, domain="x", extra={"slide": "s1"}),
        Sample("/d/b.png", 1, group="g", extra={"slide": "s2", "mag": "20"}),
    ]
    splits = {"train": samples, "val": [], "test": []}
    write_split_csvs(splits, tmp_path, ["N", "P"])
    assert (tmp_path / "train.csv").read_text().splitlines()[0] == "path,label,domain,group,slide,mag"
    assert load_labelled("unused", ["N", "P"], split="train", split_dir=tmp_path) == [
        Sample("/d/a.png", 0, "x", None, {"slide": "s1", "mag": ""}),
        Sample("/d/b.png", 1, None, "g", {"slide": "s2", "mag": "20"}),
    ]
    assert (tmp_path / "val.csv").read_text() == "path,label,domain,group,slide,mag\n"


def test_cli_split_with_link_tree(src_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(
            ["split", "--src", str(src_tree), "--out", str(out), "--ratios", "7:2:1", "--link", "--seed", "1"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train" in printed and "14       7" in printed  # N 14, P 7 in train
    for split, (n_n, n_p) in {"train": (14, 7), "val": (4, 2), "test": (2, 1)}.items():
        from_csv = load_labelled(out, ["N", "P"], split=split, split_dir=out)
        assert Counter(s.label for s in from_csv) == {0: n_n, 1: n_p}
        assert all(os.path.isabs(s.path) and Path(s.path).is_relative_to(src_tree) for s in from_csv)
        # The link tree is an ImageFolder copy of the same split, pointing at the source files.
        links = sorted((out / split).rglob("*.png"))
        assert all(p.is_symlink() for p in links)
        assert sorted(os.path.realpath(p) for p in links) == sorted(
            os.path.realpath(s.path) for s in from_csv
        )
        from_tree = load_labelled(out, ["N", "P"], split=split)
        assert sorted((Path(s.path).name, s.label) for s in from_tree) == sorted(
            (Path(s.path).name, s.label) for s in from_csv
        )
    assert (out / "duplicates_across_splits.csv").read_text() == "hash,split,path\n"
    # A rerun replaces the link tree (no stale links); without --link the old tree is removed.
    assert cli.main(["split", "--src", str(src_tree), "--out", str(out), "--seed", "2", "--link", "--overwrite"]) == 0
    assert len(list((out / "train").rglob("*.png"))) == 21
    assert cli.main(["split", "--src", str(src_tree), "--out", str(out), "--seed", "2", "--overwrite"]) == 0
    assert not (out / "train").exists()


def test_cli_reports_duplicates_across_splits(src_tree, tmp_path, capsys):
    # Eight byte-identical copies among the N images: 8 copies of 20 cannot all land in one split.
    for i in range(1, 8):
        shutil.copyfile(src_tree / "N" / "n00.png", src_tree / "N" / f"n{i:02d}.png")
    out = tmp_path / "out"
    assert cli.main(["split", "--src", str(src_tree), "--out", str(out)]) == 0
    assert "identical files fall in more than one split" in capsys.readouterr().err
    with open(out / "duplicates_across_splits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["hash"] for r in rows}) == 1 and len({r["split"] for r in rows}) >= 2
    assert {Path(r["path"]).name for r in rows} <= {f"n{i:02d}.png" for i in range(8)}


def test_find_duplicates_ignores_copies_within_one_split(tmp_path, write_image):
    a = write_image(tmp_path / "a.png", seed=1)
    shutil.copyfile(a, tmp_path / "a_copy.png")
    b = write_image(tmp_path / "b.png", seed=2)
    shutil.copyfile(b, tmp_path / "b_copy.png")
    splits = {
        "train": [Sample(str(a), 0), Sample(str(tmp_path / "a_copy.png"), 0), Sample(str(b), 0)],
        "val": [Sample(str(tmp_path / "b_copy.png"), 1)],
        "test": [],
    }
    rows = find_cross_split_duplicates(splits)
    assert [(split, Path(p).name) for _, split, p in rows] == [("train", "b.png"), ("val", "b_copy.png")]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["split", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("roseprior split: error:") and "does not exist" in err and "\n" not in err
    assert cli.main(["split", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--ratios", "7:3"]) == 2
    assert "three numbers" in capsys.readouterr().err


def test_cric_cells_grouped_by_field(shared_data, tmp_path):
    src = shared_data / "cric_cells"
    if not (src / "manifest.csv").is_file():
        pytest.skip(f"{src}/manifest.csv not found")
    out = tmp_path / "cric"
    assert cli.main(["split", "--src", str(src), "--out", str(out), "--group-by", "source_image"]) == 0
    fields: dict[str, set[str]] = {}
    total = 0
    for split in SPLITS:
        samples = load_labelled(src, ["N", "P"], split=split, split_dir=out)
        total += len(samples)
        for s in samples:
            fields.setdefault(s.extra["source_image"], set()).add(split)
    straddling = {f: s for f, s in fields.items() if len(s) > 1}
    assert not straddling, f"fields in more than one split: {straddling}"
    assert total == len(load_labelled(src, ["N", "P"]))


# ----------------------------------------------------------------------------------------------
# The resolver every stage uses
# ----------------------------------------------------------------------------------------------


def test_resolver_depends_on_split_settings_only(src_tree, tmp_path):
    from roseprior.config import DataConfig
    from roseprior.splits import resolve_splits

    cfg = DataConfig(root=str(src_tree))
    first, again = resolve_splits(cfg), resolve_splits(cfg)
    assert first.fingerprint == again.fingerprint and first.sizes() == {"train": 21, "val": 6, "test": 3}
    assert first.source.startswith("7:2:1 split") and "split_seed 0" in first.source
    other = resolve_splits(DataConfig(root=str(src_tree), split_seed=1))
    assert other.fingerprint != first.fingerprint and other.sizes() == first.sizes()
    # The same lists as `roseprior split` with the same seed, read back through data.split_dir.
    assert cli.main(["split", "--src", str(src_tree), "--out", str(tmp_path / "s"), "--seed", "0"]) == 0
    from_dir = resolve_splits(DataConfig(root=str(src_tree), split_dir=str(tmp_path / "s")))
    assert from_dir.fingerprint == first.fingerprint and from_dir.source.startswith("split files")


def test_resolver_reads_the_datas_own_split_and_carves_a_missing_val(tmp_path, write_image):
    from roseprior.config import DataConfig
    from roseprior.splits import resolve_splits

    for split, n in (("train", 10), ("test", 4)):
        for label in ("N", "P"):
            for i in range(n):
                write_image(tmp_path / "d" / split / label / f"{label}{i}.png", seed=hash((split, label, i)) % 999)
    resolved = resolve_splits(DataConfig(root=str(tmp_path / "d")))
    assert resolved.sizes() == {"train": 16, "val": 4, "test": 8}
    assert "split folders" in resolved.source and "val carved from train" in resolved.source
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"{tmp_path / 'd' / 'train' / lab / f'{lab}{i}.png'},{lab},{'val' if i < 2 else 'train'}\n"
        for lab in ("N", "P") for i in range(10)) + "".join(
        f"{tmp_path / 'd' / 'test' / lab / f'{lab}{i}.png'},{lab},test\n" for lab in ("N", "P") for i in range(4)))
    own = resolve_splits(DataConfig(root=str(manifest)))
    assert own.sizes() == {"train": 16, "val": 4, "test": 8} and "'split' column" in own.source
