"""Test inputs for the operator, built away from the hard mask's decision boundaries.

The hard mask is discontinuous: a component whose sign or magnitude ratio lies within rounding
of a threshold can flip between float32 and float64 and move the output far more than 1e-5.
``separated_grads`` builds the domain spectra directly so that every Re and Im part is bounded
away from zero and every bin's magnitude ratio ``min_d |F_d| / max_d |F_d|`` is at least
``margin`` away from ``rho``; a float32 implementation must then match the float64 reference
to float32 rounding, with the masks identical.
"""
from __future__ import annotations

import math

import torch


def _hermitian_columns(W: int) -> list[int]:
    """Half-spectrum columns whose values must be Hermitian along H (k = 0 and k = W/2)."""
    return [0] + ([W // 2] if W % 2 == 0 and W > 1 else [])


def separated_grads(D: int, N: int, C: int, H: int, W: int, *, rho: float = 0.25, margin: float = 0.1,
                    agree_fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """float64 gradients ``[D, N, C, H, W]`` whose spectra avoid the mask's decision boundaries."""
    if N == 0:
        return torch.zeros(D, N, C, H, W, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Wr = W // 2 + 1
    shape, bin_shape = (D, N, C, H, Wr), (1, N, C, H, Wr)

    def rand(s):
        return torch.rand(s, generator=g, dtype=torch.float64)

    # Phase: quadrant + an angle 15..75 degrees inside it, so |Re|, |Im| >= sin(15 deg) |F|.
    unanimous = rand(bin_shape) < agree_fraction
    shared_q = torch.randint(0, 4, bin_shape, generator=g).expand(shape)
    own_q = torch.randint(0, 4, shape, generator=g)
    quadrant = torch.where(unanimous, shared_q, own_q).double()
    angle = quadrant * (math.pi / 2) + math.pi / 12 + rand(shape) * (math.pi / 3)

    # Magnitude: either all domains within a factor 1/(rho + margin) of each other ("close"),
    # or one domain at least 1/(rho - margin) times larger than all others ("dominated").
    base = 0.5 + 1.5 * rand(bin_shape)
    factor = 1 + (1 / (rho + margin) - 1) * rand(shape)
    if D > 1 and rho - margin > 0:
        dominated = rand(bin_shape) < 0.5
        others = 1 + 0.5 * rand(shape)
        winner = torch.randint(0, D, bin_shape, generator=g)
        is_winner = torch.arange(D).view(D, 1, 1, 1, 1) == winner
        boosted = torch.where(is_winner, 1.5 / (rho - margin) * (1 + rand(shape)), others)
        factor = torch.where(dominated, boosted, factor)
    mag = base * factor
    spec = torch.polar(mag, angle)

    # Hermitian symmetry along H in the self-conjugate columns, so that the spectrum is exactly
    # the rfft2 of a real plane: F[H-h] = conj(F[h]); self-conjugate bins are real.
    for k in _hermitian_columns(W):
        for h in range(1, (H + 1) // 2):
            spec[..., H - h, k] = spec[..., h, k].conj()
        for h in [0] + ([H // 2] if H % 2 == 0 and H > 1 else []):
            value = spec[..., h, k]
            spec[..., h, k] = torch.complex(torch.sign(value.real) * value.abs(), torch.zeros_like(value.real))
    return torch.fft.irfft2(spec, s=(H, W))
