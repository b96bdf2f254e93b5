"""The one feature extractor: frozen ``forward_embedding`` features of whole images.

Pretrain's kNN monitor, ``eval_probes`` and the benchmarks all call it, so a backbone scored in
any of them saw the same pixels: the image resized to ``image_size`` (antialiased), an optional
test-time transform on the [0, 1] batch (a stain or scale shift), then the backbone's own input
statistics (``backbones.input_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from roseprior.data import ImageDataset, Sample

__all__ = ["extract_features", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``, refused in one line when absent."""
    from roseprior.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: this machine has no CUDA device; use cpu (or auto)")
    return device


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    image_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: Any = None,
    stats: tuple[Sequence[float], Sequence[float]] | None = None,
    views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
) -> np.ndarray:
    """float32 ``(N, embed_dim)`` features in sample order, the model in eval mode (its modes restored).

    ``stats`` (mean, std) override the model's own; ``progress`` is anything with ``update(n)``; ``views``
    (e.g. ``imageops.dihedral_views``) makes each feature the mean over the views of its image, read once.
    """
    import backbones

    device = torch.device(device)
    modes = {m: m.training for m in model.modules()}  # a teacher mixes modes; put them back afterwards
    model.eval().to(device)
    mean, std = stats or backbones.input_stats(model)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(ImageDataset(samples, image_size=image_size), batch_size=batch_size,
                                         num_workers=num_workers)
    out: list[np.ndarray] = []
    try:
        for images, _labels, _index in loader:
            x = images.to(device).float().div_(255.0)
            if transform is not None:
                x = transform(x)
            x = (x - mean_t) / std_t
            batch_views = views(x) if views is not None else [x]
            embedding = sum(model.forward_embedding(view) for view in batch_views) / len(batch_views)
            out.append(embedding.float().cpu().numpy())
            if progress is not None:
                progress.update(len(images))
    finally:
        for module, mode in modes.items():
            module.train(mode)
    if not out:
        return np.zeros((0, int(getattr(model, "embed_dim", 0))), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
