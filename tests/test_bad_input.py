"""The bad-input suite: what a hostile or careless user can do, and what the platform guarantees.

- nothing in a run folder is ever unpickled (a planted pickle never runs);
- nothing of the user's is overwritten or deleted without an explicit flag (split, synth, run folders);
- files follow the user's umask;
- peak memory does not grow with the largest image;
- every error is one line naming the file or key and what to do, never a traceback.

Cases that already worked before this suite (corrupt, truncated, zero-byte and fake images, 16-bit,
CMYK, RGBA, palette and EXIF images, config abuse, SIGKILL resume) are tested in test_imageio.py,
test_data.py, test_config.py, test_pretrain.py and test_loop.py; a few run here again through the
command lines, beside the new ones, so none of them regresses.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FINETUNE = str(REPO / "configs" / "finetune" / "msht_tiny_cpu.yaml")

pytestmark = pytest.mark.timeout(300)


def cli(*args: str, cwd: Path = REPO, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from roseprior.synth import generate

    return generate(tmp_path_factory.mktemp("bad_input") / "set", n_per_class=12, size=64, seed=5, progress=False)


@pytest.fixture(scope="module")
def finetuned(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad_input_ft") / "run"
    proc = cli("-m", "finetune", "--config", FINETUNE, f"data.root={data}", f"out_dir={out}", "data.image_size=64",
               "train.batch_size=4", "train.epochs=1", "train.max_steps=2", "cam.enabled=false", "sam=off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def pretrain_args(data: Path, out: Path, **extra: object) -> list[str]:
    values = {"data.root": data, "out_dir": out, "model.name": "timm:test_vit", "method.name": "simclr",
              "method.simclr.hidden_dim": 32, "method.simclr.out_dim": 16, "method.simclr.batch_norm": "false",
              "views.global_size": 32, "views.n_local": 0, "train.batch_size": 8, "train.epochs": 3,
              "checkpoint.every_steps": 2, "monitor.progress": "false"}
    values.update(extra)
    return ["-m", "pretrain", *(f"{k}={v}" for k, v in values.items())]


# ---------------------------------------------------------------------------------------------
# Nothing in a run folder is unpickled
# ---------------------------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command: what a planted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_checkpoint_never_runs_and_resume_still_works(data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    marker = tmp_path / "PWNED"
    out, reference = tmp_path / "run", tmp_path / "reference"
    assert cli(*pretrain_args(data, out, **{"train.max_steps": 2})).returncode == 0
    step = out / "checkpoints" / "step_00000002"
    # Every name accelerate's load_state (the loop this replaced) would have unpickled.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                 "pytorch_model.bin"):
        (step / name).write_bytes(pickle.dumps(Exploit(marker)))
    resumed = cli(*pretrain_args(data, out, **{"train.max_steps": 4}))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert not marker.exists(), "a pickle in the run folder was loaded"
    assert cli(*pretrain_args(data, reference, **{"train.max_steps": 4})).returncode == 0
    a = load_file(str(reference / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------------------------------------
# Nothing of the user's is overwritten or deleted without an explicit flag
# ---------------------------------------------------------------------------------------------


def test_split_refuses_to_replace_a_split_without_overwrite_and_keeps_its_links(data: Path, tmp_path: Path) -> None:
    links = tmp_path / "links"
    assert cli("-m", "roseprior", "split", "--src", str(data), "--out", str(links), "--link").returncode == 0
    before = sorted(str(p.relative_to(links)) for p in links.rglob("*"))
    one_line_error(cli("-m", "roseprior", "split", "--src", str(links), "--out", str(links), "--ratios", "8:1:1"),
                   str(links), "--overwrite")
    assert sorted(str(p.relative_to(links)) for p in links.rglob("*")) == before
    assert all(p.resolve().is_file() for p in links.rglob("*.jpg"))
    # With the flag, the split of the link tree is rewritten onto the real images.
    proc = cli("-m", "roseprior", "split", "--src", str(links), "--out", str(links), "--ratios", "8:1:1", "--link",
               "--overwrite")
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "val", "test"):
        rows = (links / f"{name}.csv").read_text().splitlines()[1:]
        assert rows and all(Path(r.split(",")[0]).is_file() and str(data) in r for r in rows)
    assert all(p.resolve().is_file() and str(data) in str(p.resolve()) for p in links.rglob("*.jpg"))


def test_split_refuses_a_folder_it_did_not_write(data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    one_line_error(cli("-m", "roseprior", "split", "--src", str(data), "--out", str(mine), "--overwrite"),
                   str(mine), "split.json")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_synth_overwrite_never_deletes_a_users_images(tmp_path: Path, write_image) -> None:
    user = tmp_path / "D"
    a, b = write_image(user / "N" / "a.jpg"), write_image(user / "P" / "b.jpg", seed=1)
    (user / "manifest.csv").write_text("path,label\nN/a.jpg,N\nP/b.jpg,P\n")
    one_line_error(cli("-m", "roseprior", "synth", "--out", str(user), "--n-per-class", "2", "--overwrite"),
                   str(user), "not written by `roseprior synth`")
    assert a.is_file() and b.is_file() and (user / "manifest.csv").read_text().startswith("path,label\nN/a.jpg")
    # A folder synth wrote is replaced, and a file the user added to it stays.
    mine = tmp_path / "S"
    assert cli("-m", "roseprior", "synth", "--out", str(mine), "--n-per-class", "2", "--size", "64").returncode == 0
    extra = write_image(mine / "N" / "added_by_me.png")
    assert cli("-m", "roseprior", "synth", "--out", str(mine), "--n-per-class", "3", "--size", "64",
               "--overwrite").returncode == 0
    assert extra.is_file() and len(list((mine / "P").glob("P_*.jpg"))) == 3


def test_a_finished_pretrain_folder_refuses_other_data_and_is_left_as_it_was(data: Path, tmp_path: Path) -> None:
    from roseprior.synth import generate

    out = tmp_path / "run"
    assert cli(*pretrain_args(data, out, **{"train.max_steps": 2})).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = generate(tmp_path / "other", n_per_class=12, size=64, seed=8, progress=False)
    one_line_error(cli(*pretrain_args(other, out, **{"train.max_steps": 2})), str(out), "data:", "new out_dir",
                   "checkpoint.resume=never")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # provenance and config.yaml too
    one_line_error(cli(*pretrain_args(data, out, **{"train.max_steps": 2, "method.name": "byol",
                                                    "method.byol.hidden_dim": 32, "method.byol.out_dim": 16})),
                   "method: 'simclr' there, 'byol' now")


def test_a_run_that_trains_nothing_is_refused_before_it_scores_anything(data: Path, finetuned: Path) -> None:
    for epochs in ("0", "-1"):
        one_line_error(cli("-m", "finetune", "--config", FINETUNE, f"data.root={data}", f"out_dir={finetuned}",
                           f"train.epochs={epochs}"), "'train.epochs' must be >= 1")


# ---------------------------------------------------------------------------------------------
# Files follow the umask
# ---------------------------------------------------------------------------------------------


def test_written_files_follow_the_umask(data: Path, finetuned: Path, tmp_path: Path) -> None:
    """Under umask 027 every file is 0o640: neither of the modes a hard-coded chmod would give (0o644, 0o600).
    (One umask, not two: each is a whole split, predict and pretrain, 30 s.)"""
    umask, mode = 0o027, 0o640
    split = tmp_path / "split"
    assert cli("-m", "roseprior", "split", "--src", str(data), "--out", str(split), umask=umask).returncode == 0
    preds = tmp_path / "preds.csv"
    assert cli("-m", "finetune.predict", "--ckpt", str(finetuned), "--images", str(data / "N"), "--out", str(preds),
               umask=umask).returncode == 0
    out = tmp_path / "pretrain"
    assert cli(*pretrain_args(data, out, **{"train.max_steps": 1}), umask=umask).returncode == 0
    files = [split / "train.csv", split / "split.json", preds, out / "backbone.safetensors", out / "backbone.json",
             out / "config.yaml", out / "checkpoints" / "step_00000001" / "model.safetensors"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))


# ---------------------------------------------------------------------------------------------
# Memory does not grow with the largest image
# ---------------------------------------------------------------------------------------------

VIEWS_PEAK = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from pretrain.config import ViewsConfig
from pretrain.views import DecodedImages, MultiCropViews, collate_decoded
paths = sys.argv[1:]
dataset = DecodedImages(paths)
views = MultiCropViews(ViewsConfig(global_size=64, local_size=32, n_local=2), seed=0)
for lo in range(0, len(paths), 32):
    views(*collate_decoded([dataset[i] for i in range(lo, min(lo + 32, len(paths)))]), epoch=0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_one_huge_image_costs_its_own_memory_not_the_batchs(tmp_path: Path) -> None:
    """Views of 32 small fields, with and without one 6000x4000 field among them: a batch padded to the
    largest image (the old collate) would take 32 x 72 MB more; cutting views per image takes one."""
    rng = np.random.default_rng(0)
    small = []
    for i in range(32):
        path = tmp_path / f"small_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(path)
        small.append(str(path))
    huge = tmp_path / "huge.jpg"
    Image.fromarray(np.full((4000, 6000, 3), 128, dtype=np.uint8)).save(huge)

    def peak_mb(paths: list[str]) -> float:
        proc = cli("-c", VIEWS_PEAK.format(repo=str(REPO)), *paths)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1]) / 1024

    without, with_huge = peak_mb(small), peak_mb(small[:31] + [str(huge)])
    print(f"views peak RSS: {without:.0f} MB without, {with_huge:.0f} MB with one 6000x4000 field")
    assert with_huge - without < 3 * 72, (without, with_huge)  # the image itself and a copy or two, not 32 of it


# ---------------------------------------------------------------------------------------------
# One line, never a traceback
# ---------------------------------------------------------------------------------------------


def test_predict_errors_are_one_line(data: Path, finetuned: Path, tmp_path: Path) -> None:
    base = ["-m", "finetune.predict", "--ckpt", str(finetuned), "--images", str(data / "N")]
    one_line_error(cli(*base, "--out", str(tmp_path)), "--out", "is a folder")
    assert not list(tmp_path.glob("*.csv"))
    if not torch.cuda.is_available():
        one_line_error(cli(*base, "--out", str(tmp_path / "p.csv"), "--device", "cuda"), "no CUDA device")
    zero = cli(*base, "--out", str(tmp_path / "p.csv"), "--batch-size", "0")
    assert zero.returncode == 2 and "Traceback" not in zero.stderr and "--batch-size: must be >= 1" in zero.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("best.json", "config.yaml"):
        (broken / name).write_bytes((finetuned / name).read_bytes())
    (broken / "best.safetensors").write_bytes((finetuned / "best.safetensors").read_bytes()[:1000])
    one_line_error(cli("-m", "finetune.predict", "--ckpt", str(broken), "--images", str(data / "N"), "--out",
                       str(tmp_path / "p.csv")), "best.safetensors", "cannot rebuild the classifier")


def test_an_image_that_vanishes_during_a_run_is_one_line_naming_it(data: Path, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked readable at the start, deleted before a loader worker reads it."""
    import shutil

    import pretrain.loop as loop
    from pretrain.__main__ import main

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim: list[str] = []
    original = loop.filter_readable

    def check_then_delete(samples, *args, **kwargs):
        kept = original(samples, *args, **kwargs)
        victim.append(kept[0].path)
        Path(kept[0].path).unlink()
        return kept

    monkeypatch.setattr(loop, "filter_readable", check_then_delete)
    args = pretrain_args(copy, tmp_path / "run", **{"data.num_workers": 2, "train.max_steps": 4})[2:]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and victim[0] in err[0] and "became unreadable during the run" in err[0], err


