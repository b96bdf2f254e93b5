"""Loading labelled and unlabelled images from folder trees and manifests; the decoding check; the dataset."""

from __future__ import annotations

import csv
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from roseprior.config import DataConfig
from roseprior.data import (
    ImageDataset,
    Sample,
    filter_readable,
    find_images,
    load_labelled,
    load_unlabeled,
    resolve_root,
)
from roseprior.errors import DataError


@pytest.fixture
def class_tree(tmp_path, write_image) -> Path:
    """root/N has 3 images, root/P has 2 (one nested in a subfolder)."""
    root = tmp_path / "tree"
    for i in range(3):
        write_image(root / "N" / f"n{i}.png", seed=i)
    write_image(root / "P" / "p0.jpg", seed=10)
    write_image(root / "P" / "sub" / "p1.png", seed=11)
    return root


# ----------------------------------------------------------------------------------------------
# find_images / load_unlabeled
# ----------------------------------------------------------------------------------------------


def test_find_images_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path, write_image):
    write_image(tmp_path / "b" / "z.png")
    write_image(tmp_path / "a.JPG", format="JPEG")
    write_image(tmp_path / "b" / "c" / "d.tiff")
    write_image(tmp_path / ".hidden" / "x.png")
    write_image(tmp_path / "b" / ".dot.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "manifest.csv").write_text("path,label\n")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.JPG", "b/c/d.tiff", "b/z.png"]


def test_find_images_follows_symlinked_folders_once(tmp_path, write_image):
    write_image(tmp_path / "data" / "img.png")
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data")  # a loop must not recurse forever
    assert [p.name for p in find_images(tmp_path / "data")] == ["img.png"]


