"""Drawing one synthetic ROSE field: cells as optical-density maps, then Beer–Lambert to RGB.

The scene (what cells, where, which shape) depends only on the class; the acquisition (stain
colours, magnification, white balance, brightness, blur, noise, JPEG quality) is drawn
independently of it. Every object is drawn as stain *concentration* into one of a few layers
(nuclear stain, cytoplasm, smear background, red blood cells, debris); the layers are mixed
through a per-image stain matrix of optical densities and turned into light with
``I = I0 * 10^(-OD)``, as a microscope would. Overlapping nuclei therefore darken the way real
ones do, and a stain change moves every pixel coherently.

We draw by hand because no library renders cytology: numpy patches for the nuclei (each an
ellipse with a few Fourier harmonics on its outline) and pasted sprites for red blood cells.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

# Layers of the concentration stack, in the order of the rows of the stain matrix.
NUCLEUS, CYTOPLASM, BACKGROUND, RBC, DEBRIS = range(5)
N_LAYERS = 5
# Radius of a benign nucleus at magnification 1, as a fraction of the image side.
BENIGN_RADIUS = 0.035


def _od(rgb: tuple[float, float, float]) -> np.ndarray:
    """Optical density of a colour seen through one unit of stain on a white (255) lamp."""
    return -np.log10(np.clip(np.asarray(rgb, dtype=np.float32), 1.0, 255.0) / 255.0)


# Anchor colours of one unit of each stain; `stain_hue` interpolates from the first
# (blue-violet, Diff-Quik "blue" slides) to the last (magenta/purple slides).
_NUCLEUS_OD = [_od((45, 45, 175)), _od((80, 50, 165)), _od((120, 45, 150))]
_CYTOPLASM_OD = [_od((125, 125, 215)), _od((160, 115, 210)), _od((195, 105, 195))]
_BACKGROUND_OD = [_od((165, 180, 225)), _od((200, 165, 225)), _od((225, 130, 220))]
# `rbc_tint` goes from grey-green (on magenta slides) to pale pink.
_RBC_OD = [_od((140, 165, 125)), _od((170, 160, 175)), _od((225, 150, 170))]
_DEBRIS_OD = _od((55, 45, 40))


def _lerp_anchors(anchors: list[np.ndarray], t: float) -> np.ndarray:
    t = min(max(t, 0.0), 1.0) * (len(anchors) - 1)
    i = min(int(t), len(anchors) - 2)
    return anchors[i] * (1 - (t - i)) + anchors[i + 1] * (t - i)


@dataclass
class Acquisition:
    """How a field was stained and photographed; independent of its label."""

    domain: str
    magnification: float  # scales cell size and spacing (0.5-2)
    stain_hue: float  # 0 blue-violet .. 1 magenta
    stain_strength: float  # multiplies every optical density
    background_density: float  # proteinaceous smear behind the cells
    rbc_tint: float  # 0 grey-green .. 1 pink red blood cells
    wb_r: float  # white balance gains per channel
    wb_g: float
    wb_b: float
    brightness: float  # lamp intensity relative to white
    blur_sigma: float  # defocus, in pixels at 256 px
    noise_sigma: float  # sensor noise, in 8-bit levels
    jpeg_quality: int

    def stain_matrix(self) -> np.ndarray:
        """(N_LAYERS, 3) optical density per unit concentration of each layer."""
        return np.stack(
            [
                _lerp_anchors(_NUCLEUS_OD, self.stain_hue),
                _lerp_anchors(_CYTOPLASM_OD, self.stain_hue),
                _lerp_anchors(_BACKGROUND_OD, self.stain_hue),
                _lerp_anchors(_RBC_OD, self.rbc_tint),
                _DEBRIS_OD,
            ]
        ).astype(np.float32) * self.stain_strength


# ---------------------------------------------------------------------------------------------
# Low-level drawing
# ---------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std random field with features about ``size / cells`` px wide."""
    # White noise on a grid of 4 samples per feature, Gaussian-smoothed there (cheap), then
    # bilinearly upsampled: isotropic blobs without the blockiness of upsampling raw noise.
    low = int(min(size, max(8, round(4 * float(cells)))))
    coarse = gaussian_filter(rng.standard_normal((low, low), dtype=np.float32), 1.6, mode="wrap")
    field = coarse if low == size else np.asarray(
        Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def blob_field(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float,
               aspect: float, angle: float, roughness: float) -> np.ndarray:
    """A signed field, > 0 inside an irregular blob: a rotated ellipse with a noisy outline.

    The field is smooth, so it is computed on a quarter-resolution grid and upsampled.
    """
    low = max(32, size // 4)
    step = size / low
    ys, xs = (np.mgrid[0:low, 0:low].astype(np.float32) + 0.5) * step - 0.5
    c, s = math.cos(angle), math.sin(angle)
    u = ((xs - cx) * c + (ys - cy) * s) / radius
    v = (-(xs - cx) * s + (ys - cy) * c) / (radius * aspect)
    noise = smooth_noise(rng, low, max(3, size / max(radius, 1.0) * 2.5))
    field = (1.0 - np.sqrt(u * u + v * v) + roughness * noise).astype(np.float32)
    return np.asarray(Image.fromarray(field, mode="F").resize((size, size), Image.BILINEAR))


# One nucleus per row: cx, cy, rx, ry, angle, density, texture, then 3 (amplitude, phase)
# harmonic pairs for orders 2, 3, 4 of the outline.
NUCLEUS_FIELDS = 13


def stamp_nuclei(density: np.ndarray, texture: np.ndarray, nuclei: np.ndarray,
                 rim: float = 0.25, nucleolus: np.ndarray | None = None) -> None:
    """Add each nucleus's stain (and chromatin-texture weight) into the layers, in place.

    Overlaps add, as absorbances do. The outline radius is ``1 + sum a_k cos(k θ + φ_k)``
    in the ellipse's own frame, so the same code draws round uniform nuclei (a ≈ 0) and
    irregular, notched atypical ones.
    """
    size_y, size_x = density.shape
    for k, row in enumerate(nuclei):
        cx, cy, rx, ry, ang, dens, tex, a2, p2, a3, p3, a4, p4 = row
        reach = max(rx, ry) * (1.0 + abs(a2) + abs(a3) + abs(a4)) + 2.0
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size_x)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size_y)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        c, s = math.cos(ang), math.sin(ang)
        u = (dx * c + dy * s) / rx
        v = (-dx * s + dy * c) / ry
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        outline = 1.0 + a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3) + a4 * np.cos(4 * theta + p4)
        # Anti-aliased edge about one pixel wide.
        inside = np.clip((outline - rho) * min(rx, ry) + 0.5, 0.0, 1.0)
        # Chromatin condenses under the nuclear membrane: a slightly darker rim.
        profile = inside * (1.0 - rim + rim * 1.6 * np.minimum(rho / np.maximum(outline, 0.3), 1.0) ** 2)
        if nucleolus is not None and nucleolus[k] > 0:
            # A prominent nucleolus: small dark spot off-centre.
            nr = max(nucleolus[k] * min(rx, ry), 0.8)
            nu, nv = 0.25 * math.cos(p3), 0.25 * math.sin(p3)
            d2 = ((u - nu) * rx) ** 2 + ((v - nv) * ry) ** 2
            profile = profile + 0.9 * inside * np.clip(nr + 0.5 - np.sqrt(d2), 0.0, 1.0)
        density[y0:y1, x0:x1] += dens * profile
        texture[y0:y1, x0:x1] += tex * inside


