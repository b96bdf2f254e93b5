"""``python -m finetune.export --run RUN --format onnx|torchscript --out FILE [--image-size N]``.

Exports a fine-tuned classifier for the computer beside the microscope: a fixed-size graph taking
float RGB in [0, 1], (B, 3, S, S) (the image resized, antialiased, to S, after an eyepiece photograph's unlit
frame is painted as glass: ``roseprior.scale.fill_unlit``), and returning calibrated
class probabilities (the run's temperature applied). The position embedding is resampled once,
here, to S, so the graph holds no resampling op (ONNX's antialiased resize differs from PyTorch's).
The metadata carries what a caller needs: class names, the positive class, S, the input
statistics (applied inside the graph), the temperature, the operating-point threshold, and
``dihedral_mean``: when true the graph returns the mean over the field's 8 flips and quarter turns, run
as one batch of 8 B images through one copy of the backbone (so a caller feeds a few fields per call).
``python -m finetune.predict --model FILE`` runs it (onnxruntime for .onnx).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roseprior.checkpoint import atomic_write
from roseprior.errors import ConfigError
from roseprior.stage import command_main

from .model import Classifier, load_classifier

__all__ = ["CalibratedClassifier", "export", "export_metadata", "fixed_size"]

FORMAT = "roseprior.export/1"
METADATA_KEY = "roseprior"  # ONNX metadata_props key; TorchScript extra file "roseprior.json"


class CalibratedClassifier(nn.Module):
    """[0, 1] RGB batch -> ``softmax(logits / T)``: what the exported graph computes."""

    def __init__(self, classifier: Classifier, temperature: float = 1.0) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.classifier(x) / self.temperature).softmax(dim=1)


def fixed_size(classifier: Classifier, size: int) -> Classifier:
    """A copy whose backbone's native input size is ``size`` (position embedding resampled once)."""
    fixed = copy.deepcopy(classifier).eval()
    owner = fixed.backbone if hasattr(fixed.backbone, "set_input_size") else getattr(fixed.backbone, "model", None)
    if hasattr(owner, "set_input_size"):  # MSHT, timm ViTs; CNNs have no position embedding to fix
        owner.set_input_size(img_size=size)
    return fixed


def export_metadata(meta: dict[str, Any], size: int, run: Path) -> dict[str, Any]:
    decision = meta.get("decision") or {}
    return {
        "format": FORMAT, "source_run": str(run.resolve()), "classes": meta["classes"],
        "positive_class": meta["positive_class"], "image_size": size, "mean": meta["mean"], "std": meta["std"],
        "temperature": float(meta.get("temperature", 1.0)), "threshold": float(decision.get("threshold", 0.5)),
        "target_sensitivity": decision.get("target_sensitivity"),
        "stain_normalization": meta.get("stain_normalization"),  # applied before the graph (finetune.predict)
        "scale": meta.get("scale"),  # the training scale, for finetune.predict --scale
        "input": f"float32 RGB in [0, 1], shape (B, 3, {size}, {size}): the image resized (antialiased) to {size} px, "
                 "the unlit frame of a photograph through an eyepiece first painted as its glass "
                 "(roseprior.scale.fill_unlit); normalisation happens inside",
        "output": "calibrated class probabilities (B, classes); call the positive class when its probability >= "
                  "threshold",
        "dihedral_mean": bool(meta.get("dihedral_mean", False)),  # the graph averages the 8 flips and quarter turns
    }


def export(run: str | Path, fmt: str, out: str | Path, image_size: int | None = None) -> Path:
    """Write the run's selected classifier to ``out`` as ONNX or TorchScript; returns ``out``."""
    run, out = Path(run), Path(out)
    classifier, meta = load_classifier(run)
    size = int(image_size or meta["image_size"])
    if size < 32 or size % 32:
        raise ConfigError(f"--image-size {size}: must be a multiple of 32 (the backbone's stride)")
    model = CalibratedClassifier(fixed_size(classifier, size), meta.get("temperature", 1.0)).eval()
    info = export_metadata(meta, size, run)
    example = torch.rand(2, 3, size, size)
    if fmt == "onnx":
        import onnx

        def write(tmp: Path) -> None:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, input_names=["image"],
                              output_names=["probabilities"], dynamic_shapes=({0: batch},), verbose=False)
            graph = onnx.load(str(tmp))
            onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(info)})
            onnx.save(graph, str(tmp))

    elif fmt == "torchscript":

        def write(tmp: Path) -> None:
            with torch.no_grad():
                traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(info)})

    else:
        raise ConfigError(f"--format {fmt!r}: use onnx or torchscript")
    return atomic_write(out, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finetune out_dir (best.safetensors + best.json)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--out", required=True, help="the file to write (e.g. model.onnx)")
    parser.add_argument("--image-size", type=int, default=None, help="input side in px (default: the run's)")
    args = parser.parse_args(argv)

    def run() -> None:
        if Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a folder; give the file to write, e.g. {Path(args.out) / 'model.onnx'}")
        print(f"finetune.export: wrote {export(args.run, args.format, args.out, args.image_size)} ({args.format})")

    return command_main("finetune.export", run)


if __name__ == "__main__":
    sys.exit(main())