def test_a_weights_file_needs_its_architecture_and_says_how(tmp_path: Path) -> None:
    import backbones

    weights = tmp_path / "resnet.pth"
    torch.save(backbones.create("timm:resnet18").model.state_dict(), weights)
    proc = cli("-m", "eval_probes", f"checkpoints=[{weights}]", f"out_dir={tmp_path / 'out'}", "umap=false")
    one_line_error(proc, str(weights), "@NAME")
    from backbones import load_init

    with pytest.raises(Exception, match="arch=") as err:
        load_init(str(weights))
    assert "model=" not in str(err.value)
    assert load_init(f"{weights}@timm:resnet18").embed_dim == 512  # PATH@ARCH: how the probes name it


# ---------------------------------------------------------------------------------------------
# Silent or unclear, now said
# ---------------------------------------------------------------------------------------------


def test_split_warns_about_empty_parts_and_contradictory_labels(tmp_path: Path, write_image) -> None:
    src = tmp_path / "src"
    for i in range(5):
        write_image(src / "N" / f"n{i}.png", seed=i)
    write_image(src / "P" / "only.png", seed=99)
    write_image(src / "P" / "same_as_n0.png", seed=0)  # identical bytes to N/n0.png
    proc = cli("-m", "roseprior", "split", "--src", str(src), "--out", str(tmp_path / "a"), "--ratios", "0:0:1")
    assert proc.returncode == 0, proc.stderr
    assert "train/N" in proc.stderr and "val/P" in proc.stderr and "hold no images" in proc.stderr
    assert "carry two labels" in proc.stderr
    rows = (tmp_path / "a" / "duplicates_across_splits.csv").read_text()
    assert "n0.png" in rows and "same_as_n0.png" in rows


