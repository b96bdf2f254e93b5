"""Atomic writes leave either the old file or the new one, never a partial file."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from roseprior.checkpoint import atomic_write, atomic_write_csv, atomic_write_json, save_safetensors


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})

    def broken(tmp):
        tmp.write_text('{"step": 2, "half')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_csv_tables_round_trip_awkward_cells_and_replace_the_old_table(tmp_path):
    path = tmp_path / "table.csv"
    atomic_write_csv(path, ["path", "reason"], [["a.jpg", "old"]] * 3)
    rows = [["dir, with comma/b.jpg", 'said "no"'], ["c.jpg", ""]]
    assert atomic_write_csv(path, ["path", "reason"], iter(rows)) == path  # any iterable of rows
    with path.open(newline="") as fh:
        assert list(csv.reader(fh)) == [["path", "reason"], *rows]
    atomic_write_csv(path, ["path", "reason"], [])  # header only: a stale table never survives
    assert path.read_text() == "path,reason\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    tensors = {"w": torch.randn(3, 4).t(), "b": torch.arange(5)}
    path = save_safetensors(tensors, tmp_path / "sub" / "m.safetensors", metadata={"k": "v"})
    loaded = load_file(str(path))
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
