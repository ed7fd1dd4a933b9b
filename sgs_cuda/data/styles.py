"""Vectorised style renderers turning grey Fashion-MNIST garments into four visual domains.

Each renderer takes ``g`` — garments as float ``[N, 1, 32, 32]`` in [0, 1] (bright garment on
black) — and a seeded ``numpy.random.Generator`` that draws every per-image style parameter, and
returns RGB ``[N, 3, 32, 32]`` in [0, 1]. The domains keep the garment's shape (the class) but
differ in colour statistics, texture, background and frequency content, which is what a
domain shift in PACS-like benchmarks consists of:

- ``photo``: realistically coloured, shaded garment with a soft shadow over random crops of
  natural photographs (textured, mid-frequency backgrounds, sensor noise);
- ``cartoon``: flat posterised saturated colours, a dark outline, a flat pastel background;
- ``sketch``: dark pencil strokes along the garment's edges on white paper (nearly grey,
  dominated by thin high-frequency lines);
- ``painting``: colour-jittered garment on smooth colour washes, with directional brush-stroke
  texture and high-frequency noise over everything.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Natural images shipped inside scikit-image (no download); grey ones get a colour tint.
BACKGROUND_IMAGES = ("astronaut", "coffee", "chelsea", "cat", "rocket", "immunohistochemistry",
                     "camera", "coins", "grass", "gravel", "brick", "moon", "clock")

# Garment colours seen on real clothes (RGB in [0, 1]): blacks, greys, navy, denim, khaki, ...
CLOTHES_PALETTE = np.array([
    [0.08, 0.08, 0.09], [0.25, 0.25, 0.27], [0.55, 0.55, 0.57], [0.92, 0.92, 0.90], [0.10, 0.14, 0.32],
    [0.22, 0.35, 0.55], [0.36, 0.48, 0.66], [0.76, 0.69, 0.52], [0.45, 0.30, 0.18], [0.58, 0.10, 0.14],
    [0.80, 0.18, 0.16], [0.30, 0.38, 0.22], [0.93, 0.80, 0.72], [0.85, 0.55, 0.62], [0.95, 0.85, 0.40],
    [0.55, 0.35, 0.55], [0.20, 0.50, 0.45], [0.85, 0.45, 0.20],
], dtype=np.float32)


# -- small vectorised image operations --------------------------------------------------------
def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _per_image(a: np.ndarray) -> torch.Tensor:
    """Per-image parameters ``[N]`` or ``[N, 3]`` as tensors broadcastable to ``[N, C, H, W]``."""
    t = _t(a)
    return t.view(-1, 1, 1, 1) if t.dim() == 1 else t.view(t.shape[0], -1, 1, 1)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of equal shape, result ``[..., 3]``."""
    k = (np.stack([5.0, 3.0, 1.0]) + (h[..., None] * 6.0)) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflect padding."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of single-channel ``[N, 1, H, W]``."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    k = torch.stack([kx, kx.t()]).unsqueeze(1)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1, keepdim=True).sqrt()


def dilate(mask: torch.Tensor, r: int = 1) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r)


def erode(mask: torch.Tensor, r: int = 1) -> torch.Tensor:
    return -F.max_pool2d(-mask, 2 * r + 1, stride=1, padding=r)


def smooth_field(rng: np.random.Generator, n: int, channels: int, grid: int, size: int) -> torch.Tensor:
    """Low-frequency random fields: a ``grid x grid`` of values upsampled bicubically."""
    coarse = _t(rng.random((n, channels, grid, grid)))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _line_kernels(length: int) -> torch.Tensor:
    """Four normalised line kernels ``[4, 1, L, L]``: horizontal, vertical and the two diagonals."""
    kernels = torch.zeros(4, 1, length, length)
    c, idx = length // 2, torch.arange(length)
    kernels[0, 0, c, :] = 1
    kernels[1, 0, :, c] = 1
    kernels[2, 0, idx, idx] = 1
    kernels[3, 0, idx, length - 1 - idx] = 1
    return kernels / length


def directional_smear(x: torch.Tensor, direction: torch.Tensor, length: int) -> torch.Tensor:
    """Blur each image of ``[N, C, H, W]`` along its own direction (index into the 4 line kernels)."""
    n, c, h, w = x.shape
    p = length // 2
    smeared = F.conv2d(F.pad(x.reshape(n * c, 1, h, w), (p, p, p, p), mode="replicate"), _line_kernels(length))
    return smeared[torch.arange(n * c), direction.repeat_interleave(c)].view(n, c, h, w)


