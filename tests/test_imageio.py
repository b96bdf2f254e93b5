"""read_image turns every mode and bit depth into upright 8-bit RGB, and names the file it cannot read."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from roseprior.errors import DataError
from roseprior.imageio import IMAGE_EXTENSIONS, SkippedFiles, UnreadableImage, is_image_file, read_image


def _jpeg_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Readable images of every kind
# ----------------------------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = _gradient()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("name", ["a.bmp", "a.tif", "a.TIFF", "a.webp"])
def test_lossless_formats_round_trip(tmp_path, name):
    pixels = _gradient()
    Image.fromarray(pixels).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
    np.testing.assert_array_equal(read_image(tmp_path / name), pixels)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really a 16-bit file
    out = read_image(tmp_path / "deep.png")
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    # v * 255 / 65535, rounded: 1000 -> 4 (clipping would give 255), 32768 -> 128, 65535 -> 255.
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 4, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_tiff_and_float_tiff(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.tif")[0, :, 0], [0, 255])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "float.tiff")[0, :, 0], [0, 128, 255])


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red stays red
    rgba[0, 1] = [0, 0, 255, 0]  # fully transparent becomes white, whatever its colour
    rgba[0, 2] = [0, 0, 0, 128]  # half-transparent black becomes mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = read_image(tmp_path / "alpha.png").astype(int)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert np.abs(out[0, 2] - 127).max() <= 1


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    rgb = _gradient(8, 8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    expected = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), expected)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = [200, 40, 40]
    pixels[:, 8:] = [40, 40, 200]
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - pixels).mean() < 10  # colours survive, not inverted


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40 wide x 20 high: top half red, bottom half blue. Orientation 6 means "rotate 90°
    # clockwise to display", so the shown image is 20 wide x 40 high with red on the right.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:10] = [255, 0, 0]
    pixels[10:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rotated.jpg").write_bytes(_jpeg_bytes(pixels, exif=exif))
    out = read_image(tmp_path / "rotated.jpg").astype(int)
    assert out.shape == (40, 20, 3)
    right, left = out[:, 12:], out[:, :8]
    assert right[..., 0].mean() > 200 and right[..., 2].mean() < 60
    assert left[..., 2].mean() > 200 and left[..., 0].mean() < 60


def test_uppercase_extension_counts():
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"} == set(IMAGE_EXTENSIONS)
    assert is_image_file("a/B.JPG") and is_image_file("x.Tiff") and is_image_file("y.webp")
    assert not is_image_file("notes.txt") and not is_image_file("manifest.csv")


# ----------------------------------------------------------------------------------------------
# Unreadable files: UnreadableImage with the path and a short reason
# ----------------------------------------------------------------------------------------------


def _unreadable(path) -> UnreadableImage:
    with pytest.raises(UnreadableImage) as info:
        read_image(path)
    err = info.value
    assert isinstance(err, DataError)
    assert err.path == str(path) and str(path) in str(err)
    assert 0 < len(err.reason) <= 160
    return err


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes(_gradient(64, 64))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert "truncated" in _unreadable(tmp_path / "cut.jpg").reason


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in _unreadable(tmp_path / "empty.png").reason


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n" * 10)
    assert "not an image" in _unreadable(tmp_path / "notes.jpg").reason


def test_missing_file_and_folder(tmp_path):
    assert "not found" in _unreadable(tmp_path / "nowhere.png").reason
    (tmp_path / "dir.png").mkdir()
    assert "folder" in _unreadable(tmp_path / "dir.png").reason


def test_unreadable_image_survives_pickling():
    # DataLoader workers pickle exceptions back to the main process.
    err = pickle.loads(pickle.dumps(UnreadableImage("a/b.jpg", "empty file (0 bytes)")))
    assert isinstance(err, UnreadableImage) and err.path == "a/b.jpg" and err.reason == "empty file (0 bytes)"


# ----------------------------------------------------------------------------------------------
# SkippedFiles
# ----------------------------------------------------------------------------------------------


def test_skipped_files_csv_contents(tmp_path):
    skipped = SkippedFiles()
    skipped.add(tmp_path / "a.jpg", "empty file (0 bytes)")
    skipped.add("b,with comma.png", "truncated or corrupt (x)")
    path = skipped.write_csv(tmp_path / "run")
    assert path == tmp_path / "run" / "skipped_files.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "path,reason"
    assert lines[1] == f"{tmp_path / 'a.jpg'},empty file (0 bytes)"
    assert lines[2] == '"b,with comma.png",truncated or corrupt (x)'  # quoted, still two columns
    assert len(skipped) == 2


def test_skipped_files_threshold(tmp_path):
    skipped = SkippedFiles()
    skipped.add("a.jpg", "empty file (0 bytes)")
    skipped.check(total=20, max_fraction=0.05)  # 1 of 20 = 5%: allowed
    skipped.add("b.jpg", "not an image (PIL cannot identify the format)")
    csv_path = skipped.write_csv(tmp_path)
    with pytest.raises(DataError) as info:
        skipped.check(total=20, max_fraction=0.05)
    message = str(info.value)
    assert "2 of 20 images (10.0%) could not be read" in message
    assert "more than the allowed 5% (data.max_unreadable_fraction)" in message
    assert str(csv_path) in message
    SkippedFiles().check(total=0, max_fraction=0.0)  # nothing to check, no error