def test_load_unlabeled(class_tree, tmp_path):
    samples = load_unlabeled(class_tree)
    assert len(samples) == 5 and all(s.label == -1 for s in samples)
    assert [Path(s.path).name for s in samples] == ["n0.png", "n1.png", "n2.png", "p0.jpg", "p1.png"]
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no images under"):
        load_unlabeled(tmp_path / "none")
    with pytest.raises(DataError, match="does not exist"):
        load_unlabeled(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# load_labelled: folder trees
# ----------------------------------------------------------------------------------------------


def test_class_folders_label_order_comes_from_classes(class_tree):
    samples = load_labelled(class_tree, ["N", "P"])
    assert [(Path(s.path).name, s.label) for s in samples] == [
        ("n0.png", 0), ("n1.png", 0), ("n2.png", 0), ("p0.jpg", 1), ("p1.png", 1),
    ]  # fmt: skip
    # Reversed class list: P becomes 0 even though "N" < "P" alphabetically.
    reversed_labels = {Path(s.path).name: s.label for s in load_labelled(class_tree, ["P", "N"])}
    assert reversed_labels["p0.jpg"] == 0 and reversed_labels["n0.png"] == 1


def test_split_level_tree(tmp_path, write_image):
    root = tmp_path / "721"
    for split, n in [("train", 3), ("val", 2), ("test", 1)]:
        for cls in "NP":
            for i in range(n):
                write_image(root / split / cls / f"{split}_{cls}{i}.png", seed=i)
    train = load_labelled(root, ["N", "P"], split="train")
    assert len(train) == 6 and all("train_" in Path(s.path).name for s in train)
    assert sorted(s.label for s in load_labelled(root, ["N", "P"], split="test")) == [0, 1]
    assert len(load_labelled(root, ["N", "P"])) == 12  # no split given: all of them
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_labelled(root, ["N", "P"], split="dev")


def test_empty_class_folder(class_tree):
    for f in (class_tree / "P").rglob("*.*"):
        f.unlink()
    with pytest.raises(DataError) as info:
        load_labelled(class_tree, ["N", "P"])
    assert f"class folder {class_tree / 'P'} is empty" in str(info.value)


def test_missing_class_folder(class_tree):
    with pytest.raises(DataError) as info:
        load_labelled(class_tree, ["N", "P", "X"])
    message = str(info.value)
    assert f"class folder {class_tree / 'X'} is missing" in message and "found N, P" in message


def test_folder_that_is_not_a_class(class_tree, write_image):
    write_image(class_tree / "Q" / "q.png")
    with pytest.raises(DataError, match="'Q' is not one of the classes N, P"):
        load_labelled(class_tree, ["N", "P"])


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_labelled(tmp_path / "nope", ["N", "P"])


# ----------------------------------------------------------------------------------------------
# load_labelled: manifests
# ----------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_in_root_folder_wins_and_keeps_columns(class_tree):
    _write_csv(
        class_tree / "manifest.csv",
        [
            {"path": "P/p0.jpg", "label": "P", "domain": "scanner1", "group": "slide7", "mag": "20x"},
            {"path": "N/n0.png", "label": "N", "domain": "", "group": "slide7", "mag": "40x"},
        ],
    )
    samples = load_labelled(class_tree, ["N", "P"])
    assert samples[0] == Sample(str(class_tree / "P/p0.jpg"), 1, "scanner1", "slide7", {"mag": "20x"})
    assert samples[1] == Sample(str(class_tree / "N/n0.png"), 0, None, "slide7", {"mag": "40x"})


def test_manifest_file_paths_relative_to_its_folder(tmp_path, class_tree):
    manifest = _write_csv(tmp_path / "lists" / "m.csv", [{"path": "../tree/N/n1.png", "label": "N"}])
    with pytest.warns(UserWarning, match="no rows of class P"):
        (sample,) = load_labelled(manifest, ["N", "P"])
    assert Path(sample.path).resolve() == (class_tree / "N" / "n1.png").resolve()


def test_manifest_label_not_in_classes(tmp_path):
    manifest = _write_csv(
        tmp_path / "m.csv", [{"path": "a.png", "label": "N"}, {"path": "b.png", "label": "ASC-H"}]
    )
    with pytest.raises(DataError) as info:
        load_labelled(manifest, ["N", "P"])
    message = str(info.value)
    assert str(manifest) in message and "line 3" in message
    assert "label 'ASC-H'" in message and "b.png" in message and "classes N, P" in message


def test_manifest_without_label_column(tmp_path):
    manifest = _write_csv(tmp_path / "m.csv", [{"path": "a.png", "class": "N"}])
    with pytest.raises(DataError, match="lacks the column"):
        load_labelled(manifest, ["N", "P"])
    assert load_unlabeled(manifest)[0].label == -1  # fine as an unlabelled list


def test_manifest_split_column(tmp_path):
    rows = [
        {"path": "a.png", "label": "N", "split": "train"},
        {"path": "b.png", "label": "P", "split": "val"},
        {"path": "c.png", "label": "N", "split": "val"},
        {"path": "d.png", "label": "Z", "split": "val"},
    ]
    _write_csv(tmp_path / "manifest.csv", rows)
    assert [Path(s.path).name for s in load_labelled(tmp_path, ["N", "P", "Z"], split="val")] == [
        "b.png",
        "c.png",
        "d.png",
    ]
    with pytest.raises(DataError, match="line 5: label 'Z'"):  # line numbers count filtered-out rows too
        load_labelled(tmp_path, ["N", "P"], split="val")


def test_split_csv_read_from_split_dir(tmp_path):
    _write_csv(
        tmp_path / "splits" / "val.csv", [{"path": "/abs/x.png", "label": "P", "source_image": "img1"}]
    )
    with pytest.warns(UserWarning, match="no rows of class N"):
        (sample,) = load_labelled("ignored", ["N", "P"], split="val", split_dir=tmp_path / "splits")
    assert sample.path == "/abs/x.png" and sample.label == 1 and sample.extra == {"source_image": "img1"}
    with pytest.raises(DataError, match="roseprior split"):
        load_labelled("ignored", ["N", "P"], split="test", split_dir=tmp_path / "splits")


# ----------------------------------------------------------------------------------------------
# resolve_root
# ----------------------------------------------------------------------------------------------


def test_resolve_root(tmp_path, monkeypatch):
    assert resolve_root(DataConfig(root=str(tmp_path))) == tmp_path
    with pytest.raises(DataError, match="data.root .* does not exist"):
        resolve_root(DataConfig(root=str(tmp_path / "missing")))
    # root: null -> the synthetic default (a stand-in module, so this test does not generate it)
    fake = types.ModuleType("roseprior.synth")
    fake.default_dataset = lambda: tmp_path / "synthetic"
    monkeypatch.setitem(sys.modules, "roseprior.synth", fake)
    assert resolve_root(DataConfig(root=None)) == tmp_path / "synthetic"


# ----------------------------------------------------------------------------------------------
# filter_readable
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_files(tmp_path, write_image) -> list[Sample]:
    """18 good images, then a zero-byte file and a text file named .jpg."""
    samples = [Sample(str(write_image(tmp_path / "img" / f"{i:02d}.png", seed=i)), i % 2) for i in range(18)]
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "text.jpg").write_text("hello")
    return samples + [
        Sample(str(tmp_path / "img" / "empty.png"), 0),
        Sample(str(tmp_path / "img" / "text.jpg"), 1),
    ]


