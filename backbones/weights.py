"""Backbone weights on disk: save/load a backbone folder, and load local state dicts into a backbone.

A backbone folder holds ``backbone.safetensors`` (the state dict) and ``backbone.json`` (registry
name, kwargs, embed_dim, provenance), so ``load(dir)`` rebuilds the same architecture and restores
it exactly. Foreign state dicts (torchvision/timm ResNet-50, timm models, wrapped checkpoints) are
read with safetensors or ``torch.load(weights_only=True)`` only: a checkpoint never runs code.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roseprior.checkpoint import atomic_write_json, save_safetensors
from roseprior.errors import CheckpointError, ConfigError

from ._registry import create
from .helpers import set_input_stats

__all__ = ["save", "load", "load_init", "load_state_dict_file", "load_into", "init_fingerprint", "LoadReport"]

_log = logging.getLogger(__name__)

WEIGHTS_FILE = "backbone.safetensors"
META_FILE = "backbone.json"
FORMAT = "roseprior.backbone/1"
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

# Prefixes that training wrappers put in front of every key (DDP, torch.compile, Lightning, SSL heads).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.", "teacher.", "student.")
# Container keys under which checkpoints keep their state dict, tried in order.
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "model_state", "module", "net", "backbone")


@dataclass
class LoadReport:
    """What a non-strict load did; ``str()`` gives the one-line summary that is logged."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # same name, different shape: not loaded
    mapping: str = ""

    def __str__(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}"
            + (f" (keys mapped {self.mapping})" if self.mapping else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "mapping": self.mapping,
            "loaded": len(self.loaded),
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
        }


# ====== backbone folders ======


