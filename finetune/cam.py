"""CAM figures for test images: the image, Grad-CAM on a CNN stage and on a decoder, guided attention.

Grad-CAM comes from the grad-cam package (``pytorch_grad_cam.GradCAM``) with the backbone's own
target layers and token-to-map reshape (``backbones.cam_target_layers`` / ``reshape_transform``);
the guided-attention map is the decoder's attention from the class token to the patch tokens
(mean over heads), read through the backbone's ``attention_maps``. Each row is titled with the
true label and the predicted probability of every class; misclassified images are included on
purpose, since they are the ones a pathologist wants to look at.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from roseprior.data import ImageDataset, Sample

from .config import CamConfig
from .model import Classifier

__all__ = [
    "attention_heatmap", "cam_maps", "choose_layers", "grad_cam", "localisation_scores", "pick_images",
    "write_cam_figures",
]


def pick_images(labels: np.ndarray, probs: np.ndarray, num: int, misclassified: int, seed: int = 0) -> list[int]:
    """Up to ``misclassified`` wrong predictions, the rest correct ones; seeded, in index order."""
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    right = np.flatnonzero(probs.argmax(1) == labels)
    take_wrong = rng.permutation(wrong)[: min(misclassified, num)]
    take_right = rng.permutation(right)[: num - len(take_wrong)]
    if len(take_wrong) + len(take_right) < num:  # not enough correct ones: more wrong ones
        extra = [i for i in rng.permutation(wrong) if i not in set(take_wrong)]
        take_wrong = np.concatenate([take_wrong, extra[: num - len(take_wrong) - len(take_right)]])
    return sorted(int(i) for i in np.concatenate([take_wrong, take_right]))


def choose_layers(backbone: torch.nn.Module) -> dict[str, tuple[str, Any] | None]:
    """What to explain: ``cnn`` (a CNN stage), ``transformer`` (a decoder/block output) for Grad-CAM,
    and ``attention`` (the decoder whose guided attention is drawn).

    The CNN target is stage 3 when there is one: its grid is twice as fine as stage 4's, and on the
    synthetic set's cell masks a trained ``msht_tiny``'s stage-3 maps sat on cells far more often
    (pointing game 0.77 vs 0.58, ``benchmarks/cam_quality.py``). The Grad-CAM
    transformer target is the last decoder (block) the backbone lists; backbones list only targets
    whose patch tokens reach the head (see ``MSHT.cam_target_layers``). timm models have no
    CNN/transformer split and get their last feature stage.
    """
    import backbones

    try:
        targets = backbones.cam_target_layers(backbone)
    except TypeError:
        return {"cnn": None, "transformer": None, "attention": None}
    cnn = [k for k in targets if k.startswith("cnn.")]
    tfm = [k for k in targets if k.startswith(("decoder", "block"))]
    if not cnn and not tfm and targets:
        cnn = list(targets)
    cnn_key = ("cnn.stage3" if "cnn.stage3" in cnn else cnn[-1]) if cnn else None
    tfm_key = tfm[-1] if tfm else None
    return {
        "cnn": (cnn_key, targets[cnn_key]) if cnn_key else None,
        "transformer": (tfm_key, targets[tfm_key]) if tfm_key else None,
        "attention": (tfm[-1], None) if tfm else None,
    }


def grad_cam(model: Classifier, images: torch.Tensor, layer: torch.nn.Module, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps (B, H, W) for ``classes[i]`` of image i, in their own units (not min-max scaled).

    pytorch-grad-cam min-max scales every map to [0, 1], which hides how strong a map is: a flat
    map and a focused one look alike. Its ``get_cam_image`` is wrapped here to keep each raw map's
    range, and the scaled output is mapped back to it, so the figures can share one colour scale.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ranges: list[np.ndarray] = []

    class RangeKeepingGradCAM(GradCAM):
        def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
            cam = np.maximum(super().get_cam_image(*args, **kwargs), 0)
            ranges.append(np.stack([cam.min(axis=(1, 2)), cam.max(axis=(1, 2))], axis=1))
            return cam

    reshape = getattr(model.backbone, "reshape_transform", None)
    # One view: the maps are made of one forward pass's activations (decision.dihedral_mean would run eight).
    with model.one_view(), RangeKeepingGradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        scaled = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    low, high = ranges[-1][:, 0, None, None], ranges[-1][:, 1, None, None]
    return scaled * (high - low) + low


@torch.no_grad()
def attention_heatmap(model: Classifier, images: torch.Tensor, key: str | None) -> np.ndarray | None:
    """Guided attention from the class token (or averaged over queries) to each patch, (B, H, W) weights."""
    backbone = model.backbone
    if key is None or not callable(getattr(backbone, "attention_maps", None)):
        return None
    maps = backbone.attention_maps(model.normalize(images))
    if key not in maps or maps[key] is None:
        return None
    attn = maps[key].float().mean(dim=1)  # (B, T, T): mean over heads
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    rows = attn[:, 0, prefix:] if prefix else attn.mean(dim=1)
    n = rows.shape[1]
    h = int(round((n * images.shape[-2] / images.shape[-1]) ** 0.5))
    grid = rows.reshape(-1, 1, h, n // h)
    # Attention weight per patch (the class token's attention sums to 1 over tokens), not min-max scaled.
    return F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu().numpy()


def cam_maps(model: Classifier, images: torch.Tensor, classes: Sequence[int]) -> dict[str, np.ndarray]:
    """The figure's maps, (B, H, W) each, keyed by title: Grad-CAM on the CNN stage and on the decoder
    that ``choose_layers`` picks (for ``classes[i]`` of image i), and the guided attention."""
    layers = choose_layers(model.backbone)
    maps: dict[str, np.ndarray] = {}
    for part in ("cnn", "transformer"):
        if layers[part] is not None:
            key, layer = layers[part]
            maps[f"Grad-CAM {key}"] = grad_cam(model, images, layer, classes)
    if layers["attention"] is not None:
        heat = attention_heatmap(model, images, layers["attention"][0])
        if heat is not None:
            maps[f"guided attention {layers['attention'][0]}"] = heat
    return maps


def localisation_scores(heat: np.ndarray, mask: np.ndarray, border: float = 0.1) -> dict[str, float]:
    """Does a map (H, W) sit on the ``mask`` (H, W, bool, e.g. where the cells are) or on the borders?

    ``on_mask_lift``: mean heat on the mask / mean heat overall (1: no preference, > 1: on the mask);
    ``pointing_hit``: 1 when the hottest pixel is on the mask (the pointing game, Zhang et al. 2016);
    ``border_lift``: mean heat in the outer ``border`` fraction of each side / mean heat overall
    (> 1: drawn to the image edges, as padding artefacts are). Zero maps score 0 lift.
    """
    heat = np.asarray(heat, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if heat.shape != mask.shape:
        raise ValueError(f"map {heat.shape} and mask {mask.shape} differ in shape")
    mean = heat.mean()
    h, w = heat.shape
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    band = np.ones_like(mask)
    band[bh : h - bh, bw : w - bw] = False

    def lift(region: np.ndarray) -> float:
        return float(heat[region].mean() / mean) if mean > 0 and region.any() else 0.0

    return {
        "on_mask_lift": lift(mask),
        "pointing_hit": float(mask.flat[int(heat.argmax())]) if mean > 0 else 0.0,
        "border_lift": lift(band),
        "mask_fraction": float(mask.mean()),
    }


def write_cam_figures(
    model: Classifier,
    samples: Sequence[Sample],
    result: dict[str, Any],
    cfg: Any,
    out_dir: str | Path,
) -> list[Path]:
    """PNG grids for a sample of test images (``result``: the test ``evaluate`` output); returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cam_cfg: CamConfig = cfg.cam
    classes = list(cfg.data.classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    order = np.argsort(result["indices"])  # gathered results back in dataset order
    probs, labels, indices = result["probs"][order], result["labels"][order], result["indices"][order]
    chosen = pick_images(labels, probs, cam_cfg.num_images, cam_cfg.misclassified, cfg.seed)
    dataset = ImageDataset([samples[int(indices[i])] for i in chosen], image_size=cfg.data.image_size)

    paths = []
    per_figure = max(cam_cfg.per_figure, 1)
    for start in range(0, len(chosen), per_figure):
        rows = list(range(start, min(start + per_figure, len(chosen))))
        images = torch.stack([dataset[r][0] for r in rows]).float().div(255.0)
        predicted = probs[[chosen[r] for r in rows]].argmax(1)
        panels: list[tuple[str, np.ndarray | None]] = [("image", None), *cam_maps(model, images, predicted).items()]
        fig, axes = plt.subplots(len(rows), len(panels), figsize=(3.2 * len(panels), 3.2 * len(rows)), squeeze=False)
        for j, (title, heat) in enumerate(panels):
            # One colour scale per map type across the figure: a weak map looks weak, not like a strong one.
            vmax = float(np.max(heat)) if heat is not None and np.max(heat) > 0 else 1.0
            for i, r in enumerate(rows):
                k = chosen[r]
                ax = axes[i][j]
                ax.imshow(images[i].permute(1, 2, 0).numpy())
                if heat is not None:
                    shown = ax.imshow(heat[i], cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
                ax.set_axis_off()
                if j:
                    ax.set_title(title, fontsize=8)
                else:
                    verdict = "correct" if probs[k].argmax() == labels[k] else "MISCLASSIFIED"
                    p_text = ", ".join(f"p({c})={probs[k][c_i]:.2f}" for c_i, c in enumerate(classes))
                    name = Path(samples[int(indices[k])].path).name
                    ax.set_title(f"{name}\ntrue {classes[labels[k]]}; {p_text}\n{verdict}", fontsize=8)
            if heat is not None:
                unit = "attention weight" if title.startswith("guided") else "Grad-CAM (its own units)"
                fig.colorbar(shown, ax=[axes[i][j] for i in range(len(rows))], shrink=0.8, label=unit)
        path = out_dir / f"cam_{start // per_figure:02d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
