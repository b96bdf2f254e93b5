"""Properties of the batched image ops: identities, structure kept, no fill, determinism, dtypes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from roseprior import imageops
from roseprior.errors import ConfigError, DataError

DATA = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------


def stained_image(h_vec, e_vec, seed: int, size: int = 64, h_scale: float = 1.0, e_scale: float = 1.0):
    """A Beer-Lambert H&E-like field: haematoxylin nuclei inside eosin cytoplasm, on bright background."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    conc_h = torch.zeros(size, size)
    conc_e = torch.zeros(size, size)
    for _ in range(10):
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        r = 3 + 4 * float(torch.rand(1, generator=g))
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        conc_h = torch.maximum(conc_h, (d2 < r * r).float() * (0.8 + 0.4 * float(torch.rand(1, generator=g))))
        conc_e = torch.maximum(conc_e, (d2 < (2.2 * r) ** 2).float() * (0.9 + 0.4 * float(torch.rand(1, generator=g))))
    conc_e = conc_e * (conc_h == 0)
    noise = torch.rand(2, size, size, generator=g) * 0.05
    h = torch.tensor(h_vec) / torch.tensor(h_vec).norm()
    e = torch.tensor(e_vec) / torch.tensor(e_vec).norm()
    od = (conc_h * h_scale + noise[0])[None] * h[:, None, None] + (conc_e * e_scale + noise[1])[None] * e[:, None, None]
    return (torch.exp(-od) * 0.94).clamp(0, 1)


SOURCE_STAINS = ([0.70, 0.65, 0.30], [0.15, 0.85, 0.50])  # bluish haematoxylin, another eosin
TARGET_STAINS = ([0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581])  # Macenko's reference vectors


def stained_batch(batch: int = 4, size: int = 64) -> torch.Tensor:
    """Source-stained fields: other stain vectors and a paler haematoxylin, stronger eosin than the target."""
    return torch.stack([stained_image(*SOURCE_STAINS, seed=s, size=size, h_scale=0.6, e_scale=1.4)
                        for s in range(batch)])


