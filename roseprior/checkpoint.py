"""Files a run writes: atomic (a run killed mid-write leaves the old file or the new one), with the
user's umask, and never pickled: state is safetensors for tensors plus JSON for everything else.

``save_state``/``load_state`` store any nest of dicts, lists, tuples, numbers, strings and
tensors (a model's or optimizer's ``state_dict``, RNG states) that way. Loading one runs no code,
unlike ``torch.load``/``pickle``, so a checkpoint folder from anywhere is safe to resume from.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from roseprior.errors import CheckpointError

__all__ = ["atomic_write", "atomic_write_csv", "atomic_write_json", "atomic_write_text", "load_state",
           "save_safetensors", "save_state"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; the rename is atomic on one filesystem.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask), not the
    owner-only mode of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV table (``header``, then ``rows``) written atomically: every table a stage leaves is written so."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (contiguous CPU copies that share no memory, as it requires)."""
    from safetensors.torch import save_file

    flat, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:  # tied weights: store a copy
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        flat[key] = value
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


# ====== state trees: safetensors + JSON ======


def _encode(obj: Any, path: str, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{path}' as safetensors + JSON")


def _decode(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(state: Any, folder: str | Path, name: str) -> None:
    """Write ``state`` as ``folder/name.safetensors`` (its tensors) and ``folder/name.json`` (the rest)."""
    tensors: dict[str, Any] = {}
    tree = _encode(state, name, tensors)
    save_safetensors(tensors, Path(folder) / f"{name}.safetensors")
    atomic_write_json(Path(folder) / f"{name}.json", tree)


def load_state(folder: str | Path, name: str, device: str = "cpu") -> Any:
    """Read back what ``save_state`` wrote; nothing is unpickled, so no code can run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"), device=device)
        tree = json.loads((folder / f"{name}.json").read_text())
        return _decode(tree, tensors)
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{folder / name}.safetensors/.json cannot be read ({err})") from None
