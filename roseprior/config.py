"""Typed configs: YAML files mirror dataclasses field for field, validated at load.

Defaults live only in the dataclasses. A YAML file or a ``key=value`` override (dotted keys,
values parsed as YAML) may set any field; an unknown key or a value of the wrong type is refused
with one line naming the key and the valid ones. We write this loader by hand (about 150 lines)
because the libraries that do it (omegaconf, hydra) add a second source of defaults and
interpolation semantics users then have to learn; plain dataclasses stay readable.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from roseprior.errors import ConfigError

T = TypeVar("T")


class _Yaml12ishLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.1 surprises removed, as in YAML 1.2.

    ``7:2:1`` stays a string (YAML 1.1 reads it as the base-60 number 25321), ``1e-4`` is a float
    (YAML 1.1 wants ``1.0e-4``) and ``off``/``yes`` stay strings (only true/false are booleans):
    all three are common in our configs (split ratios, learning rates, ``sam: off``). A key given
    twice in one mapping is refused: PyYAML would silently keep only the last block.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first_line[key] + 1}); "
                    "keep one of them", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_REDEFINED = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")


_Yaml12ishLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REDEFINED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12ishLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12ishLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"),
)
_Yaml12ishLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse config YAML (safe loader; ratios like 7:2:1 stay strings, 1e-4 is a float)."""
    return yaml.load(text, Loader=_Yaml12ishLoader)  # noqa: S506 - a SafeLoader subclass

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "StageConfig", "TrainConfig", "add_config_args", "load_config",
    "save_config", "to_dict",
]


# ---------------------------------------------------------------------------------------------
# Sections shared by the stages: one key per concept, validated where it is declared
# ---------------------------------------------------------------------------------------------


def check(condition: bool, key: str, rule: str, value: Any) -> None:
    """Refuse ``value`` of ``key`` unless ``condition``; the message names the key and the rule."""
    if not condition:
        raise ConfigError(f"'{key}' {rule}; got {value!r}")


@dataclass
class DataConfig:
    """Where the images come from and how they are split. ``root: null`` means the synthetic default set."""

    root: str | None = None
    classes: list[str] = field(default_factory=lambda: ["N", "P"])
    positive_class: str = "P"
    image_size: int = 224
    max_unreadable_fraction: float = 0.05
    num_workers: int = 0
    split_dir: str | None = None  # folder with train.csv/val.csv/test.csv from `roseprior split`
    split_ratios: str = "7:2:1"  # train:val:test, used when the data has no split of its own
    group_by: str | None = None  # manifest column whose groups never straddle splits (slide, field)
    split_seed: int = 0  # the only seed splits depend on: the test split never moves with a training seed
    # Physical scale (roseprior.data.with_scales): with target_mpp set, every image is resampled to that many
    # micrometres per pixel before any crop; its own scale comes from a manifest column (mpp, relative_scale)
    # or from ``mpp`` (one value for the whole set). null: images are resized whole to image_size.
    target_mpp: float | None = None
    mpp: float | None = None
    # How the images were framed, for the scale estimate of ``--scale auto`` (roseprior.scale.zoom_as_framed):
    # field, a camera's photograph of the smear (a stronger objective shows the centre of the same frame); cell,
    # crops cut around one cell (CRIC, Herlev, SIPaKMeD), which follow the cell at any magnification.
    framing: Literal["field", "cell"] = "field"

    def __post_init__(self) -> None:
        check(0.0 <= self.max_unreadable_fraction <= 1.0, "data.max_unreadable_fraction", "must be in [0, 1]",
              self.max_unreadable_fraction)
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        check(self.image_size >= 8, "data.image_size", "must be at least 8 pixels", self.image_size)
        for key in ("target_mpp", "mpp"):
            value = getattr(self, key)
            check(value is None or 0 < value < float("inf"), f"data.{key}", "must be a positive number or null", value)
        check(len(self.classes) == len(set(self.classes)) >= 1, "data.classes", "must list distinct class names",
              self.classes)