def test_filter_readable_lists_skipped_files(mixed_files, tmp_path):
    kept = filter_readable(mixed_files, out_dir=tmp_path / "run", max_fraction=0.2)
    assert kept == mixed_files[:18]
    with open(tmp_path / "run" / "skipped_files.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(Path(r["path"]).name, r["reason"].split(" (")[0]) for r in rows] == [
        ("empty.png", "empty file"),
        ("text.jpg", "not an image"),
    ]


def test_filter_readable_threshold(mixed_files, tmp_path):
    with pytest.raises(DataError) as info:
        filter_readable(mixed_files, out_dir=tmp_path / "run", max_fraction=0.05)
    message = str(info.value)
    assert "2 of 20 images (10.0%) could not be read, more than the allowed 5%" in message
    assert str(tmp_path / "run" / "skipped_files.csv") in message
    assert (tmp_path / "run" / "skipped_files.csv").is_file()  # written before failing, to look at


# ----------------------------------------------------------------------------------------------
# ImageDataset
# ----------------------------------------------------------------------------------------------


def test_dataset_items(tmp_path, write_image):
    samples = [Sample(str(write_image(tmp_path / "a.png", size=(40, 30))), 1)]
    image, label, index = ImageDataset(samples, image_size=16)[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 1 and index == 0
    native, _, _ = ImageDataset(samples)[0]
    assert native.shape == (3, 30, 40)
    flipped, _, _ = ImageDataset(samples, transform=lambda x: x.flip(-1))[0]
    assert torch.equal(flipped, native.flip(-1))


def test_dataset_upsamples_tiny_images_with_one_warning(tmp_path, write_image):
    first = write_image(tmp_path / "one_pixel.png", size=(1, 1))
    second = write_image(tmp_path / "two_pixels.png", size=(2, 1))
    dataset = ImageDataset([Sample(str(first), 0), Sample(str(second), 1)], image_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, _, _ = dataset[0]
        dataset[1]
    assert image.shape == (3, 8, 8)
    assert (image == image[:, :1, :1]).all()  # a 1x1 image upsamples to one flat colour
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "one_pixel.png" in messages[0] and "upsampling" in messages[0]


def test_dataset_with_dataloader(class_tree):
    loader = torch.utils.data.DataLoader(
        ImageDataset(load_labelled(class_tree, ["N", "P"]), image_size=8), batch_size=5
    )
    images, labels, indices = next(iter(loader))
    assert (
        images.shape == (5, 3, 8, 8)
        and labels.tolist() == [0, 0, 0, 1, 1]
        and indices.tolist() == [0, 1, 2, 3, 4]
    )