def rbc_sprite(radius: float, pallor: float) -> np.ndarray:
    """One red blood cell: a disc with a denser rim and a pale centre (biconcave)."""
    reach = int(math.ceil(radius)) + 2
    d = np.arange(-reach, reach + 1, dtype=np.float32)
    rho = np.sqrt(d[None, :] ** 2 + d[:, None] ** 2)
    inside = np.clip(radius - rho + 0.5, 0.0, 1.0)
    rim = np.clip(1.0 - np.abs(rho - radius * 0.85) / (radius * 0.35), 0.0, 1.0)
    return inside * (1.0 - pallor) + 0.3 * rim * inside


def paste_add(canvas: np.ndarray, sprite: np.ndarray, cx: float, cy: float, weight: float) -> None:
    """Add ``weight * sprite`` centred at (cx, cy), clipped to the canvas."""
    h, w = sprite.shape
    x0, y0 = int(round(cx)) - w // 2, int(round(cy)) - h // 2
    sx0, sy0 = max(0, -x0), max(0, -y0)
    x1, y1 = min(canvas.shape[1], x0 + w), min(canvas.shape[0], y0 + h)
    if x1 <= max(x0, 0) or y1 <= max(y0, 0):
        return
    canvas[max(y0, 0):y1, max(x0, 0):x1] += weight * sprite[sy0:sy0 + y1 - max(y0, 0), sx0:sx0 + x1 - max(x0, 0)]


