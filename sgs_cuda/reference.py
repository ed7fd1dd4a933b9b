"""Pure-torch Spectral Gradient Surgery: the fallback and, in float64, the ground truth.

Vectorised over domains, images and channels (no Python loops); follows
``shared/docs/sgs-spec.md`` section 3 literally, so each line can be read against it.
Inputs are assumed validated (see ``sgs_cuda.ops``); the computation runs in float32 for
float16/bfloat16/float32 input and in float64 for float64 input.
"""
from __future__ import annotations

import torch

MASK_MODES = ("hard", "soft")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def magnitude_agreement(mag: torch.Tensor) -> torch.Tensor:
    """``min_d |x_d| / max_d |x_d|`` over the domain axis 0, and 0 where every ``|x_d|`` is 0."""
    mag_max, mag_min = mag.amax(0), mag.amin(0)
    return torch.where(mag_max > 0, mag_min / torch.where(mag_max > 0, mag_max, 1), 0)


def agreement_mask(x: torch.Tensor, mag_agree: torch.Tensor, tau: float, rho: float, mask: str) -> torch.Tensor:
    """The mask of the real components ``x`` ``[D, ...]``: sign agreement ``|sum_d sgn(x_d)| / D``
    thresholded with the magnitude agreement (``hard``), or their product (``soft``)."""
    agree = torch.sign(x).sum(0).abs() / x.shape[0]
    if mask == "hard":
        return ((agree >= tau) & (mag_agree >= rho)).to(x.dtype)
    return agree * mag_agree


def sgs_reference(grads: torch.Tensor, assign: torch.Tensor, tau: float, rho: float, alpha: float,
                  beta: float, mask: str = "hard", return_parts: bool = False):
    """Return ``update`` or, with ``return_parts``, ``(update, mean, shared, diversity, stats)``.

    ``grads`` ``[D, N, C, H, W]``, ``assign`` ``[N]`` int64 in ``[0, D)``. ``stats`` is a float64
    tensor ``[4]``: (sum of mask over real components, number of real components,
    ``sum |Sh|^2``, ``sum |Fbar|^2``) over the half-spectrum, from which the diagnostics follow.
    """
    D, N, C, H, W = grads.shape
    g = grads.to(compute_dtype(grads.dtype))
    if g.numel() == 0:  # some FFT backends reject empty batches
        empty = grads.new_zeros(grads.shape[1:])
        stats = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=grads.device)
        return (empty, empty.clone(), empty.clone(), empty.clone(), stats) if return_parts else empty
    spec = torch.fft.rfft2(g)  # [D, N, C, H, W//2+1] complex
    re, im = spec.real, spec.imag

    # 1.-3. sign agreement per real component, magnitude agreement per complex bin, the mask
    mag_agree = magnitude_agreement(spec.abs())
    mask_re = agreement_mask(re, mag_agree, tau, rho, mask)
    mask_im = agreement_mask(im, mag_agree, tau, rho, mask)

    # 4. masked recombination
    mean_spec = spec.mean(0)
    assigned = spec[assign, torch.arange(N, device=grads.device)]  # [N, C, H, Wr]
    shared = torch.complex(mask_re * mean_spec.real, mask_im * mean_spec.imag)
    dev = assigned - mean_spec
    diversity = torch.complex((1 - mask_re) * dev.real, (1 - mask_im) * dev.imag)

    # 5. output: irfft2 is linear, so one inverse transform suffices for the update
    size = (H, W)
    update = torch.fft.irfft2(mean_spec + alpha * shared + beta * diversity, s=size)
    out_dtype = grads.dtype
    if not return_parts:
        return update.to(out_dtype)
    mean = g.mean(0)
    shared_sp = torch.fft.irfft2(shared, s=size)
    diversity_sp = torch.fft.irfft2(diversity, s=size)
    stats = torch.stack([
        (mask_re.sum() + mask_im.sum()).double(),
        torch.tensor(2.0 * mask_re.numel(), dtype=torch.float64, device=grads.device),
        shared.abs().square().sum().double(),
        mean_spec.abs().square().sum().double(),
    ])
    return (update.to(out_dtype), mean.to(out_dtype), shared_sp.to(out_dtype),
            diversity_sp.to(out_dtype), stats)


def spatial_reference(grads: torch.Tensor, assign: torch.Tensor, tau: float, rho: float, alpha: float,
                      beta: float, mask: str = "hard"):
    """The spatial-domain ablation of spec section 6: the same agreement mask and recombination,
    computed per pixel of the gradients instead of per frequency. Each pixel is one real
    component, so the sign agreement is ``|sum_d sgn(g_d)| / D`` and the magnitude agreement
    ``min_d |g_d| / max_d |g_d|`` of that pixel. Returns ``(update, mean, shared, diversity,
    stats)`` like :func:`sgs_reference` with ``return_parts=True`` (``stats`` over the pixels).
    """
    N = grads.shape[1]
    g = grads.to(compute_dtype(grads.dtype))
    m = agreement_mask(g, magnitude_agreement(g.abs()), tau, rho, mask)
    mean = g.mean(0)
    shared = m * mean
    diversity = (1 - m) * (g[assign, torch.arange(N, device=g.device)] - mean)
    update = mean + alpha * shared + beta * diversity
    stats = torch.stack([m.sum().double(),
                         torch.tensor(float(m.numel()), dtype=torch.float64, device=g.device),
                         shared.square().sum().double(), mean.square().sum().double()])
    out = grads.dtype
    return update.to(out), mean.to(out), shared.to(out), diversity.to(out), stats
