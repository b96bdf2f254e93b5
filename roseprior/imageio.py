"""Decode any image a microscope, scanner or export tool writes into one form: (H, W, 3) uint8 RGB.

Users' folders mix JPEGs from camera software (EXIF-rotated, sometimes CMYK), 16-bit TIFF/PNG
exports, palette and RGBA PNGs, and the odd truncated or mis-named file. Every stage reads
images through ``read_image`` so they all see the same pixels, and an unreadable file becomes an
``UnreadableImage`` with a short reason instead of a PIL stack trace deep in a DataLoader worker.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from roseprior.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "SkippedFiles", "UnreadableImage", "is_image_file", "read_image"]

# Compared lower-cased, so ``.JPG`` and ``.Tif`` count too.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})

_MAX_REASON = 160  # keep reasons one short line in logs and skipped_files.csv


class UnreadableImage(DataError):
    """A file that cannot be decoded as an image; ``reason`` says why in a few words."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable, so DataLoader workers can send it back to the main process
        return (type(self), (self.path, self.reason))


def is_image_file(path: str | Path) -> bool:
    """Whether the name has one of ``IMAGE_EXTENSIONS`` (any case); the content is not checked."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | Path, check_only: bool = False) -> np.ndarray | None:
    """Read ``path`` as (H, W, 3) uint8 RGB, upright, whatever its mode or bit depth.

    Raises ``UnreadableImage`` for missing, empty, truncated, corrupt or non-image files.
    ``check_only``: decode the whole stream (so truncation and corruption still surface) but, for a
    JPEG, at 1/8 scale, and return None: checking a folder costs little memory even for huge fields.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except OSError as err:
        raise UnreadableImage(path, _short(f"cannot stat: {err.strerror or err}")) from None
    if path.is_dir():
        raise UnreadableImage(path, "is a folder, not an image file")
    if size == 0:
        raise UnreadableImage(path, "empty file (0 bytes)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UnreadableImage(path, _short(f"cannot read: {err.strerror or err}")) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if check_only:
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()  # decodes fully: truncation surfaces here, not later in a worker
            if check_only:
                return None
            pixels = _to_rgb_uint8(_upright(img), path)
        # The decoded image is released before the one writable copy: peak memory is twice the
        # image, not four times (a 8000x6000 field is 144 MB).
        return pixels if pixels.flags.writeable else pixels.copy()
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image (PIL cannot identify the format)") from None
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as err:
        raise UnreadableImage(path, _short(f"too large to decode safely: {err}")) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as err:
        # PIL's plugins report damaged data through any of these.
        raise UnreadableImage(path, _short(f"truncated or corrupt ({err})")) from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (in place: no copy of an upright image); a damaged EXIF block
    leaves the pixels as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # the pixels are fine; only the metadata is broken
        pass
    return img


def _to_rgb_uint8(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        # Transparent areas of slide exports are background: show them as white glass, not black.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    if mode.startswith("I") or mode == "F":
        gray = _high_depth_to_uint8(np.asarray(img), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)  # read-only; read_image copies it once the image is freed
    try:
        # 1, L, P, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, HSV.
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as err:
        raise UnreadableImage(path, _short(f"unsupported image mode {mode} ({err})")) from None


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit and float grey levels to 0..255.

    PIL's own ``convert("L")`` clips them at 255, which turns a 16-bit image white; we rescale.
    Integer data that fits 16 bits (``I;16*`` modes, and ``I`` as 16-bit files often decode) is
    mapped by its full scale 65535, so exposure is kept; floats in [0, 1] by 255; anything else
    (signed or wider data) is stretched from its minimum to its maximum.
    """
    values = values.astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode.startswith("I") and lo >= 0 and hi <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


class SkippedFiles:
    """Files left out because they could not be read, so a run can say which and why."""

    FILENAME = "skipped_files.csv"

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []
        self.csv_path: Path | None = None

    def add(self, path: str | Path, reason: str) -> None:
        self.entries.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def write_csv(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/skipped_files.csv`` (path,reason); header only when nothing was skipped,
        so a stale list from an earlier run never survives."""
        from roseprior.checkpoint import atomic_write_csv

        self.csv_path = atomic_write_csv(Path(out_dir) / self.FILENAME, ["path", "reason"], self.entries)
        return self.csv_path

    def check(self, total: int, max_fraction: float) -> None:
        """Raise ``DataError`` when more than ``max_fraction`` of ``total`` images were unreadable."""
        if total <= 0 or not self.entries:
            return
        fraction = len(self.entries) / total
        if fraction <= max_fraction:
            return
        if self.csv_path is not None:
            where = f"see {self.csv_path}"
        else:
            path, reason = self.entries[0]
            where = f"first: {path}: {reason}"
        raise DataError(
            f"{len(self.entries)} of {total} images ({100 * fraction:.1f}%) could not be read, "
            f"more than the allowed {100 * max_fraction:g}% (data.max_unreadable_fraction); {where}"
        )