def test_metrics_log_has_no_repeated_steps_after_a_restart_before_the_first_checkpoint(data: Path,
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli(*pretrain_args(data, out, **{"train.max_steps": 1, "checkpoint.every_steps": 100,
                                            "train.log_every": 1})).returncode == 0
    (out / "checkpoints").rename(tmp_path / "gone")  # as if killed before its first checkpoint
    assert cli(*pretrain_args(data, out, **{"train.max_steps": 2, "checkpoint.every_steps": 100,
                                            "train.log_every": 1})).returncode == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == [1, 2]


@pytest.mark.parametrize("override, key", [("data.max_unreadable_fraction=1.5", "data.max_unreadable_fraction"),
                                           ("train.batch_size=0", "train.batch_size"),
                                           ("views.n_global=0", "views.n_global")])
def test_out_of_range_values_are_refused_naming_the_key(override: str, key: str, tmp_path: Path) -> None:
    one_line_error(cli("-m", "pretrain", f"out_dir={tmp_path / 'o'}", override), f"'{key}'")
    assert not (tmp_path / "o").exists()


def test_a_view_size_the_model_cannot_take_is_refused_before_the_first_step(data: Path, tmp_path: Path) -> None:
    """MSHT's token grid is 32 px: a 56-px view failed inside the first training step; it is named up front."""
    line = one_line_error(cli(*pretrain_args(data, tmp_path / "run", **{"model.name": "msht_tiny",
                                                                         "views.global_size": 56})),
                          "views.global_size=56", "multiples of 32")
    assert "64" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_already_handled_inputs_still_are(tmp_path: Path, write_image) -> None:
    """Corrupt and zero-byte files are skipped and listed; an unknown key is one line (regression guard)."""
    src = tmp_path / "images"
    for i in range(20):
        write_image(src / f"ok_{i}.png", size=(48, 48), seed=i)
    (src / "zero.jpg").write_bytes(b"")
    (src / "fake.jpg").write_text("not an image")
    out = tmp_path / "run"
    proc = cli(*pretrain_args(src, out, **{"train.max_steps": 1, "data.max_unreadable_fraction": 0.2}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = (out / "skipped_files.csv").read_text()
    assert "zero.jpg" in listed and "fake.jpg" in listed
    one_line_error(cli("-m", "pretrain", f"out_dir={out}", "train.max_step=3"), "did you mean 'train.max_steps'")


def test_scale_refuses_a_folder_with_no_image_rather_than_write_an_empty_manifest(tmp_path: Path, write_image) -> None:
    """``roseprior scale --images`` on an unlabelled folder with no image (a wrong path, images of another format)
    wrote a CSV of no rows and exited 0; it is one line naming the folder, as a labelled one already was."""
    for i in range(3):
        write_image(tmp_path / "reference" / f"r{i}.png", size=(64, 64), seed=i)
    (tmp_path / "empty" / "day1").mkdir(parents=True)  # no class folder: the unlabelled layout
    (tmp_path / "empty" / "day1" / "notes.txt").write_text("not an image")
    out = tmp_path / "scales.csv"
    one_line_error(cli("-m", "roseprior", "scale", "--images", str(tmp_path / "empty"), "--reference",
                       str(tmp_path / "reference"), "--out", str(out)), f"no images under {tmp_path / 'empty'}")
    assert not out.exists()