def _nucleus_rows(rng: np.random.Generator, xy: np.ndarray, radius: np.ndarray, aspect: np.ndarray,
                  angle: np.ndarray, density: np.ndarray, texture: np.ndarray,
                  irregularity: float) -> np.ndarray:
    n = len(xy)
    rows = np.zeros((n, NUCLEUS_FIELDS), dtype=np.float32)
    rows[:, 0:2] = xy
    rows[:, 2] = radius
    rows[:, 3] = radius * aspect
    rows[:, 4] = angle
    rows[:, 5] = density
    rows[:, 6] = texture
    for j, scale in enumerate((1.0, 0.6, 0.4)):
        rows[:, 7 + 2 * j] = irregularity * scale * rng.uniform(0.3, 1.0, n)
        rows[:, 8 + 2 * j] = rng.uniform(0, 2 * math.pi, n)
    return rows


# ---------------------------------------------------------------------------------------------
# Scenes: what is on the slide (class-dependent morphology, class-independent amounts)
# ---------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """Concentration layers (N_LAYERS, H, W) plus the chromatin-texture weight map."""

    layers: np.ndarray
    texture: np.ndarray


def _background(rng: np.random.Generator, size: int, scale: float, layers: np.ndarray) -> None:
    """Smear background: proteinaceous haze with clear holes, fibrin strands and specks."""
    haze = smooth_noise(rng, size, rng.uniform(3, 8))
    holes = smooth_noise(rng, size, rng.uniform(4, 10))
    bg = np.clip(0.55 + 0.35 * haze, 0.0, 1.2) * np.clip(1.6 - 1.2 * np.maximum(holes - 0.3, 0), 0.0, 1.0)
    layers[BACKGROUND] += bg
    # Fibrin strands and mucus threads: thin curved lines of nuclear-like stain.
    strands = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(strands)
    for _ in range(rng.poisson(0.5)):
        x, y = rng.uniform(0, size, 2)
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(12):
            heading += rng.normal(0, 0.35)
            x += math.cos(heading) * size * 0.05
            y += math.sin(heading) * size * 0.05
            pts.append((x, y))
        draw.line(pts, fill=int(rng.uniform(80, 200)), width=max(1, int(round(scale * 0.25))))
    # Debris: small dark irregular specks.
    for _ in range(rng.poisson(4)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 2.0) * max(scale * 0.15, 1.0)
        draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=int(rng.uniform(150, 255)))
    lines = np.asarray(strands, dtype=np.float32) / 255.0
    layers[DEBRIS] += lines * rng.uniform(0.5, 1.0)
    # Vacuoles, fat droplets and glare: small clear circles that remove stain.
    clear = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(clear)
    for _ in range(rng.poisson(3)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.2, 0.6) * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    layers *= 1.0 - 0.85 * (np.asarray(clear, dtype=np.float32) / 255.0)[None]