def brush_texture(rng: np.random.Generator, direction: torch.Tensor, size: int, length: int = 7) -> torch.Tensor:
    """Unit-variance noise smeared along each image's direction: brush-stroke texture ``[N, 1, S, S]``."""
    noise = _t(rng.standard_normal((len(direction), 1, size, size)))
    out = directional_smear(noise, direction, length)
    return out / out.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)


def garment_alpha(g: torch.Tensor) -> torch.Tensor:
    """Soft silhouette of the garment: Fashion-MNIST backgrounds are exactly black."""
    return (g * 8.0).clamp(0, 1)


def garment_shading(g: torch.Tensor) -> torch.Tensor:
    """Garment brightness rescaled to [0, 1] per image (keeps folds, prints and seams)."""
    return g / g.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)


# -- backgrounds ------------------------------------------------------------------------------
def load_backgrounds(size: int = 256) -> tuple[list[torch.Tensor], list[str]]:
    """The scikit-image sample photographs that load offline, as float ``[3, h, w]`` with short side
    ``size``. Returns ``([], [])`` when none loads; the photo style then uses synthetic textures
    instead."""
    import skimage.data as skdata  # lazy: slow to import, and only the photo style needs it

    images, names = [], []
    for name in BACKGROUND_IMAGES:
        try:
            a = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - missing optional files (pooch), renamed images
            continue
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        a = a[..., :3].astype(np.float32) / (255.0 if a.dtype == np.uint8 else max(float(a.max()), 1.0))
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
        scale = size / min(t.shape[-2:])
        t = F.interpolate(t, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        images.append(gaussian_blur(t, 0.8)[0].clamp(0, 1))  # pre-blur: crops are downsampled below
        names.append(name)
    return images, names


def random_crops(rng: np.random.Generator, n: int, size: int, sources: list[torch.Tensor]) -> torch.Tensor:
    """``n`` random square crops (random source, scale and position) resampled to ``size``."""
    if not sources:  # synthetic fallback: smooth colour fields with fine texture
        return (0.8 * smooth_field(rng, n, 3, 6, size) + 0.2 * smooth_field(rng, n, 3, 16, size)).clamp(0, 1)
    which = rng.integers(0, len(sources), n)
    frac = rng.uniform(0.15, 0.6, n)  # crop side as a fraction of the short side
    pos = rng.random((n, 2))
    flip = rng.random(n) < 0.5
    out = torch.empty(n, 3, size, size)
    for s, src in enumerate(sources):
        sel = np.nonzero(which == s)[0]
        if len(sel) == 0:
            continue
        h, w = src.shape[-2:]
        side = frac[sel] * min(h, w)
        sx, sy = side / w, side / h  # half-extent in normalised coordinates
        cx = (pos[sel, 0] * (w - side) + side / 2) / w * 2 - 1
        cy = (pos[sel, 1] * (h - side) + side / 2) / h * 2 - 1
        theta = np.zeros((len(sel), 2, 3), dtype=np.float32)
        theta[:, 0, 0] = np.where(flip[sel], -sx, sx)
        theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cx, sy, cy
        grid = F.affine_grid(_t(theta), [len(sel), 3, size, size], align_corners=False)
        # One source image, all its crops stacked vertically in a single grid: no per-crop copies.
        crops = F.grid_sample(src[None], grid.reshape(1, len(sel) * size, size, 2), mode="bilinear",
                              padding_mode="border", align_corners=False)
        out[torch.from_numpy(sel)] = crops.view(3, len(sel), size, size).transpose(0, 1)
    return out


# -- the four styles --------------------------------------------------------------------------
def style_photo(g: torch.Tensor, rng: np.random.Generator, backgrounds: list[torch.Tensor]) -> torch.Tensor:
    n, size = g.shape[0], g.shape[-1]
    bg = random_crops(rng, n, size, backgrounds)
    tint = _per_image(rng.uniform(0.8, 1.2, (n, 3)))
    bg = (bg * tint * _per_image(rng.uniform(0.6, 1.1, n))).clamp(0, 1)
    colour = CLOTHES_PALETTE[rng.integers(0, len(CLOTHES_PALETTE), n)]
    colour = np.clip(colour * rng.uniform(0.85, 1.15, (n, 1)) + rng.normal(0, 0.03, (n, 3)), 0, 1)
    shade = garment_shading(g)
    fg = (_per_image(colour) * (0.45 + 0.75 * shade) + 0.08 * shade ** 4).clamp(0, 1)  # folds + a little sheen
    alpha = garment_alpha(g)
    shadow = gaussian_blur(torch.roll(alpha, shifts=(1, 1), dims=(2, 3)), 1.2)
    bg = bg * (1 - 0.45 * shadow)
    out = alpha * fg + (1 - alpha) * bg
    out = out + 0.025 * _t(rng.standard_normal((n, 3, size, size)))  # sensor noise
    return out.clamp(0, 1)


def style_cartoon(g: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    n = g.shape[0]
    colour = hsv_to_rgb(rng.random(n), rng.uniform(0.65, 1.0, n), rng.uniform(0.8, 1.0, n))
    paper = hsv_to_rgb(rng.random(n), rng.uniform(0.15, 0.45, n), rng.uniform(0.85, 1.0, n))
    levels = _per_image(rng.integers(2, 4, n).astype(np.float32))  # 2 or 3 flat tones
    shade = garment_shading(gaussian_blur(g, 0.6))
    tone = torch.round(shade * levels) / levels
    fg = _per_image(colour) * (0.6 + 0.4 * tone)
    mask = (g > 0.06).float()
    mask = erode(dilate(mask))  # close pinholes so the fill is flat
    outline = dilate(mask) - erode(mask)
    ink = _per_image(rng.uniform(0.0, 0.18, n))
    out = mask * fg + (1 - mask) * _per_image(paper)
    return (out * (1 - outline) + ink * outline).clamp(0, 1)


def style_sketch(g: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    n, size = g.shape[0], g.shape[-1]
    edges = sobel_magnitude(gaussian_blur(g, 0.7))
    edges = edges / edges.flatten(1).quantile(0.98, dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    gain = _per_image(rng.uniform(1.2, 2.2, n))
    grain = 0.75 + 0.25 * _t(rng.random((n, 1, size, size)))  # broken, pencil-like strokes
    strokes = (edges * gain * grain).clamp(0, 1) ** 1.3
    hatch_dir = _per_image(rng.choice([-1.0, 1.0], n))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    hatch = ((xx + hatch_dir * yy) % 4 == 0).float()  # light diagonal hatching inside the garment
    dark = (1 - garment_shading(g)) * garment_alpha(g)
    strokes = torch.maximum(strokes, 0.45 * hatch * dark * _per_image(rng.random(n) < 0.6))
    paper = hsv_to_rgb(rng.uniform(0.08, 0.15, n), rng.uniform(0.0, 0.08, n), rng.uniform(0.93, 1.0, n))
    paper = _per_image(paper) - 0.03 * _t(rng.random((n, 1, size, size)))
    ink = _per_image(rng.uniform(0.05, 0.3, n)[:, None] + np.array([0.0, 0.0, 0.04]))
    return (paper * (1 - strokes) + ink * strokes).clamp(0, 1)


def style_painting(g: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    n, size = g.shape[0], g.shape[-1]
    hue, value = rng.random(n), rng.uniform(0.6, 1.0, n)
    colour = hsv_to_rgb(hue, rng.uniform(0.5, 1.0, n), value)
    # Background: a roughly complementary hue and a contrasting brightness, so the garment stands out.
    base = hsv_to_rgb((hue + rng.uniform(0.3, 0.7, n)) % 1.0, rng.uniform(0.2, 0.6, n),
                      np.clip(1.45 - value + rng.normal(0, 0.08, n), 0.3, 0.95) * rng.choice([0.55, 1.0], n))
    wash = (0.75 * _per_image(base) + 0.25 * smooth_field(rng, n, 3, 3, size)).clamp(0, 1)  # colour washes
    jitter = 0.2 * (smooth_field(rng, n, 3, 3, size) - 0.5)  # colour drifts across the garment
    shade = garment_shading(g)
    fg = _per_image(colour) * (0.45 + 0.65 * shade) + jitter
    alpha = gaussian_blur(garment_alpha(g), 0.7)  # soft, painted edges
    out = alpha * fg + (1 - alpha) * wash
    direction = torch.from_numpy(rng.integers(0, 4, n))
    out = directional_smear(out, direction, 3)  # brushed, not printed
    strokes = brush_texture(rng, direction, size)
    out = out * (1 + _per_image(rng.uniform(0.08, 0.14, n)) * strokes)  # mostly luminance texture
    out = out + 0.04 * _t(rng.standard_normal((n, 3, size, size)))  # canvas / pigment grain
    return out.clamp(0, 1)
