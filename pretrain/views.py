"""Multi-crop, multi-magnification views cut in batches from decoded images, and the multi-crop forward.

Why not lightly's ``DINOTransform``: it runs PIL ops crop by crop, image by image, on the CPU. Here
each image is decoded once per step and every crop of the batch is cut from the decoded tensor:
on the GPU in one ``roi_align`` call (``roseprior.imageops.crop_resize``), on the CPU with the uint8
antialiased resize (faster there than torchvision's CPU roi_align). Flips, rotations, stain and
acquisition jitter and blur then run on whole batches of views (``benchmarks/views.py`` measures it).

Reproducibility: every random number of a sample's views comes from a generator keyed by
``(seed, epoch, sample index)`` alone, and every op treats each view on its own, so a sample's
views do not depend on which batch, process or data-loader worker it lands in. That is what
lets 2 processes x batch B reproduce 1 process x batch 2B.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed

from roseprior import imageops
from roseprior.data import DecodedImages, spread_indices

from .config import ViewsConfig

__all__ = [
    "DecodedImages", "MultiCropViews", "StainBank", "ViewBatch", "collate_decoded", "crop_resize_cpu", "dihedral_sorted",
    "multicrop_forward", "pad_to_batch", "sample_key",
    "shift_log_image", "stain_and_acquisition_shift",
]

# Columns of the per-view uniform draws (one (n_views, _NUM_DRAWS) tensor per sample).
_SCALE, _ASPECT, _X, _Y, _HFLIP, _SWAP, _ROT, _COLOR, _BLUR, _SIGMA, _BRIGHT = range(11)
_HED = slice(11, 17)  # 3 alphas, 3 betas
_WB = slice(17, 20)
_NUM_DRAWS = 20
_CHUNK_VALUES = 1 << 20  # floats per chunk of views on the CPU (4 MiB: a cache-sized working set)
_SCRATCH = threading.local()  # each thread's reused CPU buffers for the chunks of views (``_scratch``)

ViewBatch = dict[str, list[torch.Tensor]]  # {"global": [(B,3,G,G)] * n_global, "local": [(B,3,L,L)] * n_local}


def sample_key(seed: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed from (seed, epoch, sample index); Python's int-tuple hash is stable."""
    return hash((int(seed), int(epoch), int(index))) & 0x7FFF_FFFF_FFFF_FFFF