def red_blood_cells(rng: np.random.Generator, size: int, scale: float, layers: np.ndarray,
                    count: int) -> None:
    """Red blood cells, partly in loose clumps, all about the same size."""
    sprites = [rbc_sprite(scale * rng.uniform(0.95, 1.1), rng.uniform(0.15, 0.4)) for _ in range(4)]
    n_clumps = max(1, count // 25)
    centres = rng.uniform(0, size, (n_clumps, 2))
    spread = size * rng.uniform(0.1, 0.35)
    for _ in range(count):
        if rng.random() < 0.6:
            x, y = centres[rng.integers(n_clumps)] + rng.normal(0, spread, 2)
        else:
            x, y = rng.uniform(0, size, 2)
        paste_add(layers[RBC], sprites[rng.integers(len(sprites))], x, y, rng.uniform(0.35, 0.55))


def _honeycomb_sheet(rng: np.random.Generator, size: int, r: float, target_mass: float,
                     layers: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """N: a cohesive flat sheet, nuclei on a jittered hexagonal lattice; returns its cytoplasm mask."""
    spacing = 2.0 * r * rng.uniform(1.2, 1.4)
    dens = rng.uniform(0.65, 1.05)
    target_area = target_mass / dens
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    field = blob_field(rng, size, cx, cy, radius=math.sqrt(target_area / 0.6 / math.pi) * 1.1,
                       aspect=rng.uniform(0.5, 1.0), angle=rng.uniform(0, math.pi), roughness=0.25)
    # Lattice in a rotated frame, covering the whole canvas.
    ang = rng.uniform(0, math.pi)
    n = int(size * 1.5 / spacing) + 2
    i, j = np.mgrid[-n:n + 1, -n:n + 1].reshape(2, -1).astype(np.float32)
    lx, ly = (i + 0.5 * (j % 2)) * spacing, j * spacing * math.sqrt(3) / 2
    xs = cx + lx * math.cos(ang) - ly * math.sin(ang)
    ys = cy + lx * math.sin(ang) + ly * math.cos(ang)
    pts = np.stack([xs, ys], 1) + rng.normal(0, 0.05 * spacing, (len(xs), 2))
    inb = (pts[:, 0] > -r) & (pts[:, 0] < size + r) & (pts[:, 1] > -r) & (pts[:, 1] < size + r)
    pts = pts[inb]
    ix = np.clip(pts.astype(int), 0, size - 1)
    score = field[ix[:, 1], ix[:, 0]]
    # Grow the sheet from its core outwards until it holds the target nuclear area.
    order = np.argsort(-score)
    per = math.pi * r * r
    k = int(np.clip(round(target_area / per), 6, len(order)))
    pts = pts[order[:k]]
    sheet = np.zeros((size, size), dtype=np.float32)
    for x, y in pts:  # cytoplasm: the cells' territory, merged into one cohesive sheet
        paste_add(sheet, _disc(spacing * 0.8), x, y, 1.0)
    sheet = np.clip(gaussian_filter(np.clip(sheet, 0, 1), spacing * 0.25) * 2.0 - 0.5, 0, 1)
    radius = r * rng.normal(1.0, 0.05, k).clip(0.85, 1.15)
    rows = _nucleus_rows(rng, pts, radius, rng.uniform(0.85, 1.0, k), rng.uniform(0, math.pi, k),
                         dens * rng.normal(1.0, 0.04, k), np.full(k, 0.25), irregularity=0.025)
    stamp_nuclei(layers[NUCLEUS], texture, rows)
    return sheet


_DISC_CACHE: dict[int, np.ndarray] = {}


def _disc(radius: float) -> np.ndarray:
    key = int(round(radius * 4))
    if key not in _DISC_CACHE:
        _DISC_CACHE[key] = rbc_sprite(key / 4, pallor=0.0).clip(0, 1)
    return _DISC_CACHE[key]


def _atypical_nuclei(rng: np.random.Generator, pts: np.ndarray, r: float, enlargement: float,
                     ) -> tuple[np.ndarray, np.ndarray]:
    k = len(pts)
    radius = r * enlargement * rng.lognormal(0.0, 0.28, k).clip(0.6, 1.7)
    aspect = rng.uniform(0.55, 1.0, k)
    dens = rng.uniform(0.65, 1.05) * rng.normal(1.0, 0.1, k).clip(0.7, 1.3)
    rows = _nucleus_rows(rng, pts, radius, aspect, rng.uniform(0, 2 * math.pi, k), dens,
                         rng.uniform(0.2, 0.3, k), irregularity=rng.uniform(0.06, 0.14))
    nucleolus = np.where(rng.random(k) < 0.35, rng.uniform(0.08, 0.15, k), 0.0)
    return rows, nucleolus


def _crowded_cluster(rng: np.random.Generator, size: int, r: float, target_mass: float,
                     layers: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """P: a crowded 3-D cluster of enlarged, irregular, overlapping nuclei with lost polarity."""
    enlargement = rng.uniform(1.5, 3.0)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    # Cytoplasm covers about as much area per unit of nuclear stain as a benign sheet does;
    # the nuclei crowd into its core.
    aspect = rng.uniform(0.5, 1.0)
    radius = math.sqrt(3.6 * target_mass / math.pi / aspect)
    field = blob_field(rng, size, cx, cy, radius=radius, aspect=aspect,
                       angle=rng.uniform(0, math.pi), roughness=0.35)
    inside = np.argwhere(field > 0.6)
    if len(inside) == 0:
        inside = np.array([[int(cy) % size, int(cx) % size]])
    area, rows_all, nucl_all = 0.0, [], []
    while area < target_mass:
        pts = inside[rng.integers(len(inside), size=8)][:, ::-1].astype(np.float32)
        rows, nucleolus = _atypical_nuclei(rng, pts + rng.uniform(0, 1, pts.shape), r, enlargement)
        rows_all.append(rows)
        nucl_all.append(nucleolus)
        area += float(np.sum(math.pi * rows[:, 2] * rows[:, 3] * rows[:, 5]))
    rows, nucleolus = np.concatenate(rows_all), np.concatenate(nucl_all)
    # Keep just enough nuclei to reach the target stain mass (at least 3).
    cum = np.cumsum(math.pi * rows[:, 2] * rows[:, 3] * rows[:, 5])
    k = max(3, int(np.searchsorted(cum, target_mass)) + 1)
    stamp_nuclei(layers[NUCLEUS], texture, rows[:k], rim=0.35, nucleolus=nucleolus[:k])
    return np.clip(field * 2.0, 0, 1)


def _scattered_atypical(rng: np.random.Generator, size: int, r: float, target_mass: float,
                        layers: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """P: a few single atypical cells (big irregular dark nucleus, rim of cytoplasm)."""
    enlargement = rng.uniform(1.8, 3.0)
    cyto = np.zeros((size, size), dtype=np.float32)
    mass, drawn = 0.0, 0
    while (mass < target_mass or drawn < 2) and drawn < 40:
        pts = rng.uniform(0.08, 0.92, (1, 2)).astype(np.float32) * size
        rows, nucleolus = _atypical_nuclei(rng, pts, r, enlargement)
        paste_add(cyto, _disc(rows[0, 2] * rng.uniform(1.7, 2.3)), pts[0, 0], pts[0, 1], 1.0)
        stamp_nuclei(layers[NUCLEUS], texture, rows, rim=0.35, nucleolus=nucleolus)
        mass += float(math.pi * rows[0, 2] * rows[0, 3] * rows[0, 5])
        drawn += 1
    return np.clip(cyto, 0, 1)


def _scattered_normal(rng: np.random.Generator, size: int, r: float, count: int,
                      layers: np.ndarray, texture: np.ndarray) -> None:
    """Stray single benign cells (lymphocytes, bare nuclei): small, round, either class."""
    if count <= 0:
        return
    pts = rng.uniform(0, size, (count, 2)).astype(np.float32)
    radius = r * rng.uniform(0.8, 1.0, count)
    rows = _nucleus_rows(rng, pts, radius, rng.uniform(0.85, 1.0, count), rng.uniform(0, math.pi, count),
                         rng.uniform(0.85, 1.0, count), np.full(count, 0.12), irregularity=0.03)
    stamp_nuclei(layers[NUCLEUS], texture, rows)


def draw_scene(rng: np.random.Generator, label: str, size: int, magnification: float) -> Scene:
    """Lay out one field of class ``label`` ("N" or "P") at the given magnification.

    The amounts (nuclear area, red blood cells, background) come from the same distributions
    for both classes, so colour statistics carry little label information; what differs is
    the nuclei's size, shape, uniformity and arrangement.
    """
    layers = np.zeros((N_LAYERS, size, size), dtype=np.float32)
    texture = np.zeros((size, size), dtype=np.float32)
    r = BENIGN_RADIUS * size * magnification  # benign nuclear radius in px
    _background(rng, size, r, layers)
    bloody = rng.random() < 0.35
    n_rbc = int(rng.uniform(60, 160) if bloody else rng.uniform(0, 40))
    n_rbc = int(n_rbc / magnification**2)  # a fixed field of view holds fewer, larger cells when zoomed
    red_blood_cells(rng, size, r, layers, min(n_rbc, 1500))
    # Nuclear stain mass (area x concentration, as a fraction of the field) and cytoplasm mass
    # relative to it are drawn from one distribution for both classes: N spreads its mass over
    # many small pale nuclei, P concentrates it in fewer, larger, darker ones.
    mass = (rng.uniform(0.02, 0.05) if bloody else rng.uniform(0.06, 0.36)) * size * size
    if label == "N":
        cyto = _honeycomb_sheet(rng, size, r, mass, layers, texture)
    elif bloody:
        cyto = _scattered_atypical(rng, size, r, mass, layers, texture)
    else:
        cyto = _crowded_cluster(rng, size, r, mass, layers, texture)
    cyto_mass = mass * rng.uniform(0.6, 1.2)
    layers[CYTOPLASM] += cyto * float(np.clip(cyto_mass / max(float(cyto.sum()), 1.0), 0.1, 1.0))
    # Overlapping nuclei darken, but a pile of ten is not ten times as dark (focus, squashing).
    np.multiply(np.tanh(layers[NUCLEUS] / 1.15), 1.15, out=layers[NUCLEUS])
    _scattered_normal(rng, size, r, rng.poisson(2), layers, texture)
    return Scene(layers=layers, texture=texture)


# ---------------------------------------------------------------------------------------------
# Acquisition: stain, light, optics, sensor
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _vignette_density(size: int) -> np.ndarray:
    """Uneven illumination (a mild vignette), expressed as an extra optical density."""
    ys = (np.arange(size, dtype=np.float32) - size / 2) / size
    return -np.log10(1.0 - 0.18 * (ys[:, None] ** 2 + ys[None, :] ** 2))


def render(scene: Scene, acq: Acquisition, rng: np.random.Generator) -> Image.Image:
    """Beer–Lambert mixing of the layers, then white balance, brightness, blur and noise."""
    size = scene.layers.shape[1]
    layers = scene.layers
    # Chromatin granularity: fine random texture weighted per nucleus (coarse in atypical ones).
    grain = smooth_noise(rng, size, size / max(1.5, 0.25 * BENIGN_RADIUS * size * acq.magnification))
    layers[NUCLEUS] *= np.clip(1.0 + scene.texture * grain, 0.3, 2.0)
    layers[BACKGROUND] *= acq.background_density
    # Optical densities add (Beer–Lambert). einsum, not matmul: a 5-long inner product is
    # memory-bound, and BLAS threads only contend with other workers.
    od = np.einsum("lc,lhw->chw", acq.stain_matrix(), layers)
    od += _vignette_density(size)
    gain = np.array([acq.wb_r, acq.wb_g, acq.wb_b], dtype=np.float32) * acq.brightness * 255.0
    rgb = np.exp(od * np.float32(-math.log(10.0))) * gain[:, None, None]
    sigma = acq.blur_sigma * size / 256
    if sigma > 0.05:
        rgb = gaussian_filter(rgb, sigma=(0.0, sigma, sigma), truncate=3.0)
    if acq.noise_sigma > 0:
        rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(acq.noise_sigma)
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