@dataclass
class TrainConfig:
    """How every training stage optimises: budget, schedule, precision; ``batch_size`` is per process."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    max_minutes: float | None = None  # wall-clock budget: stop, checkpoint and export once it is spent
    batch_size: int = 32
    lr: float = 1e-3
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio x lr
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs
    weight_decay: float = 0.04
    clip_grad: float | None = None  # max global gradient norm (rescales, keeps the direction); null: off
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU, fp32 on the CPU
    log_every: int = 10

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null", self.max_steps)
        check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes", "must be > 0 or null",
              self.max_minutes)
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0", self.warmup_epochs)
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        check(self.clip_grad is None or self.clip_grad >= 0, "train.clip_grad", "must be >= 0 or null", self.clip_grad)
        check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints of a training run (``out_dir/checkpoints/step_*``): safetensors and JSON only."""

    every_steps: int = 500
    keep: int = 2  # the newest checkpoints kept; older ones are deleted
    # auto: continue from out_dir/checkpoints when one exists (refused if it is another run's);
    # never: start over, replacing this folder's earlier outputs; or a checkpoint folder to start from.
    resume: str = "auto"

    def __post_init__(self) -> None:
        check(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1", self.every_steps)
        check(self.keep >= 1, "checkpoint.keep", "must be >= 1", self.keep)


@dataclass
class StageConfig:
    """Fields every stage config has."""

    seed: int = 0
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving
# ---------------------------------------------------------------------------------------------


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``schema`` from a YAML file plus ``key=value`` overrides, refusing unknown keys.

    Building the dataclasses runs their ``__post_init__`` checks, so a config made in Python is
    validated exactly as one loaded here.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        raw = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    if overrides:
        source = f"{source} + overrides"
    return from_dict(schema, raw, source=source)


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=3`` -> (``"a.b"``, 3); the value is parsed as YAML (lists, numbers, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=5)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(schema: type[T], raw: dict[str, Any], source: str = "config", prefix: str = "",
              root: type | None = None, base: Any = None) -> T:
    """Validate ``raw`` against the dataclass ``schema`` and build it.

    ``base`` is the section's default (a field's ``default_factory()``, e.g. finetune's
    ``DataConfig(image_size=384)``): keys not in ``raw`` keep its values, not the class defaults.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    names = list(fields)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
            guess = _nearest_key(root or schema, f"{prefix}{key}")
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{hint}; valid keys {where}: {', '.join(names)}"
            )
        section_default = fields[key].default_factory
        if dataclasses.is_dataclass(hints[key]) and section_default is not dataclasses.MISSING:
            kwargs[key] = from_dict(hints[key], value if value is not None else {}, source, f"{prefix}{key}.",
                                    root or schema, base=section_default())
        else:
            kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source, root or schema)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else schema(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def dotted_keys(schema: type, prefix: str = "") -> list[str]:
    """Every field of a config dataclass as a dotted key (``train.max_steps``), sections included."""
    keys = []
    for f, tp in zip(dataclasses.fields(schema), get_type_hints(schema).values(), strict=True):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(tp, f"{prefix}{f.name}.")
    return keys


def _nearest_key(schema: type, key: str) -> str | None:
    """The valid dotted key a typo most likely meant: a close spelling, or the same name in another section."""
    import difflib

    keys = dotted_keys(schema)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.8)
    return next((k for k in keys if close_leaf and k.rsplit(".", 1)[-1] == close_leaf[0]), None)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, source: str, root: type | None = None) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, prefix=f"{key}.", root=root)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source, root)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{source}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", source, root) for i, v in enumerate(value)]
    if origin in (tuple, typing.Tuple):  # noqa: UP006
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", source, root) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{source}: '{key}' expects {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", source, root)
                     for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: '{key}' expects a string, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has unsupported type {_type_name(tp)}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` holds)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, out_dir: str | Path) -> Path:
    """Write the resolved config to ``out_dir/config.yaml`` (atomically)."""
    from roseprior.checkpoint import atomic_write_text

    path = Path(out_dir) / "config.yaml"
    atomic_write_text(path, config_yaml(cfg))
    return path


def config_yaml(cfg: Any) -> str:
    """The config as the YAML text ``config.yaml`` holds (and ``--print-config`` prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_args(parser: Any, default: str | None = None) -> None:
    """The argument shape every stage entry point takes: ``--config FILE [--print-config] [key=value ...]``."""
    parser.add_argument("--config", default=default, help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides + defaults) and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override any config field, dotted keys"
    )
