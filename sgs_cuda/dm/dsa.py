"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) with explicit parameters.

DM compares feature means of augmented real and augmented synthetic images; the comparison is
only meaningful when both batches see the *same* transformation ("Siamese"). Here the random
draw and its application are separate steps, so sharing is by construction:

    params = DSAParams.sample(strategy, generator)      # one draw, shared by every image
    real_aug, syn_aug = augment(real, params), augment(syn, params)

Every transformation is differentiable with respect to the images (gradients reach the
synthetic pixels). Constants and transformation families follow the DSA/DM reference defaults:
strategy ``color_crop_cutout_flip_scale_rotate`` in single mode (each call applies one family
chosen at random; ``color`` = brightness, saturation and contrast).

Parameters are stored as uniform numbers in [0, 1) and mapped to transformation values when
applied, so a draw does not depend on the image size. They are drawn on the CPU generator given
(no device synchronisation) and moved to the images' device when applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
MODES = ("single", "all")

# Reference defaults (ParamDiffAug of the DSA/DM code).
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE_DEG = 15.0
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5

# Uniform numbers each family needs.
_NUM_UNIFORMS = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """``"color_crop"`` -> ``("color", "crop")``; ``""``/``"none"`` -> ``()``."""
    if strategy is None or strategy.lower() in ("", "none"):
        return ()
    parts = tuple(strategy.split("_"))
    bad = [p for p in parts if p not in FAMILIES]
    if bad:
        raise ValueError(f"unknown DSA transformation(s) {bad} in strategy {strategy!r}; known: {FAMILIES}")
    return parts


@dataclass(frozen=True)
class DSAParams:
    """One draw of augmentation parameters.

    ``ops`` is a sequence of ``(family, u)`` with ``u`` a float tensor ``[b, k]`` of uniforms in
    [0, 1): ``b = 1`` means one parameter set shared by every image of a call (the Siamese mode
    DM uses), ``b = n`` one set per image (what evaluation training uses).
    """
    ops: tuple[tuple[str, torch.Tensor], ...]

    @classmethod
    def sample(cls, strategy: str = DEFAULT_STRATEGY, generator: torch.Generator | None = None,
               device=None, batch: int = 1, mode: str = "single") -> "DSAParams":
        """Draw parameters from ``generator`` (a CPU generator; ``None`` = torch's default CPU one).

        ``mode="single"`` picks one family of the strategy at random (the reference default),
        ``"all"`` applies every family in order. ``device``: where ``augment`` will run (the
        uniforms are moved there once, here).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        families = parse_strategy(strategy)
        if families and mode == "single":
            families = (families[int(torch.randint(len(families), (1,), generator=generator))],)
        ops = tuple((f, torch.rand(batch, _NUM_UNIFORMS[f], generator=generator).to(device or "cpu"))
                    for f in families)
        return cls(ops)

    @property
    def batch(self) -> int:
        return self.ops[0][1].shape[0] if self.ops else 1

    def to(self, device) -> "DSAParams":
        return DSAParams(tuple((f, u.to(device)) for f, u in self.ops))


def augment(x: torch.Tensor, params: DSAParams | None) -> torch.Tensor:
    """Apply ``params`` to images ``x`` ``[n, C, H, W]``; ``None`` or no ops -> ``x`` unchanged."""
    if params is None or not params.ops:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment expects images [n, C, H, W], got shape {tuple(x.shape)}")
    if params.batch not in (1, x.shape[0]):
        raise ValueError(f"params hold {params.batch} parameter sets for {x.shape[0]} images "
                         "(need 1 shared set or one per image)")
    for family, u in params.ops:
        x = _APPLY[family](x, u.to(device=x.device, dtype=x.dtype))
    return x


def augment_pair(a: torch.Tensor, b: torch.Tensor, params: DSAParams | None):
    """The same transformation applied to two batches (shared ``params`` must have ``batch == 1``)."""
    if params is not None and params.batch != 1:
        raise ValueError("augment_pair needs shared parameters (batch=1)")
    return augment(a, params), augment(b, params)


def _col(u: torch.Tensor, j: int) -> torch.Tensor:
    return u[:, j].view(-1, 1, 1, 1)  # [b, 1, 1, 1], broadcasts over the images when b = 1


def _color(x, u):
    x = x + (_col(u, 0) - 0.5) * BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_col(u, 1) * SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_col(u, 2) + CONTRAST) + m


def _int_in(u: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Map uniforms in [0, 1) to integers in [lo, hi] (inclusive), as a long tensor."""
    return (lo + torch.floor(u * (hi - lo + 1))).clamp(lo, hi).long()


def _crop(x, u):
    # Translate by up to RATIO_CROP_PAD of the size, filling with zeros: out[i, j] = x[i + dy, j + dx].
    n, c, h, w = x.shape
    sh, sw = int(h * RATIO_CROP_PAD + 0.5), int(w * RATIO_CROP_PAD + 0.5)
    dy, dx = _int_in(u[:, 0], -sh, sh), _int_in(u[:, 1], -sw, sw)
    rows = torch.arange(h, device=x.device) + dy[:, None]  # [b, H]
    cols = torch.arange(w, device=x.device) + dx[:, None]  # [b, W]
    keep = (((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :])
    rows = rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w)
    out = x.gather(2, rows)
    cols = cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, cols) * keep.to(x.dtype)


def _cutout(x, u):
    # Zero one square of RATIO_CUTOUT x size, centred anywhere (clipped at the borders).
    _, _, h, w = x.shape
    ch, cw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
    top = _int_in(u[:, 0], 0, h - ch % 2) - ch // 2
    left = _int_in(u[:, 1], 0, w - cw % 2) - cw // 2
    r = torch.arange(h, device=x.device)[None, :] - top[:, None]  # [b, H]
    q = torch.arange(w, device=x.device)[None, :] - left[:, None]
    hole = ((r >= 0) & (r < ch))[:, None, :, None] & ((q >= 0) & (q < cw))[:, None, None, :]
    return x * (~hole).to(x.dtype)


def _flip(x, u):
    return torch.where(_col(u, 0) < PROB_FLIP, x.flip(3), x)


def _affine(x, theta):
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, u):
    lo = 1.0 / RATIO_SCALE
    s = u * (RATIO_SCALE - lo) + lo  # [b, 2]
    zero = torch.zeros_like(s[:, 0])
    theta = torch.stack([torch.stack([s[:, 0], zero, zero], 1), torch.stack([zero, s[:, 1], zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x, u):
    a = (u[:, 0] - 0.5) * 2 * RATIO_ROTATE_DEG * math.pi / 180
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}
