"""The config loader: YAML + dotted overrides into dataclasses, refusing unknown keys and bad types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from roseprior.config import (
    ConfigError,
    DataConfig,
    StageConfig,
    TrainConfig,
    load_config,
    parse_override,
    save_config,
)


@dataclass
class ToyModel:
    name: str = "msht_tiny"
    drop_path: float = 0.0
    kind: Literal["bn", "gn"] = "bn"


@dataclass
class ToyConfig(StageConfig):
    model: ToyModel = field(default_factory=ToyModel)
    train: TrainConfig = field(default_factory=TrainConfig)
    crops: list[int] = field(default_factory=lambda: [224, 96])


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_come_from_the_dataclass():
    cfg = load_config(ToyConfig)
    assert cfg.seed == 0 and cfg.data.root is None and cfg.data.classes == ["N", "P"]
    assert cfg.train.max_steps is None and cfg.model.name == "msht_tiny"


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, {"seed": 3, "train": {"epochs": 5}, "model": {"kind": "gn"}})
    cfg = load_config(ToyConfig, path, ["train.max_steps=7", "data.root=/x", "crops=[128, 64]", "train.lr=1e-4"])
    assert cfg.seed == 3 and cfg.train.epochs == 5 and cfg.train.max_steps == 7
    assert cfg.model.kind == "gn" and cfg.data.root == "/x" and cfg.crops == [128, 64]
    assert cfg.train.lr == pytest.approx(1e-4)
    assert isinstance(cfg.data, DataConfig)


def test_override_back_to_null():
    cfg = load_config(ToyConfig, None, ["train.max_steps=5", "train.max_steps=null"])
    assert cfg.train.max_steps is None


def test_int_accepted_for_float():
    cfg = load_config(ToyConfig, None, ["model.drop_path=1"])
    assert cfg.model.drop_path == 1.0 and isinstance(cfg.model.drop_path, float)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["trian.epochs=3"], "unknown key 'trian'"),
        (["train.epoch=3"], "unknown key 'train.epoch'"),
        (["train.epochs=three"], "'train.epochs' expects an integer"),
        (["train.max_steps=1.5"], "'train.max_steps'"),
        (["model.kind=ln"], "'model.kind' must be one of bn, gn"),
        (["crops=5"], "'crops' expects a list"),
        (["data=3"], "'data' must be a mapping"),
        (["seed"], "not of the form key=value"),
    ],
)
def test_bad_keys_and_types_are_refused_with_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, None, overrides)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = write(tmp_path, {"train": {"epochs": 1, "max_step": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, path)
    message = str(err.value)
    assert str(path) in message
    for valid in ("epochs", "max_steps", "batch_size", "lr"):
        assert valid in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(ToyConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ToyConfig, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ToyConfig, top)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(ToyConfig, None, ["seed=9", "model.kind=gn", f"out_dir={tmp_path}"])
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml"
    again = load_config(ToyConfig, path)
    assert again == cfg


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[N, P]") == ("a", ["N", "P"])
    assert parse_override("a=") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")


def test_yaml_reads_ratios_as_text_and_exponents_as_floats(tmp_path):
    """YAML 1.1 would read 4:1:1 as the base-60 number 14461 and 1e-4 as a string."""
    path = write(tmp_path, {})
    (tmp_path / "cfg.yaml").write_text("data:\n  split_ratios: 7:1:2\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(ToyConfig, path, ["data.group_by=12:30"])
    assert cfg.data.split_ratios == "7:1:2" and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.group_by == "12:30"
    assert load_config(ToyConfig, None, ["data.split_ratios=4:1:1"]).data.split_ratios == "4:1:1"


def test_only_true_and_false_are_booleans():
    from roseprior.config import yaml_load

    assert yaml_load("[true, False, off, yes, on, no]") == [True, False, "off", "yes", "on", "no"]


# ---------------------------------------------------------------------------------------------
# One loader for every stage: suggestions, duplicates, section defaults, Python callers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, suggestion",
    [("train.max_step=3", "train.max_steps"), ("max_steps=3", "train.max_steps"), ("trian.epochs=3", "train"),
     ("data.split_sed=1", "data.split_seed")],
)
def test_unknown_key_suggests_the_nearest_valid_one(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(ToyConfig, None, [override])


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 3\nseed: 1\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'train' is given twice"):
        load_config(ToyConfig, path)


def test_a_section_keeps_its_stage_default_when_the_file_sets_other_keys(tmp_path):
    """finetune's data section defaults to 384 px; a YAML data section without image_size keeps it."""
    from finetune.config import FinetuneConfig

    path = write(tmp_path, {"data": {"root": "/x"}})
    assert load_config(FinetuneConfig, path).data.image_size == 384
    assert load_config(FinetuneConfig, None, ["data.root=/x"]).data.image_size == 384


def test_configs_built_in_python_are_checked_like_loaded_ones():
    from eval_probes.config import ProbeConfig
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig, ViewsConfig

    with pytest.raises(ConfigError, match="views.n_global"):
        PretrainConfig(views=ViewsConfig(n_global=0))
    with pytest.raises(ConfigError, match="train.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="data.max_unreadable_fraction"):
        DataConfig(max_unreadable_fraction=1.5)
    with pytest.raises(ConfigError, match="folds"):
        FinetuneConfig(folds=1)
    with pytest.raises(ConfigError, match="checkpoints"):
        ProbeConfig(checkpoints=[])


def test_one_key_per_concept_across_stages():
    """precision, clip_grad, min_lr_ratio and warmup_epochs live in `train` for both training stages."""
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    from roseprior.config import dotted_keys

    pretrain, finetune = set(dotted_keys(PretrainConfig)), set(dotted_keys(FinetuneConfig))
    for key in ("train.precision", "train.clip_grad", "train.min_lr_ratio", "train.warmup_epochs", "train.schedule",
                "train.max_minutes", "checkpoint.resume", "data.split_seed"):
        assert key in pretrain and key in finetune, key
    for gone in ("train.min_lr", "train.mixed_precision", "train.cpu", "optim.clip_grad", "optim.min_lr_ratio"):
        assert gone not in pretrain | finetune, gone


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "eval_probes"])
def test_print_config_prints_the_resolved_config_and_exits(stage, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", stage, "--print-config", f"out_dir={out}", "seed=7"],
                          capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["seed"] == 7 and printed["out_dir"] == str(out) and "data" in printed
    assert not out.exists()  # nothing is run or written


def test_progress_writes_plain_lines_with_rate_and_eta_when_not_on_a_terminal():
    import io

    from roseprior.progress import Progress

    stream = io.StringIO()  # not a TTY: no carriage-return bar
    with Progress(10, "train", unit="step", every_s=0.0, stream=stream) as bar:
        for _ in range(10):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 10
    assert lines[-1].startswith("train: 10/10 step (100%)") and "step/s" in lines[-1] and "ETA 0s" in lines[-1]