def collate_decoded(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch of decoded images as they are: a list (no padding to the largest image, so one huge
    image costs its own memory, not the batch's times its size), their sizes (B, 2) as (h, w), and
    their indices (B,). Views are cut per image on the CPU; ``pad_to_batch`` makes one tensor for the
    GPU's single ``roi_align`` call."""
    sizes = torch.tensor([list(img.shape[1:]) for img, _ in batch], dtype=torch.long)
    indices = torch.tensor([index for _, index in batch], dtype=torch.long)
    return [img for img, _ in batch], sizes, indices


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of ``shape`` reused from chunk to chunk, one set per thread: a new tensor of a few MiB
    is memory the OS maps anew, one page fault per 4 KiB on first touch, a fifth of view-making (measured)."""
    n, buffers = math.prod(shape), _SCRATCH.__dict__
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < n or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(n, dtype=dtype)
    return buffer[:n].view(shape)


def pad_to_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, 3, Hmax, Wmax) of uint8 images of different sizes, edges repeated: a crop touching an
    image's edge blends with its own edge and never with another fill value."""
    height, width = max(img.shape[1] for img in images), max(img.shape[2] for img in images)
    out = images[0].new_empty(len(images), 3, height, width)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        out[i, :, :h, :w] = img
        out[i, :, h:, :w] = img[:, -1:]
        out[i, :, :, w:] = out[i, :, :, w - 1 : w]
    return out


def crop_resize_cpu(images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                    symmetry: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(K, 3, size, size) crops of uint8 ``images`` (a batch, or a list of (3, H, W)) at integer
    ``boxes`` (K, 5), antialiased: uint8 channels-last, or into ``out`` (any dtype and layout).

    The CPU path of ``imageops.crop_resize``: torchvision's CPU ``roi_align`` is single-threaded
    float code, about 8x slower here than PyTorch's uint8 antialiased bilinear resize (an AVX2
    kernel), even called once per crop. Boxes are rounded to whole pixels, as RandomResizedCrop's.
    ``symmetry`` (K,) applies each crop's flip and quarter turns (as ``dihedral_sorted``) on the
    way into ``out``: a quarter turn is a transposed view, which the copy into a planar ``out`` of
    another dtype takes at almost no cost (a transposing copy alone costs a third of the resize).
    """
    if out is None:
        out = torch.empty(len(boxes), size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    turns = symmetry.tolist() if symmetry is not None else [0] * len(boxes)
    for k, ((b, x1, y1, x2, y2), c) in enumerate(zip(boxes.tolist(), turns, strict=True)):
        x1, y1 = int(round(x1)), int(round(y1))
        x2, y2 = max(int(round(x2)), x1 + 1), max(int(round(y2)), y1 + 1)
        crop = images[int(b)][None, :, y1:y2, x1:x2]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if c:
            crop = crop.flip(-1) if c >= 4 else crop
            crop = torch.rot90(crop, c % 4, (-2, -1)) if c % 4 else crop
        out[k].copy_(crop)
    return out


@dataclass
class StainBank:
    """Stain strengths (``imageops.stain_strength``) of a sample of the training images, sorted by domain,
    and the domain of every dataset index: what a stain swap draws its target from.

    A swapped view of an image takes the strength of a bank image of another domain when the data
    has domains (site folders, a manifest ``domain`` column), else of any bank image.
    """

    strengths: torch.Tensor  # (N, 3), bank rows sorted by domain
    start: torch.Tensor  # (D,) first bank row of each domain
    count: torch.Tensor  # (D,) bank rows of each domain
    domain_of: torch.Tensor  # (len(dataset),) domain id of every dataset index

    @classmethod
    def build(cls, dataset: DecodedImages, max_images: int = 512) -> StainBank:
        names = sorted({s.domain or "" for s in dataset.samples})
        domain_of = torch.tensor([names.index(s.domain or "") for s in dataset.samples])
        picked = torch.tensor(spread_indices(len(dataset), max_images), dtype=torch.long)
        strengths = imageops.stain_strength([dataset[int(i)][0] for i in picked])
        order = torch.argsort(domain_of[picked], stable=True)
        count = torch.bincount(domain_of[picked], minlength=len(names))
        return cls(strengths[order], torch.cumsum(count, 0) - count, count, domain_of)

    def swap_alpha(self, u: torch.Tensor, probability: float, source: torch.Tensor, indices: torch.Tensor
                   ) -> torch.Tensor:
        """(B, V, 3) HED scale factors rendering each view in its drawn target's stain, NaN where the view
        keeps its own; ``u`` (B, V) uniforms (below ``probability``: swapped, the rest picks the target)."""
        n = len(self.strengths)
        own = self.domain_of[indices.cpu()]  # the loader may have put the batch on the GPU
        start, count = self.start[own][:, None], self.count[own][:, None]
        others = torch.where(count < n, n - count, n)  # a single-domain bank: any image
        k = (u / probability).clamp_(max=1 - 1e-9).mul_(others).long()
        row = torch.where((count < n) & (k >= start), k + count, k)
        alpha = imageops.stain_swap_factors(source[:, None], self.strengths[row])
        return torch.where((u < probability)[..., None], alpha, torch.nan)


class MultiCropViews:
    """``n_global`` + ``n_local`` augmented views of every image of a batch.

    Example:
        >>> views = MultiCropViews(ViewsConfig(global_size=64, local_size=32), seed=0)
        >>> out = views(images, sizes, indices, epoch=0)  # images: (B, 3, H, W) uint8
        >>> [v.shape for v in out["global"]], [v.shape for v in out["local"]]
    """

    def __init__(self, cfg: ViewsConfig, seed: int = 0, stain_bank: StainBank | None = None) -> None:
        self.cfg = cfg
        self.seed = seed
        self.stain_bank = stain_bank if cfg.stain_swap > 0 else None
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    @property
    def n_views(self) -> int:
        return self.cfg.n_global + self.cfg.n_local

    def draws(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, n_views, _NUM_DRAWS) uniforms; sample i's rows depend only on (seed, epoch, index_i)."""
        out = torch.empty(len(indices), self.n_views, _NUM_DRAWS, dtype=torch.float64)
        generator = torch.Generator()
        for row, index in enumerate(indices.tolist()):
            generator.manual_seed(sample_key(self.seed, epoch, index))
            out[row] = torch.rand(self.n_views, _NUM_DRAWS, generator=generator, dtype=torch.float64)
        return out

    def _scale_range(self, is_global: bool) -> list[float]:
        return self.cfg.magnification if is_global else (self.cfg.local_magnification or self.cfg.magnification)

    def boxes(self, u: torch.Tensor, sizes: torch.Tensor, out_size: int, is_global: bool,
              focus: torch.Tensor | None = None) -> torch.Tensor:
        """(B * V, 5) roi_align boxes, view-major, from the draws ``u`` (B, V, _NUM_DRAWS); ``focus``
        (``darkness_cdf``) centres them on dark parts of each image instead of anywhere."""
        batch, n_views, _ = u.shape
        h = sizes[:, 0].to(torch.float64)[:, None].expand(batch, n_views)
        w = sizes[:, 1].to(torch.float64)[:, None].expand(batch, n_views)
        if self.cfg.scale_mode == "magnification":
            low, high = self._scale_range(is_global)
            magnification = torch.exp(math.log(low) + u[..., _SCALE] * (math.log(high) - math.log(low)))
            area = (out_size / magnification) ** 2
        else:
            low, high = self.cfg.global_area if is_global else self.cfg.local_area
            area = (low + u[..., _SCALE] * (high - low)) * h * w
        ar_low, ar_high = self.cfg.aspect_ratio
        aspect = torch.exp(math.log(ar_low) + u[..., _ASPECT] * (math.log(ar_high) - math.log(ar_low)))
        box_w, box_h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        # A crop larger than its image shrinks to fit (keeping its aspect): never any fill border.
        shrink = torch.minimum(torch.ones_like(box_w), torch.minimum(w / box_w, h / box_h))
        box_w, box_h = box_w * shrink, box_h * shrink
        if focus is None:
            x1 = u[..., _X] * (w - box_w)
            y1 = u[..., _Y] * (h - box_h)
        else:  # the grid cell u_X falls in under the image's darkness distribution, its centre the box's
            grid = math.isqrt(focus.shape[1])
            cell = torch.searchsorted(focus, u[..., _X].contiguous()).clamp_(max=grid * grid - 1)
            centre_x = (cell % grid + 0.5) * w / grid
            centre_y = (cell // grid + 0.5) * h / grid
            x1 = torch.minimum((centre_x - box_w / 2).clamp_min(0), w - box_w)
            y1 = torch.minimum((centre_y - box_h / 2).clamp_min(0), h - box_h)
        index = torch.arange(batch, dtype=torch.float64)[:, None].expand(batch, n_views)
        boxes = torch.stack([index, x1, y1, x1 + box_w, y1 + box_h], dim=-1)  # (B, V, 5)
        return boxes.transpose(0, 1).reshape(-1, 5)

    @property
    def shifts_colour(self) -> bool:
        cfg = self.cfg
        return cfg.hed_strength > 0 or cfg.white_balance > 0 or cfg.brightness > 0 or self.stain_bank is not None

    def augment(self, x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, log_input: bool = False,
                swap_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Stain and acquisition jitter, then blur: per view, on the whole batch, parameters from ``u``.

        ``x`` is (K, 3, S, S) float in [0, 1], or its log when ``log_input`` (what the uint8 crops
        give through a table, cheaper than computing it); ``u`` the matching (K, _NUM_DRAWS) draws;
        ``sigma`` the blur per view, sorted so the blurred views are the last ones (a contiguous
        slice: the per-image convolution, the costliest op, runs on those alone, without a gather);
        ``swap_alpha`` (K, 3) the stain swap's HED factors, NaN for views that keep their stain.
        """
        cfg = self.cfg
        u = u.to(device=x.device, dtype=torch.float32)
        colour = (u[:, _COLOR] < cfg.color_prob)[:, None]
        if self.shifts_colour:
            h, wb, b = cfg.hed_strength, cfg.white_balance, cfg.brightness
            alpha = torch.where(colour, 1.0 - h + 2.0 * h * u[:, _HED][:, :3], 1.0)
            beta = torch.where(colour, -h + 2.0 * h * u[:, _HED][:, 3:], 0.0)
            if swap_alpha is not None:  # a swapped view: the target's stain strength instead of the jitter
                swapped = ~swap_alpha[:, :1].isnan().to(x.device)
                alpha = torch.where(swapped, swap_alpha.to(x.device, torch.float32), alpha)
                beta = torch.where(swapped, 0.0, beta)
            gains = torch.where(colour, 1.0 - wb + 2.0 * wb * u[:, _WB], 1.0)
            delta = torch.where(colour[:, 0], -b + 2.0 * b * u[:, _BRIGHT], 0.0)
            log_x = x if log_input else x.clamp_min_(1e-6).log_()
            x = shift_log_image(log_x, alpha, beta, gains, delta,
                                _scratch("shifted", log_x.shape, log_x.dtype) if log_x.device.type == "cpu" else None)
        elif log_input:
            x = x.exp_()
        first_blurred = int((sigma <= 0).sum())
        if first_blurred < len(x):
            x[first_blurred:] = imageops.gaussian_blur(x[first_blurred:], sigma[first_blurred:].to(x.device))
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def view_group(self, source: torch.Tensor, sizes: torch.Tensor, u: torch.Tensor, size: int,
                   is_global: bool, swap_alpha: torch.Tensor | None = None, focus: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """(n * B, 3, size, size) normalised views, view-major, from the draws ``u`` (B, n, D).

        Views are processed sorted (unblurred ones by symmetry, then blurred ones by sigma), so blur runs
        on contiguous slices with kernels no wider than they need, flips and rotations (on the GPU)
        run on runs of equal symmetry, and views go back in order once at the end.
        """
        cfg = self.cfg
        batch, n, _ = u.shape
        rows = u.transpose(0, 1).reshape(n * batch, -1)  # view-major, as the boxes
        if is_global:  # DINO: the first global view always blurred, the others rarely
            probs = [cfg.blur_prob[0] if i == 0 else cfg.blur_prob[1] for i in range(n)]
        else:
            probs = [cfg.blur_prob[2]] * n
        blur_prob = torch.tensor(probs, dtype=torch.float64).repeat_interleave(batch)
        low, high = cfg.blur_sigma
        sigma = torch.where(rows[:, _BLUR] < blur_prob, low + (high - low) * rows[:, _SIGMA], 0.0).float()
        hflip = (rows[:, _HFLIP] < 0.5).long() if cfg.flip_rot90 else torch.zeros(len(rows), dtype=torch.long)
        turns = (rows[:, _ROT] * 4).long().clamp_(max=3) if cfg.flip_rot90 else torch.zeros_like(hflip)
        symmetry = hflip * 4 + turns
        # Blurred views last and in order of sigma, so each chunk's kernel is only as wide as its own
        # largest sigma needs (about half the taps of the batch's largest, on average).
        order = torch.argsort(torch.where(sigma > 0, 8.0 + sigma, symmetry.float()), stable=True)
        boxes, symmetry, rows, sigma = (self.boxes(u, sizes, size, is_global, focus)[order], symmetry[order], rows[order],
                                        sigma[order])
        if swap_alpha is not None:
            swap_alpha = swap_alpha.transpose(0, 1).reshape(n * batch, 3)[order]
        on_cpu = source[0].device.type == "cpu"
        if not on_cpu:  # one roi_align call for every crop of the batch
            all_crops = imageops.crop_resize(source.float().div_(255.0), boxes.to(torch.float32), size)
        out = torch.empty(n * batch, 3, size, size, device=source[0].device)
        # Chunks of views small enough to stay in cache through the whole chain of ops: on the CPU the
        # chain is memory-bound, and a dozen passes over all views cost more than the ops themselves.
        chunk = max(1, _CHUNK_VALUES // (3 * size * size)) if on_cpu else len(order)
        for lo in range(0, len(order), chunk):
            hi = min(lo + chunk, len(order))
            log_input = on_cpu and self.shifts_colour
            if on_cpu:  # crops straight into planar int32 codes (then their log) or floats
                shape = (hi - lo, 3, size, size)
                if log_input:
                    codes = crop_resize_cpu(source, boxes[lo:hi], size, symmetry[lo:hi],
                                            _scratch("codes", shape, torch.int32))
                    crops = torch.index_select(_LOG_OF_UINT8, 0, codes.view(-1), out=_scratch("log", (codes.numel(),),
                                               torch.float32)).view(shape)
                else:
                    crops = crop_resize_cpu(source, boxes[lo:hi], size, symmetry[lo:hi],
                                            _scratch("float", shape, torch.float32)).div_(255.0)
            else:
                crops = dihedral_sorted(all_crops[lo:hi], symmetry[lo:hi])
            crops = self.normalize(self.augment(crops, rows[lo:hi], sigma[lo:hi], log_input=log_input,
                                                swap_alpha=None if swap_alpha is None else swap_alpha[lo:hi]))
            out[order[lo:hi].to(out.device)] = crops  # back to view order
        return out

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], sizes: torch.Tensor, indices: torch.Tensor,
                 epoch: int) -> ViewBatch:
        """Views of a batch: ``images`` a (B, 3, H, W) tensor or a list of (3, H, W) uint8 images."""
        cfg = self.cfg
        batch = len(images)
        u = self.draws(indices, epoch)  # (B, V, D), CPU float64
        sizes = sizes.cpu()
        if not isinstance(images, torch.Tensor) and images[0].device.type != "cpu":
            images = pad_to_batch(images)  # the GPU cuts every crop in one roi_align call
        if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
            images = images.mul(255.0).round_().clamp_(0, 255).byte()
        source = images
        swap = None
        if self.stain_bank is not None:
            own = [img[:, : int(h), : int(w)] for img, (h, w) in zip(images, sizes.tolist(), strict=True)]
            swap = self.stain_bank.swap_alpha(u[..., _SWAP], cfg.stain_swap, imageops.stain_strength(own), indices)
        out: ViewBatch = {}
        groups = (("global", slice(0, cfg.n_global), cfg.global_size, True),
                  ("local", slice(cfg.n_global, self.n_views), cfg.local_size, False))
        focus = darkness_cdf(images, sizes) if cfg.n_local and cfg.local_focus == "nuclei" else None
        with _cpu_threads(self.cfg.cpu_threads if images[0].device.type == "cpu" else None):
            for name, views, size, is_global in groups:
                n = views.stop - views.start
                crops = self.view_group(source, sizes, u[:, views], size, is_global,
                                        None if swap is None else swap[:, views],
                                        None if is_global else focus) if n else None
                out[name] = list(crops.unflatten(0, (n, batch)).unbind(0)) if n else []
        return out


# Ruifrok & Johnston's stain matrix and its inverse (skimage's constants, as roseprior.imageops uses).
_RGB_FROM_HED = torch.from_numpy(rgb_from_hed)
_HED_FROM_RGB = torch.from_numpy(hed_from_rgb)


# log(max(v / 255, 1e-6)) of every uint8 value, the same float32 ops as on the converted image: a table
# lookup is about 3x cheaper than converting, dividing, clamping and taking the log of every pixel.
_LOG_OF_UINT8 = torch.arange(256, dtype=torch.float32).div_(255.0).clamp_min_(1e-6).log_()


FOCUS_GRID = 16  # darkness_cdf's cells per side: a nucleus of a 128-px cell crop spans a few


def darkness_cdf(images: torch.Tensor | Sequence[torch.Tensor], sizes: torch.Tensor, grid: int = FOCUS_GRID
                 ) -> torch.Tensor:
    """(B, grid * grid) cumulative distribution over a grid of each image, in proportion to how far each cell's
    optical density exceeds the image's median, squared: the darkest parts, which in every cytology stain (Pap,
    Diff-Quik, H&E) are the nuclei. A flat image gets a uniform distribution. Written here because no library
    the platform uses draws crops by an image's own content."""
    rows = []
    for image, (h, w) in zip(images, sizes.tolist(), strict=True):
        step = max(1, min(h, w) // (4 * grid))  # a coarse map needs no more than 4 samples per cell
        grey = image[:, :h:step, :w:step].float().mean(0)
        density = F.adaptive_avg_pool2d(-torch.log((grey + 1.0) / 256.0)[None, None], grid).flatten().double().cpu()
        weight = (density - density.median()).clamp_min(0.0).square() + 1e-9
        rows.append(weight.cumsum(0) / weight.sum())
    return torch.stack(rows)


def stain_and_acquisition_shift(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gains: torch.Tensor,
                                delta: torch.Tensor) -> torch.Tensor:
    """``imageops.brightness_shift(white_balance_shift(hed_shift(x, alpha, beta), gains), delta)`` in one pass.

    Same maths and clipping as the three shared ops (``tests/test_pretrain.py`` checks it against
    them), fused because view-making runs them on every view of every step: in log space the HED
    shift and the white-balance gain are one per-view 3x3 affine map, followed by a single exp,
    instead of about fifteen full-tensor passes and allocations. The map is nine multiply-adds on
    channel planes: 7x faster here than a batched matmul over (pixels, 3) rows, whose 3x3 matrices
    are too small for BLAS. ``x`` (K, 3, H, W) float in [0, 1] is overwritten (its log); the result
    is a new contiguous (K, 3, H, W) tensor.
    """
    x = x if x.is_contiguous() else x.contiguous()
    return shift_log_image(x.clamp_min_(1e-6).log_(), alpha, beta, gains, delta)


def shift_log_image(log_x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gains: torch.Tensor,
                    delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``stain_and_acquisition_shift`` of the image whose log (= -optical density) is ``log_x`` (K, 3, H, W),
    into ``out`` (contiguous, like ``log_x``) when given."""
    log_x = log_x if log_x.is_contiguous() else log_x.contiguous()
    k, device, dtype = log_x.shape[0], log_x.device, log_x.dtype
    rgb_from_hed = _RGB_FROM_HED.to(device)
    od_map = (_HED_FROM_RGB.to(device) @ (alpha.double()[..., None] * rgb_from_hed)).to(dtype)  # (K, 3, 3)
    od_bias = (beta.double() @ rgb_from_hed).to(dtype)  # (K, 3)
    # log of the HED-shifted image: z[:, c] = sum_j log_x[:, j] * od_map[:, j, c] - od_bias[:, c]
    z = torch.empty_like(log_x) if out is None else out
    coeff = od_map.view(k, 3, 3, 1, 1)
    for c in range(3):
        plane = z[:, c]
        torch.mul(log_x[:, 0], coeff[:, 0, c], out=plane)
        plane.addcmul_(log_x[:, 1], coeff[:, 1, c]).addcmul_(log_x[:, 2], coeff[:, 2, c])
    # Clipping at 1 is clipping at 0 in log space: once after the HED shift, once after white balance.
    z.sub_(od_bias.view(k, 3, 1, 1)).clamp_max_(0.0)
    z.add_(gains.to(dtype).log().view(k, 3, 1, 1)).clamp_max_(0.0).exp_()
    return z.add_(delta.to(dtype).view(k, 1, 1, 1)).clamp_(0.0, 1.0)  # brightness


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """Run the views on ``threads`` CPU threads: the many small ops of view-making lose to thread
    synchronisation on a few shared cores (3x slower with 2 threads than 1 on the 2-core dev box)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


def dihedral_sorted(x: torch.Tensor, symmetry: torch.Tensor) -> torch.Tensor:
    """Apply symmetry c (bit 2: horizontal flip, bits 0-1: quarter turns) to runs of equal c, in place.

    The 8 exact symmetries of a square, no resampling. ``symmetry`` must be sorted so each run is
    a contiguous slice. Hand-written rather than ``imageops.random_flip_rot90``, which draws its
    own parameters per batch; here they are keyed per sample.
    """
    values, counts = torch.unique_consecutive(symmetry, return_counts=True)
    start = 0
    for c, count in zip(values.tolist(), counts.tolist(), strict=True):
        end = start + count
        if c:
            y = x[start:end].flip(-1) if c >= 4 else x[start:end]
            x[start:end] = torch.rot90(y, c % 4, (-2, -1)) if c % 4 else y
        start = end
    return x


def multicrop_forward(module: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``module`` once per run of same-size views (as DINO's MultiCropWrapper), return per view."""
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        batch = views[start].shape[0]
        out = module(torch.cat(list(views[start:end])))
        outputs.extend(out.split(batch))
        start = end
    return outputs