def bright_batch(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random values in [0.2, 1]: an output pixel below 0.2 can only be fill."""
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.8 * torch.rand(batch, 3, size, size, generator=g)


def smooth_batch(batch: int = 4, size: int = 64) -> torch.Tensor:
    """Low-frequency content, so interpolation error stays small."""
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for b in range(batch):
        channels = [0.5 + 0.3 * torch.sin(2 * math.pi * (xx * (1 + c) + yy * (b + 1) / 2) + c) for c in range(3)]
        images.append(torch.stack(channels))
    return torch.stack(images)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    grey = x.float().mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernel = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernel)
    return g.pow(2).sum(dim=1).sqrt()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def mean_od(x: torch.Tensor) -> torch.Tensor:
    """Mean optical density over stained pixels: the stain statistic normalisation should move."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    od = -torch.log(x.clamp_min(1 / 255))
    tissue = (od > 0.15).all(dim=1, keepdim=True)
    return (od * tissue).sum(dim=(0, 2, 3)) / tissue.sum()


# ---------------------------------------------------------------------------------------------
# Identities and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [imageops.hed_jitter, imageops.random_brightness, imageops.random_white_balance])
def test_strength_zero_is_the_identity(op):
    x = stained_batch()
    assert op(x, 0.0, torch.Generator().manual_seed(0)) is x
    assert op(x, 0, None) is x


def test_zero_parameters_leave_images_unchanged():
    x = bright_batch()
    assert imageops.gaussian_blur(x, 0.0) is x
    torch.testing.assert_close(imageops.hed_shift(x, 1.0, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(imageops.zoom(x, 1.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(imageops.rotate(x, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(imageops.rotate(x, 360.0), x, atol=1e-4, rtol=0)


ALL_OPS = {
    "hed_jitter": lambda x: imageops.hed_jitter(x, 0.2, torch.Generator().manual_seed(1)),
    "brightness_shift": lambda x: imageops.brightness_shift(x, 0.1),
    "white_balance_shift": lambda x: imageops.white_balance_shift(x, [1.1, 1.0, 0.9]),
    "random_brightness": lambda x: imageops.random_brightness(x, 0.2, torch.Generator().manual_seed(1)),
    "random_white_balance": lambda x: imageops.random_white_balance(x, 0.2, torch.Generator().manual_seed(1)),
    "gaussian_blur": lambda x: imageops.gaussian_blur(x, 1.5),
    "gaussian_blur_per_image": lambda x: imageops.gaussian_blur(x, torch.tensor([0.0, 0.5, 1.0, 2.0])),
    "zoom": lambda x: imageops.zoom(x, torch.tensor([0.5, 0.8, 1.5, 2.0])),
    "rotate": lambda x: imageops.rotate(x, torch.tensor([10.0, 45.0, 90.0, 200.0])),
    "random_rotate": lambda x: imageops.random_rotate(x, torch.Generator().manual_seed(1)),
    "random_flip_rot90": lambda x: imageops.random_flip_rot90(x, torch.Generator().manual_seed(1)),
    "crop_resize": lambda x: imageops.crop_resize(x, torch.tensor([[0, 0, 0, 32, 32], [3, 4, 4, 20, 28.0]]), 16),
    "resample": lambda x: imageops.resample(x, 0.37),
}


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_uint8_in_uint8_out_and_same_values_as_float(name):
    x8 = (bright_batch() * 255).round().to(torch.uint8)
    out8 = ALL_OPS[name](x8)
    assert out8.dtype == torch.uint8
    out_float = ALL_OPS[name](x8.float() / 255)
    assert out_float.dtype == torch.float32
    assert out8.shape == out_float.shape
    # uint8 is the float result rounded: at most one grey level apart.
    assert (out8.float() - out_float * 255).abs().max() <= 0.5 + 1e-3


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_batch_of_four_keeps_shape_range_and_device(name):
    x = bright_batch()
    out = ALL_OPS[name](x)
    if name not in ("crop_resize", "resample"):
        assert out.shape == x.shape
    assert out.device == x.device and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_half_precision_is_returned_in_its_own_dtype():
    x = bright_batch().to(torch.bfloat16)
    assert imageops.rotate(x, 30.0).dtype == torch.bfloat16
    assert imageops.hed_jitter(x, 0.05, torch.Generator().manual_seed(0)).dtype == torch.bfloat16


def test_bad_inputs_raise_project_errors():
    with pytest.raises(DataError, match="B, 3, H, W"):
        imageops.rotate(torch.rand(3, 8, 8), 10.0)
    with pytest.raises(DataError, match="uint8 or float"):
        imageops.zoom(torch.ones(1, 3, 8, 8, dtype=torch.int64), 2.0)
    with pytest.raises(ConfigError, match="strength"):
        imageops.hed_jitter(bright_batch(), 1.5)
    with pytest.raises(ConfigError, match="factor"):
        imageops.zoom(bright_batch(), 0.0)
    with pytest.raises(ConfigError, match="delta"):
        imageops.brightness_shift(bright_batch(), torch.zeros(3))
    with pytest.raises(ConfigError, match="gains"):
        imageops.white_balance_shift(bright_batch(), torch.ones(4, 2))


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

RANDOM_OPS = {
    "hed_jitter": lambda x, g: imageops.hed_jitter(x, 0.2, g),
    "random_brightness": lambda x, g: imageops.random_brightness(x, 0.2, g),
    "random_white_balance": lambda x, g: imageops.random_white_balance(x, 0.2, g),
    "random_rotate": lambda x, g: imageops.random_rotate(x, g),
    "random_flip_rot90": lambda x, g: imageops.random_flip_rot90(x, g),
}


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_same_seed_same_output_different_seed_different_output(name):
    x = bright_batch(batch=8)
    op = RANDOM_OPS[name]
    first = op(x, torch.Generator().manual_seed(123))
    again = op(x, torch.Generator().manual_seed(123))
    other = op(x, torch.Generator().manual_seed(456))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


def test_random_parameters_differ_between_images_of_a_batch():
    x = bright_batch(batch=1).expand(4, -1, -1, -1)
    out = imageops.hed_jitter(x, 0.2, torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], out[1])


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------


def test_hed_jitter_changes_colour_but_keeps_structure():
    x = stained_batch()
    out = imageops.hed_jitter(x, imageops.HED_STRONG, torch.Generator().manual_seed(0))
    edges_before, edges_after = sobel_magnitude(x), sobel_magnitude(out)
    for b in range(len(x)):
        assert correlation(edges_before[b], edges_after[b]) > 0.8
        assert (out[b].mean(dim=(1, 2)) - x[b].mean(dim=(1, 2))).abs().max() > 0.01


def test_hed_jitter_light_moves_colour_less_than_strong():
    x = stained_batch()
    shift = {}
    for strength in (imageops.HED_LIGHT, imageops.HED_STRONG):
        out = imageops.hed_jitter(x, strength, torch.Generator().manual_seed(0))
        shift[strength] = float((out.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().mean())
    assert 0 < shift[imageops.HED_LIGHT] < shift[imageops.HED_STRONG]


def test_hed_shift_matches_skimage_colour_deconvolution():
    skimage_color = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(0)
    hed = rng.uniform(0.0, 0.08, size=(12, 12, 3))  # skimage's units: OD / ln(1e6)
    rgb = skimage_color.combine_stains(hed, skimage_color.rgb_from_hed)
    alpha, beta = np.array([1.3, 0.8, 1.0]), np.array([0.1, -0.05, 0.02])  # beta in OD units
    expected = skimage_color.combine_stains(hed * alpha + beta / math.log(1e6), skimage_color.rgb_from_hed)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    out = imageops.hed_shift(x, torch.tensor(alpha), torch.tensor(beta))
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_hed_more_haematoxylin_only_darkens_and_most_where_haematoxylin_is():
    # Stained exactly with Ruifrok's H and E vectors, so the deconvolution recovers the concentrations.
    g = torch.Generator().manual_seed(0)
    conc = torch.rand(4, 2, 16, 16, generator=g)
    conc[:, 0, :, :8] = 0  # left half: eosin only
    stains = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    x = torch.exp(-torch.einsum("bshw,sc->bchw", conc, stains))
    out = imageops.hed_shift(x, torch.tensor([1.5, 1.0, 1.0]), 0.0)
    assert torch.all(out <= x + 1e-5)  # more stain only absorbs more light
    torch.testing.assert_close(out[..., :8], x[..., :8], atol=1e-5, rtol=0)
    assert (x - out)[..., 8:].mean() > 0.02


def test_brightness_and_white_balance_arithmetic():
    x = bright_batch()
    torch.testing.assert_close(imageops.brightness_shift(x, 0.1), (x + 0.1).clamp(0, 1))
    delta = torch.tensor([-0.1, 0.0, 0.1, 0.2])
    torch.testing.assert_close(imageops.brightness_shift(x, delta), (x + delta[:, None, None, None]).clamp(0, 1))
    gains = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 1.0], [1.0, 0.5, 1.2], [0.9, 1.1, 1.0]])
    out = imageops.white_balance_shift(x, gains)
    torch.testing.assert_close(out, (x * gains[:, :, None, None]).clamp(0, 1))
    torch.testing.assert_close(out[0], x[0])


def test_random_brightness_and_white_balance_stay_within_strength():
    x = torch.full((16, 3, 4, 4), 0.5)
    g = torch.Generator().manual_seed(0)
    delta = imageops.random_brightness(x, 0.1, g)[:, 0, 0, 0] - 0.5
    assert delta.abs().max() <= 0.1 + 1e-6 and delta.std() > 0.02
    gains = imageops.random_white_balance(x, 0.1, g)[:, :, 0, 0] / 0.5
    assert (gains - 1).abs().max() <= 0.1 + 1e-6 and gains.std() > 0.02


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def test_per_image_sigma_matches_torchvision_per_image():
    x = bright_batch()
    sigmas = [0.0, 0.7, 1.3, 2.5]
    out = imageops.gaussian_blur(x, torch.tensor(sigmas))
    torch.testing.assert_close(out[0], x[0])
    for b, sigma in enumerate(sigmas[1:], start=1):
        radius = math.ceil(3 * sigma)
        reference = TF.gaussian_blur(x[b : b + 1], kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
        torch.testing.assert_close(out[b : b + 1], reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(imageops.gaussian_blur(x[b : b + 1], sigma), reference, atol=1e-5, rtol=0)


def test_blur_smooths_more_with_larger_sigma():
    x = bright_batch(batch=1).expand(3, -1, -1, -1)
    out = imageops.gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]))
    energy = sobel_magnitude(out).mean(dim=(1, 2))
    assert energy[0] > energy[1] > energy[2]
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------
# Zoom and rotation
# ---------------------------------------------------------------------------------------------


def test_zoom_in_magnifies_the_centre():
    x = bright_batch(size=32)
    out = imageops.zoom(x, 2.0)
    reference = F.interpolate(x[:, :, 8:24, 8:24], scale_factor=2, mode="bilinear", align_corners=False)
    # Only the outer ring differs: interpolate clamps at the crop edge, zoom reads the real neighbours.
    torch.testing.assert_close(out[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_zoom_in_then_out_restores_the_centre():
    x = smooth_batch(size=64)
    back = imageops.zoom(imageops.zoom(x, 2.0), 0.5)
    centre = (..., slice(18, 46), slice(18, 46))  # inside the middle half, away from its edge
    error = (back[centre] - x[centre]).abs()
    assert error.mean() < 0.01 and error.max() < 0.05


def test_zoom_keeps_size_and_fills_with_content_not_constant():
    x = bright_batch(size=32)
    factors = torch.tensor([0.5, 0.6, 0.8, 2.0])
    out = imageops.zoom(x, factors)
    assert out.shape == x.shape
    assert out.min() >= 0.2 - 1e-6  # bilinear mixes of values >= 0.2: nothing was filled
    for b, factor in enumerate(factors.tolist()):  # per-image factors equal one call per image
        torch.testing.assert_close(out[b : b + 1], imageops.zoom(x[b : b + 1], factor), atol=1e-5, rtol=0)


def test_zoom_out_shrinks_content_about_the_centre():
    x = torch.full((1, 3, 33, 33), 0.8)
    x[..., 12:21, 12:21] = 0.2  # 9-pixel dark square in the centre
    out = imageops.zoom(x, 0.5, antialias=False)
    middle = (out[0, 0, 8:25, 8:25] < 0.5).float()  # the outer ring holds mirrored copies
    rows = middle.sum(dim=1).nonzero().flatten() + 8
    assert 3 <= len(rows) <= 6  # about 4.5 pixels high now
    assert abs(float(rows.float().mean()) - 16) <= 0.5  # still centred
    assert out.min() >= 0.2 - 1e-6


def test_rotation_leaves_no_fill_and_matches_plain_rotation_in_the_centre():
    x = bright_batch(size=32)
    angles = [17.0, 45.0, 123.0, 300.0]
    out = imageops.rotate(x, torch.tensor(angles))
    assert out.min() >= 0.2 - 1e-6 and not (out == 0).any()
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 10**2  # a disc that never leaves the source
    for b, angle in enumerate(angles):
        plain = TF.rotate(x[b : b + 1], angle, interpolation=InterpolationMode.BILINEAR)
        assert (plain == 0).any()  # the black corners we avoid
        torch.testing.assert_close(out[b][:, centre], plain[0][:, centre], atol=1e-4, rtol=0)


def test_rotation_by_quarter_turns_is_exact_and_handles_non_square():
    x = bright_batch(size=24)
    torch.testing.assert_close(imageops.rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(imageops.rotate(x, 180.0), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5, rtol=0)
    wide = bright_batch(size=24)[..., :16, :]
    turned = imageops.rotate(wide, 180.0)
    assert turned.shape == wide.shape
    torch.testing.assert_close(turned, torch.rot90(wide, 2, dims=(2, 3)), atol=1e-5, rtol=0)


def test_random_rotate_draws_many_angles():
    x = bright_batch(batch=1, size=16).expand(6, -1, -1, -1)
    out = imageops.random_rotate(x, torch.Generator().manual_seed(0))
    assert len({tuple(img.flatten()[:8].tolist()) for img in out}) == 6
    assert out.min() >= 0.2 - 1e-6


def test_random_flip_rot90_gives_dihedral_transforms_of_each_image():
    x = bright_batch(batch=16, size=8)
    out = imageops.random_flip_rot90(x, torch.Generator().manual_seed(0))
    used = set()
    for b in range(len(x)):
        candidates = [torch.rot90(img, k, dims=(1, 2)) for img in (x[b], x[b].flip(-1)) for k in range(4)]
        matches = [i for i, c in enumerate(candidates) if torch.equal(c, out[b])]
        assert len(matches) == 1
        used.add(matches[0])
    assert len(used) >= 4
    with pytest.raises(DataError, match="square"):
        imageops.random_flip_rot90(torch.rand(2, 3, 8, 10))


def test_dihedral_views_are_the_eight_symmetries_of_a_square_and_four_of_a_rectangle():
    x = bright_batch(batch=2, size=8)
    views = imageops.dihedral_views(x)
    expected = [torch.rot90(img, k, dims=(-2, -1)) for img in (x, x.flip(-1)) for k in range(4)]
    assert len(views) == 8 and torch.equal(views[0], x)
    for view in views:  # each view is one of the group, and no two views are the same one
        assert sum(torch.equal(view, e) for e in expected) == 1
    assert len({tuple(v[0].flatten().tolist()) for v in views}) == 8
    wide = torch.rand(1, 3, 6, 10)
    kept = imageops.dihedral_views(wide)
    assert len(kept) == 4 and all(v.shape == wide.shape for v in kept)
    assert any(torch.equal(v, wide.flip(-2)) for v in kept) and any(torch.equal(v, wide.flip(-1, -2)) for v in kept)


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def test_crop_resize_shapes_many_crops_many_scales():
    x = bright_batch(size=64)
    boxes = torch.tensor([[0, 0, 0, 64, 64], [1, 10, 5, 42, 37], [2, 0, 0, 16, 16], [3, 8, 8, 56, 40],
                          [0, 30, 30, 38, 38], [3, 0, 0, 64, 64]], dtype=torch.float32)
    assert imageops.crop_resize(x, boxes, 24).shape == (6, 3, 24, 24)
    assert imageops.crop_resize(x, boxes, (16, 20)).shape == (6, 3, 16, 20)


def test_crop_resize_full_box_same_size_reproduces_the_image():
    x = bright_batch(size=32)
    boxes = torch.tensor([[b, 0, 0, 32, 32] for b in range(4)], dtype=torch.float32)
    torch.testing.assert_close(imageops.crop_resize(x, boxes, 32), x, atol=1e-6, rtol=0)
    crop = imageops.crop_resize(x, torch.tensor([[2, 4.0, 8.0, 20.0, 24.0]]), 16)
    torch.testing.assert_close(crop[0], x[2, :, 8:24, 4:20], atol=1e-6, rtol=0)


def test_resample_sizes_antialiasing_and_identity():
    x = bright_batch(size=32)
    assert imageops.resample(x, 1.0) is x  # nothing to do: the same tensor, no copy
    assert imageops.resample(x[:, :, :30, :20], 0.5).shape == (4, 3, 15, 10)
    assert imageops.resample(x, 1 / 64).shape == (4, 3, 1, 1)  # never a side of 0
    assert imageops.resample(x, 1.5).shape == (4, 3, 48, 48)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    fine = checker.float().expand(1, 3, 32, 32).contiguous()
    shrunk = imageops.resample(fine, 0.25)  # antialiased: pixel-scale texture averages to grey, no moire
    assert (shrunk - 0.5).abs().max() < 0.05
    smooth = imageops.gaussian_blur(x, 2.0)
    back = imageops.resample(imageops.resample(smooth, 2.0), 0.5)
    assert (back - smooth).abs().mean() < 0.01
    with pytest.raises(ConfigError, match="factor must be > 0"):
        imageops.resample(x, 0.0)


def test_crop_resize_downscaling_averages_source_pixels():
    x = bright_batch(size=32)
    boxes = torch.tensor([[b, 0, 0, 32, 32] for b in range(4)], dtype=torch.float32)
    torch.testing.assert_close(imageops.crop_resize(x, boxes, 16), F.avg_pool2d(x, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(imageops.crop_resize(x, boxes, 8), F.avg_pool2d(x, 4), atol=1e-6, rtol=0)


def test_crop_resize_moves_boxes_inside_instead_of_filling():
    x = bright_batch(size=32)
    outside = torch.tensor([[0, -8.0, -8.0, 8.0, 8.0], [1, 24.0, 20.0, 40.0, 36.0], [2, -4.0, 0.0, 36.0, 32.0]])
    out = imageops.crop_resize(x, outside, 16)
    assert out.min() >= 0.2 - 1e-6
    torch.testing.assert_close(out[0], x[0, :, 0:16, 0:16], atol=1e-6, rtol=0)  # slid, same size
    torch.testing.assert_close(out[1], x[1, :, 16:32, 16:32], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], F.avg_pool2d(x[2:3], 2)[0], atol=1e-6, rtol=0)  # larger: cut to image


def test_crop_resize_rejects_bad_boxes():
    x = bright_batch(size=16)
    with pytest.raises(DataError, match="batch index"):
        imageops.crop_resize(x, torch.tensor([[4, 0, 0, 8, 8.0]]), 8)
    with pytest.raises(DataError, match="x2 <= x1"):
        imageops.crop_resize(x, torch.tensor([[0, 8, 0, 8, 8.0]]), 8)
    with pytest.raises(DataError, match=r"\(K, 5\)"):
        imageops.crop_resize(x, torch.tensor([[0, 0, 8, 8.0]]), 8)


# ---------------------------------------------------------------------------------------------
# Stain normalisation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stain_target() -> torch.Tensor:
    return stained_image(*TARGET_STAINS, seed=99, h_scale=1.3, e_scale=0.7)


def test_macenko_moves_stain_statistics_toward_the_target(stain_target):
    source = stained_batch()
    normalizer = imageops.StainNormalizer("macenko").fit(stain_target)
    out = normalizer(source)
    assert out.shape == source.shape and normalizer.num_failed == 0
    target_od = mean_od(stain_target[None])
    for b in range(len(source)):
        before = (mean_od(source[b : b + 1]) - target_od).norm()
        after = (mean_od(out[b : b + 1]) - target_od).norm()
        assert after < 0.5 * before
    # The stain vectors Macenko finds in the output are the target's, not the source's.
    target_vectors = normalizer._normalizer.HERef.clone()
    refit = imageops.StainNormalizer("macenko").fit(out)._normalizer.HERef
    source_vectors = imageops.StainNormalizer("macenko").fit(source)._normalizer.HERef
    assert (refit - target_vectors).norm() < 0.2 * (source_vectors - target_vectors).norm()


def test_a_site_wide_source_keeps_a_dark_nucleus_darker_than_a_pale_one(stain_target):
    """Per image, Macenko sets each image's darkest stain to the target's: a hyperchromatic cell and a pale one
    of the same slide come out alike. Measured once over the site (``fit_source``), one map moves both and the
    dark one stays darker, by about the ratio it had; it still takes the target's stain vectors."""
    pale = stained_image(*SOURCE_STAINS, seed=1, h_scale=0.6, e_scale=0.4)
    dark = stained_image(*SOURCE_STAINS, seed=1, h_scale=1.2, e_scale=0.4)
    site = torch.stack([pale, dark])
    per_image = imageops.StainNormalizer("macenko").fit(stain_target)(site)
    site_wide = imageops.StainNormalizer("macenko").fit(stain_target).fit_source(site)
    mapped = site_wide(site)
    assert site_wide.num_failed == 0

    def darkness(x):
        return torch.log(x.clamp_min(1 / 255)).sum(0).amin().neg()  # the densest pixel: a nucleus's centre

    assert darkness(per_image[1]) / darkness(per_image[0]) < 1.15  # per image: alike
    assert darkness(mapped[1]) / darkness(mapped[0]) > 1.5  # one map: dark stays dark (1.8 before, 1.9 after)
    target_h = site_wide._normalizer.HERef[:, 0]  # haematoxylin: the stain these fields are mostly of
    refit_h = imageops.StainNormalizer("macenko").fit(mapped)._normalizer.HERef[:, 0]
    source_h = imageops.StainNormalizer("macenko").fit(site)._normalizer.HERef[:, 0]
    assert (refit_h - target_h).norm() < 0.2 * (source_h - target_h).norm()
    # One image as its own site: the per-image rule (up to torchstain's rounding to whole grey levels).
    alone = imageops.StainNormalizer("macenko").fit(stain_target).fit_source(pale[None])
    torch.testing.assert_close(alone(pale[None]), per_image[:1], atol=1.5 / 255, rtol=0)
    # The site measured once and paired with a target fitted once: the same map, and the target left per-image.
    target_only = imageops.StainNormalizer("macenko").fit(stain_target)
    torch.testing.assert_close(target_only.mapping(imageops.StainNormalizer("macenko").fit(site))(site), mapped)
    assert target_only.source is None
    # Saved and loaded as plain numbers, the source comes along.
    reloaded = imageops.StainNormalizer.from_state_dict(json.loads(json.dumps(site_wide.state_dict())))
    torch.testing.assert_close(reloaded(site), mapped)
    with pytest.raises(ConfigError, match="Macenko"):
        imageops.StainNormalizer("reinhard").fit(stain_target).fit_source(site)
    with pytest.raises(DataError, match="fit_source"):
        imageops.StainNormalizer("macenko").fit(stain_target).fit_source(torch.full((1, 3, 32, 32), 0.98))


def test_a_site_mapped_to_its_own_stain_keeps_a_third_dye(stain_target):
    """Pap and Romanowsky stains have more dyes than Macenko's two vectors. A site-wide map passes the optical
    density the two vectors do not explain through unchanged: a site mapped to its own stain comes out as it went
    in, orange cytoplasm included, where projecting onto two vectors turned it another colour."""
    orange = torch.tensor([0.05, 0.35, 0.94])  # orange G absorbs blue: neither haematoxylin nor eosin
    fields = []
    for seed in range(4):
        field = stained_image(*SOURCE_STAINS, seed=seed)
        patch = torch.zeros(64, 64)
        patch[8 + 8 * seed:24 + 8 * seed, 30:50] = 0.6
        fields.append(field * torch.exp(-patch[None] * orange[:, None, None]))
    site = torch.stack(fields)
    to_itself = imageops.StainNormalizer("macenko").fit(site).fit_source(site)
    torch.testing.assert_close(to_itself(site), site, atol=1.5 / 255, rtol=0)


def test_blank_field_passes_through_with_a_counted_warning(stain_target):
    batch = torch.cat([stained_batch(batch=2), torch.full((1, 3, 64, 64), 0.97), stained_batch(batch=1)])
    for method in ("macenko", "reinhard"):
        normalizer = imageops.StainNormalizer(method).fit(stain_target)
        with pytest.warns(RuntimeWarning, match="1 of 4 images"):
            out = normalizer(batch)
        assert torch.equal(out[2], batch[2])
        assert not torch.equal(out[0], batch[0])
        assert normalizer.num_failed == 1


def test_reinhard_moves_lab_means_toward_the_target(stain_target):
    skimage_color = pytest.importorskip("skimage.color")

    def lab_mean(x):
        return torch.from_numpy(skimage_color.rgb2lab(x.permute(0, 2, 3, 1).numpy()).mean(axis=(0, 1, 2)))

    source = stained_batch()
    out = imageops.StainNormalizer("reinhard").fit(stain_target)(source)
    target = lab_mean(stain_target[None])
    for b in range(len(source)):
        assert (lab_mean(out[b : b + 1]) - target).norm() < 0.5 * (lab_mean(source[b : b + 1]) - target).norm()


def test_stain_normalizer_dtype_and_misuse(stain_target):
    source8 = (stained_batch(batch=2) * 255).round().to(torch.uint8)
    out = imageops.stain_normalize(source8, stain_target, "macenko")
    assert out.dtype == torch.uint8 and out.shape == source8.shape
    with pytest.raises(ConfigError, match="fit"):
        imageops.StainNormalizer("macenko")(source8)
    with pytest.raises(ConfigError, match="macenko"):
        imageops.StainNormalizer("vahadane")
    with pytest.raises(DataError, match="target"):
        imageops.StainNormalizer("macenko").fit(torch.full((3, 32, 32), 0.98))


@pytest.mark.skipif(not (DATA / "cric_cells").is_dir(), reason="shared real data (../shared/data/cric_cells) absent")
def test_macenko_on_real_cytology_moves_stains_toward_the_target():
    from PIL import Image

    root = DATA / "cric_cells"
    with open(root / "manifest.csv", newline="") as f:
        first_cell_of_field = {}
        for row in csv.DictReader(f):
            first_cell_of_field.setdefault(row["source_image"], row["path"])
    paths = [first_cell_of_field[name] for name in sorted(first_cell_of_field)[:9]]
    images = torch.stack([torch.from_numpy(np.array(Image.open(root / p).convert("RGB"))).permute(2, 0, 1)
                          for p in paths])
    target, source = images[0], images[1:]
    normalizer = imageops.StainNormalizer("macenko").fit(target)
    out = normalizer(source)
    assert normalizer.num_failed == 0 and out.dtype == torch.uint8
    target_od = mean_od(target[None])
    before = torch.stack([(mean_od(s[None]) - target_od).norm() for s in source]).mean()
    after = torch.stack([(mean_od(o[None]) - target_od).norm() for o in out]).mean()
    assert after < 0.7 * before


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_ops_run_on_cuda_and_agree_with_cpu(name):
    x = bright_batch()
    out_gpu = ALL_OPS[name](x.cuda())
    assert out_gpu.device.type == "cuda"
    torch.testing.assert_close(out_gpu.cpu(), ALL_OPS[name](x), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_stain_normalizer_returns_on_cuda(stain_target):
    out = imageops.StainNormalizer("macenko").fit(stain_target.cuda())(stained_batch().cuda())
    assert out.device.type == "cuda"


def test_random_resolution_thins_detail_of_some_images_at_unchanged_size():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 64, 64, generator=g)  # pixel noise: all of it is fine detail
    out = imageops.random_resolution(x, 4.0, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    changed = (out - x).flatten(1).abs().amax(1) > 1e-6
    assert 3 <= int(changed.sum()) <= 13  # about half the images
    torch.testing.assert_close(out[~changed], x[~changed])
    detail = (out[changed] - out[changed].mean((-2, -1), keepdim=True)).std((-2, -1))
    assert bool((detail < 0.8 * x[changed].std((-2, -1))).all())  # detail thinned ...
    torch.testing.assert_close(out[changed].mean((-2, -1)), x[changed].mean((-2, -1)), atol=0.02, rtol=0)  # colour kept
    again = imageops.random_resolution(x, 4.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)  # seeded
    assert imageops.random_resolution(x, 1.0) is x
    with pytest.raises(ConfigError, match="max_factor"):
        imageops.random_resolution(x, 0.5)


def test_random_stain_swap_renders_images_in_a_batch_neighbours_stain_and_keeps_glass_white():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(4, 3, 32, 32)
    x[:, :, 8:24, 8:24] = torch.rand(4, 3, 16, 16, generator=g) * 0.1 + 0.5  # a cell on white glass
    x = imageops.hed_shift(x, torch.tensor([0.5, 1.0, 1.7, 2.6])[:, None].expand(4, 3), 0.0)  # four stain strengths
    before = imageops.stain_strength(list(x))
    out = imageops.random_stain_swap(x, 1.0, torch.Generator().manual_seed(1))
    after = imageops.stain_strength(list(out))
    own = (after - before).abs().amax(1) < 1e-3
    assert not own.any()  # every image left its own strength ...
    nearest = torch.cdist(after, before).argmin(1)
    assert bool((nearest != torch.arange(4)).all())  # ... for the strength of another image of the batch
    torch.testing.assert_close(out[:, :, :4], x[:, :, :4])  # glass stays white
    assert imageops.random_stain_swap(x, 0.0) is x
    half = imageops.random_stain_swap(x.repeat(8, 1, 1, 1), 0.5, torch.Generator().manual_seed(2))
    changed = (half - x.repeat(8, 1, 1, 1)).flatten(1).abs().amax(1) > 1e-4
    assert 6 <= int(changed.sum()) <= 26  # about half of 32
    uint8 = imageops.random_stain_swap((x * 255).round().to(torch.uint8), 1.0, torch.Generator().manual_seed(1))
    assert uint8.dtype == torch.uint8
    with pytest.raises(ConfigError, match="random_stain_swap"):
        imageops.random_stain_swap(x, 1.5)
    targets = torch.tensor([[0.2, 0.05, 0.1], [3.0, 1.0, 2.0]])  # a faint and a dark site
    toward = imageops.stain_strength(list(imageops.random_stain_swap(x, 1.0, torch.Generator().manual_seed(3), targets)))
    ratio = toward[:, None] / targets[None]  # each image now has one target's strength, within the 3x limit
    expected = imageops.stain_swap_factors(before[:, None], targets[None]) * before[:, None] / targets[None]
    assert bool(((ratio / expected - 1).abs().amax(-1) < 0.05).any(1).all())


def test_a_stain_is_measured_on_the_lit_field_of_an_eyepiece_photograph(shared_data: Path) -> None:
    """Macenko fitted on real ROSE fields under a round vignette (black corners) finds the stain of the same fields
    framed whole: the corners are dense neutral density, which pulled the fit to a grey vector."""
    from benchmarks.shift_quality import through_the_eyepiece
    from roseprior.imageio import read_image

    fields = [read_image(p) for p in sorted((shared_data / "rose_examples").rglob("*.jpg"))]
    if len(fields) < 12:
        pytest.skip("rose_examples not in the shared data")

    def stain(images: list[np.ndarray]) -> dict:
        return imageops.StainNormalizer("macenko").fit(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
                                                       ).state_dict()

    for half in (fields[:6], fields[6:]):
        whole, through = stain(half), stain([through_the_eyepiece(f) for f in half])
        assert np.abs(np.array(through["HERef"]) - np.array(whole["HERef"])).max() < 0.05, (whole, through)
        assert np.allclose(through["maxCRef"], whole["maxCRef"], rtol=0.15), (whole, through)