def _json_safe(value: Any, strict: bool = True) -> Any:
    """Plain JSON values. Strict for model kwargs (they must rebuild the model); lenient for provenance,
    where paths, numpy scalars and other objects are written as numbers or strings."""
    if isinstance(value, (tuple, list)):
        return [_json_safe(v, strict) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v, strict) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if strict:
        raise ConfigError(
            f"backbone kwarg value {value!r} cannot be written to {META_FILE}; pass plain values"
        )
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def save(model: nn.Module, out_dir: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` into ``out_dir``; returns the folder."""
    name = getattr(model, "registry_name", None)
    if name is None:
        raise ConfigError(
            f"cannot save {type(model).__name__}: it was not built by backbones.create(); "
            "build backbones with backbones.create(name, **kwargs) so they can be rebuilt at load time"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "name": name,
        "kwargs": _json_safe(getattr(model, "registry_kwargs", {})),
        "embed_dim": int(model.embed_dim),
        "num_params": sum(p.numel() for p in model.parameters()),
        "default_cfg": _json_safe(
            {
                k: v
                for k, v in (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}).items()
                if k in ("input_size", "mean", "std")
            }
        ),
        "provenance": _json_safe(provenance or {}, strict=False),
    }
    save_safetensors(model.state_dict(), out_dir / WEIGHTS_FILE, metadata={"format": "pt", "name": name})
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a backbone folder holds {META_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-save the backbone") from err
    if not isinstance(meta, dict) or "name" not in meta:
        raise CheckpointError(f"{path} has no 'name' key; it was not written by backbones.save")
    return meta


def load(folder: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild and restore a backbone saved by ``save``. Overrides (e.g. num_classes) load non-strictly."""
    model, report = _load_folder(Path(folder), overrides)
    if overrides:
        _log.info("%s", report)
    return model


def _load_folder(folder: Path, overrides: dict[str, Any]) -> tuple[nn.Module, LoadReport]:
    meta = read_meta(folder)
    kwargs = dict(meta.get("kwargs") or {}, **overrides)
    try:
        model = create(meta["name"], **kwargs)
    except ConfigError as err:
        raise CheckpointError(f"{folder / META_FILE}: cannot rebuild backbone: {err}") from err
    # The input statistics the backbone was trained with travel with it, so every stage that
    # loads it (finetune's classifier, predict, the probes, timm) normalises its inputs the same way.
    saved_cfg = meta.get("default_cfg") or {}
    if saved_cfg.get("mean") and saved_cfg.get("std"):
        set_input_stats(model, saved_cfg["mean"], saved_cfg["std"])
    state = load_state_dict_file(folder / WEIGHTS_FILE)
    if not overrides:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE} does not match {meta['name']} built from {META_FILE}: "
                f"{str(err).splitlines()[0]} ... re-save the backbone or fix its json"
            ) from err
        return model, LoadReport(str(folder), loaded=list(state))
    return model, load_into(model, state, source=str(folder), add_prefixes=False)


# ====== foreign state dicts ======


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds more than tensors (refused: loading it would run code). "
            "Re-save it as a plain state dict or safetensors, e.g. torch.save(model.state_dict(), path)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {err}") from err
    return _unwrap_container(obj, path)


def _unwrap_container(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"teacher": {"state_dict": {...}}}
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path} holds no state dict (a dict of tensors, or one under {', '.join(_CONTAINER_KEYS)})"
    )


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix that every key shares (``module.``, ``_orig_mod.``, ...), repeatedly."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "state dict",
    add_prefixes: bool = True,
    min_fraction: float = 0.5,
) -> LoadReport:
    """Load every tensor whose (mapped) name and shape match; report the rest.

    CheckpointError when nothing matches, or when less than ``min_fraction`` of the file's weights
    (by element count) fit, which means the file is for another architecture.

    Key mapping: wrapper prefixes shared by all keys are dropped, then the model's
    ``checkpoint_prefixes`` are tried (MSHT: ``cnn.``, so a torchvision/timm ResNet-50 state dict
    lands in its CNN), and the mapping that matches most tensors wins. The model's
    ``checkpoint_filter`` then adapts what differs only by input size (position embeddings).
    """
    target = model.state_dict()
    candidates = [(state, "")]
    stripped = _strip_wrappers(state)
    if stripped is not state:
        candidates.append((stripped, "wrapper prefixes stripped"))
    if add_prefixes:
        for prefix in getattr(model, "checkpoint_prefixes", ()):
            for src, how in list(candidates):
                mapped = {prefix + k: v for k, v in src.items() if not k.startswith(prefix)}
                candidates.append((mapped, (how + ", " if how else "") + f"prefixed {prefix!r}"))

    def score(src: dict[str, torch.Tensor]) -> int:
        return sum(1 for k, v in src.items() if k in target and target[k].shape == v.shape)

    best, how = max(candidates, key=lambda c: score(c[0]))
    adapt = getattr(model, "checkpoint_filter", None)
    if callable(adapt):  # e.g. a position embedding saved for another native input size
        best = adapt(best)
    report = LoadReport(source, mapping=how)
    usable = {}
    for k, v in best.items():
        if k not in target:
            report.unexpected.append(k)
        elif target[k].shape != v.shape:
            report.mismatched.append(f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}")
        else:
            usable[k] = v
    report.loaded = sorted(usable)
    report.missing = sorted(set(target) - set(usable))
    name = getattr(model, "registry_name", type(model).__name__)
    if not usable:
        some = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"{source}: no tensor matches {name} (first keys: {some}); "
            "name the architecture the weights came from (finetune: arch=NAME; the probes' checkpoints: PATH@NAME)"
        )
    # Counted in elements, not keys: a stem conv that happens to match is not "the weights loaded".
    fraction = sum(v.numel() for v in usable.values()) / max(1, sum(v.numel() for v in best.values()))
    if fraction < min_fraction:
        raise CheckpointError(
            f"{source}: only {fraction:.1%} of its weights fit {name} ({report}); the file is probably for "
            "another architecture: name the architecture the weights came from (finetune: arch=NAME; the probes' checkpoints: PATH@NAME)"
        )
    model.load_state_dict(usable, strict=False)
    return report


# ====== init specs (finetune / eval_probes) ======


def load_init(
    spec: str | Path | None, model: str | None = None, min_fraction: float = 0.5, **kwargs: Any
) -> nn.Module:
    """Resolve an init spec to a backbone; the load report is kept on ``backbone.load_report``.

    - a folder with ``backbone.json``: ``load`` it (kwargs such as num_classes override the saved ones)
    - a registry name (``msht_tiny``) or ``timm:<name>``: random init
    - a state-dict file (.pth/.pt/.bin/.safetensors/.ckpt): build ``model`` and load what matches
      (MSHT/hybrid_vit map ResNet-50 keys into their CNN); CheckpointError when nothing matches;
      ``PATH@ARCH`` names the architecture inside the spec (the probes' checkpoint lists)
    """
    if spec is None or str(spec) == "":
        if model is None:
            raise ConfigError(
                "no init given: pass a backbone folder, a model name, or a weights file with its architecture"
            )
        spec = model
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if "@" in spec_str and not path.exists():  # PATH@ARCH: a weights file and the architecture it fits
        file, arch = spec_str.rsplit("@", 1)
        if Path(file).expanduser().is_file():
            path, model = Path(file).expanduser(), model or arch

    if path.is_dir():
        built, report = _load_folder(path, kwargs)
    elif path.suffix in STATE_DICT_SUFFIXES or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"{path} not found")
        if model is None:
            raise ConfigError(
                f"init {path} is a weights file: also name its architecture (finetune: arch=msht or arch=timm:resnet50; "
                f"the probes' checkpoints: {path}@msht)"
            )
        built = create(model, **kwargs)
        report = load_into(built, load_state_dict_file(path), source=str(path), min_fraction=min_fraction)
    else:
        from ._registry import is_model

        if not is_model(spec_str):
            raise ConfigError(
                f"init {spec_str!r} is neither a folder with {META_FILE}, a weights file "
                f"({'/'.join(STATE_DICT_SUFFIXES)}), a registered backbone, nor a timm:<name>"
            )
        built = create(spec_str, **kwargs)
        report = LoadReport(f"{spec_str} (random init)")
    _log.info("init %s", report)
    built.load_report = report
    return built


def init_fingerprint(spec: str, seed: int) -> str:
    """What an init spec's weights depend on: the bytes of its backbone files (a folder) or weights file,
    or, for a registry/timm name (random init), the name and the seed."""
    import hashlib

    digest = hashlib.sha256()
    path = Path(spec).expanduser()
    if "@" in spec and not path.exists() and Path(spec.rsplit("@", 1)[0]).expanduser().is_file():
        path = Path(spec.rsplit("@", 1)[0]).expanduser()
        digest.update(spec.rsplit("@", 1)[1].encode())  # the same file read as another architecture differs
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("backbone.")) if path.is_dir() else (
        [path] if path.is_file() else [])
    if path.is_dir() and not files:
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}/{META_FILE}; point it at a folder written by pretrain "
                              "or finetune")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    if not files:
        digest.update(f"random-init:{spec}:seed={seed}".encode())
    return digest.hexdigest()[:20]
