"""``python -m finetune.predict --ckpt OUT_DIR --images FOLDER --out preds.csv``: N/P probabilities.

The users' main use after training: score a folder of new images with the selected checkpoint.
Images get exactly the evaluation preprocessing (the same resize, no augmentation). A file that
cannot be decoded is listed in the CSV with its reason (empty probabilities) and counted in the
summary; it never stops the run.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from roseprior.checkpoint import atomic_write_text
from roseprior.data import find_images
from roseprior.errors import DataError, RosepriorError
from roseprior.imageio import UnreadableImage, read_image

from .model import Classifier, load_classifier

__all__ = ["predict_paths", "main"]


def _batches(paths: Sequence[Path], size: int, batch_size: int) -> Iterator[tuple[list[Path], torch.Tensor | None, list]]:
    """Decoded, resized batches, plus the (path, reason) of each file that did not decode."""
    from torchvision.transforms.v2 import functional as F

    for start in range(0, len(paths), batch_size):
        good, images, bad = [], [], []
        for path in paths[start : start + batch_size]:
            try:
                image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
            except UnreadableImage as err:
                bad.append((path, err.reason))
                continue
            images.append(F.resize(image, [size, size], antialias=True))
            good.append(path)
        yield good, (torch.stack(images) if images else None), bad


@torch.no_grad()
def predict_paths(
    model: Classifier, paths: Sequence[Path], image_size: int, batch_size: int = 16, device: str = "cpu"
) -> tuple[dict[Path, np.ndarray], list[tuple[Path, str]]]:
    """Class probabilities per readable path, and the unreadable paths with their reasons."""
    model = model.to(device).eval()
    probs: dict[Path, np.ndarray] = {}
    unreadable: list[tuple[Path, str]] = []
    bar = tqdm(total=len(paths), desc="predict", unit="img")
    for good, images, bad in _batches(paths, image_size, batch_size):
        unreadable.extend(bad)
        if images is not None:
            p = model(images.to(device).float().div_(255.0)).float().softmax(dim=1).cpu().numpy()
            probs.update(zip(good, p, strict=True))
        bar.update(len(good) + len(bad))
    bar.close()
    return probs, unreadable


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
    try:
        torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.predict",
        description="Class probabilities for every image under a folder, with a finetune run's best checkpoint.",
    )
    parser.add_argument("--ckpt", required=True, help="the finetune out_dir (holding best.safetensors + best.json)")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="CSV to write: path, p_<class>..., predicted, error")
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.is_dir():  # checked before any work, not after every prediction
            raise DataError(f"--out {out} is a folder; give the path of the CSV file to write, e.g. {out / 'preds.csv'}")
        device = _device(args.device)
        model, meta = load_classifier(args.ckpt)
        classes = list(meta["classes"])
        paths = find_images(args.images)
        if not paths:
            raise DataError(f"no images under {args.images}")
        probs, unreadable = predict_paths(model, paths, int(meta["image_size"]), args.batch_size, device)
        reasons = dict(unreadable)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", *(f"p_{c}" for c in classes), "predicted", "error"])
        for path in paths:
            if path in probs:
                p = probs[path]
                writer.writerow([str(path), *(f"{v:.6f}" for v in p), classes[int(p.argmax())], ""])
            else:
                writer.writerow([str(path), *([""] * len(classes)), "", reasons.get(path, "unreadable")])
        atomic_write_text(out, buffer.getvalue())
    except RosepriorError as err:
        print(f"finetune.predict: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"finetune.predict: error: cannot write {args.out}: {err.strerror}", file=sys.stderr)
        return 2
    print(f"finetune.predict: {len(probs)} image(s) scored, {len(unreadable)} unreadable -> {args.out}")
    for path, reason in unreadable[:20]:
        print(f"  unreadable: {path}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
