"""Where do the domains agree? The surgery's diagnostics per radial frequency band.

The half-spectrum bins of ``rfft2`` on an ``H x W`` grid have frequencies ``(fy, fx)`` in cycles
per pixel (``fy`` in [-1/2, 1/2), ``fx`` in [0, 1/2]); a bin's *normalised radius* is
``sqrt(fy^2 + fx^2) / (1/2)``: 0 at the mean (DC), 1 at the Nyquist frequency of an axis,
up to sqrt(2) in the corners. ``BAND_EDGES`` cut it into bands (the last band takes the
corners). Per band, over all images and channels of one step:

- ``mask_fraction``: mean of the agreement mask over the band's real and imaginary components
  (the hard mask's kept fraction; the soft mask's mean), as the op's ``mask_fraction``;
- ``shared_energy``: ``sum |Sh|^2 / sum |Fbar|^2`` in the band (``Sh`` the shared spectrum,
  ``Fbar`` the mean of the domain spectra), as the op's ``shared_energy``;
- ``diversity_energy``: ``sum |Div|^2 / sum |Fbar|^2`` in the band (the assigned domains'
  deviations in the components the mask leaves out; it can exceed 1);
- ``energy``: the band's share of ``sum |Fbar|^2`` (where the mean gradient's energy lies).

Sums run over the half-spectrum without Hermitian weights, like the op's diagnostics, so the
band values recombine into the op's totals (the tests check that).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..reference import compute_dtype, formulation_mask, real_spectrum

BAND_EDGES = (0.25, 0.5, 0.75)  # normalised radius: bands [0, .25), [.25, .5), [.5, .75), [.75, sqrt 2]
BAND_KEYS = ("mask_fraction", "shared_energy", "diversity_energy", "energy")


def band_index(height: int, width: int, edges: Sequence[float] = BAND_EDGES, device=None) -> torch.Tensor:
    """``[H, W // 2 + 1]`` int64: the band of every half-spectrum bin."""
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(width, device=device, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    return torch.bucketize(radius, torch.tensor(list(edges), dtype=torch.float64, device=device), right=True)


def band_labels(edges: Sequence[float] = BAND_EDGES) -> list[str]:
    bounds = [0.0, *edges, math.sqrt(2)]
    return [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def spectral_masks(grads: torch.Tensor, tau: float, rho: float, mask: str, *, agree_on: torch.Tensor | None = None,
                   equalize: bool = False, combine: str = "mask"):
    """``(spectrum, mask of the real parts, mask of the imaginary parts)`` of ``grads``
    ``[D, N, C, H, W]``, recomputed with the reference's functions as the op defines them (the
    test on ``agree_on``'s spectra when given; ``combine="pcgrad"``: 1 where no conflict was
    projected out)."""
    spec = real_spectrum(grads.to(compute_dtype(grads.dtype)))
    test = spec if agree_on is None or combine == "pcgrad" else real_spectrum(agree_on.to(spec.real.dtype))
    return (spec, *formulation_mask(test, tau, rho, mask, equalize, combine))


@torch.no_grad()
def band_diagnostics(grads: torch.Tensor, diversity: torch.Tensor, tau: float, rho: float, mask: str,
                     edges: Sequence[float] = BAND_EDGES, **mask_options) -> dict[str, torch.Tensor]:
    """Per-band diagnostics (``BAND_KEYS`` -> float64 tensor ``[len(edges) + 1]``) of one surgery
    step on ``grads`` ``[D, N, C, H, W]``; ``diversity`` ``[N, C, H, W]`` is the op's spatial
    diversity part (``SGSParts.diversity``: it carries the step's random domain assignment).
    The mask is recomputed with the reference's functions, as the op defines it
    (``mask_options``: those of :func:`spectral_masks`).
    """
    H, W = grads.shape[-2:]
    spec, mask_re, mask_im = spectral_masks(grads, tau, rho, mask, **mask_options)
    mean = spec.mean(0)
    shared = (mask_re * mean.real) ** 2 + (mask_im * mean.imag) ** 2
    div = torch.fft.rfft2(diversity.to(spec.real.dtype)).abs().square()
    idx = band_index(H, W, edges, device=grads.device).flatten()
    nb = len(edges) + 1

    def per_band(x: torch.Tensor) -> torch.Tensor:  # sum over images/channels, then over each band's bins
        return torch.zeros(nb, dtype=torch.float64, device=x.device).index_add_(
            0, idx, x.reshape(-1, idx.numel()).sum(0).double())

    total = per_band(mean.abs().square())
    tiny = torch.finfo(torch.float64).tiny
    bins = torch.bincount(idx, minlength=nb).double() * 2 * mean[..., 0, 0].numel()  # re + im, all images
    return {"mask_fraction": per_band(mask_re + mask_im) / bins.clamp_min(1),
            "shared_energy": per_band(shared) / total.clamp_min(tiny),
            "diversity_energy": per_band(div) / total.clamp_min(tiny),
            "energy": total / total.sum().clamp_min(tiny)}


@torch.no_grad()
def band_amplitude(images: torch.Tensor, edges: Sequence[float] = BAND_EDGES, bins: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """float64 ``[len(edges) + 1]``: the mean amplitude ``|rfft2|`` of ``images`` ``[N, C, H, W]``
    per radial band, over the images, channels and the band's bins; the DC bin is left out (it
    holds the normalisation's offset, not content). With ``bins`` (bool ``[H, W // 2 + 1]``) the
    mean over those bins instead, one value (what a distilled set keeps of a cue, say)."""
    H, W = images.shape[-2:]
    amp = torch.fft.rfft2(images.double()).abs().reshape(-1, H * (W // 2 + 1)).mean(0)
    not_dc = torch.ones(H * (W // 2 + 1), dtype=torch.bool, device=amp.device)
    not_dc[0] = False
    if bins is not None:
        if tuple(bins.shape) != (H, W // 2 + 1):
            raise ValueError(f"bins must be [{H}, {W // 2 + 1}] for {H}x{W} images, got {list(bins.shape)}")
        chosen = bins.to(amp.device).flatten() & not_dc
        return amp[chosen].mean().reshape(1)
    idx = band_index(H, W, edges, device=amp.device).flatten()
    return torch.stack([amp[(idx == b) & not_dc].mean() for b in range(len(edges) + 1)])


# --- the mask against the ground truth (the premise benchmark, sgs_cuda.data.fmnist_cues) ------

TRUTH_GROUPS = ("cue", "other", "own")  # own: each image's own class's cue bins


def chance_keep_rate(num_domains: int, tau: float, rho: float = 0.0, mask: str = "hard") -> float | None:
    """The mask's mean over one real component if the ``D`` domains' signs were independent fair
    coins: ``P(|sum_d sgn| >= tau * D)`` (hard mask), ``E |sum_d sgn| / D`` (soft mask, magnitude
    agreement aside). With ``rho > 0`` (hard) or the soft mask's magnitude factor the rate also
    depends on the magnitudes, so there is no distribution-free value: ``None`` then for the
    hard mask; the soft mask's value is the sign factor's alone (an upper bound)."""
    if num_domains < 1:
        raise ValueError(f"need at least one domain, got {num_domains}")
    if mask == "hard" and rho > 0:
        return None
    total = 0.0
    for k in range(num_domains + 1):  # k positive signs out of D
        p = math.comb(num_domains, k) / 2 ** num_domains
        a = abs(2 * k - num_domains) / num_domains
        total += p * (a if mask == "soft" else float(a >= tau - 1e-12))
    return total


@torch.no_grad()
def truth_mask_sums(grads: torch.Tensor, tau: float, rho: float, mask: str, cue_bins: torch.Tensor,
                    own_bins: torch.Tensor | None = None, **mask_options) -> torch.Tensor:
    """float64 ``[2, 3]``: row 0 the mask summed over the real and imaginary components of the
    cue bins, of the other bins and of each image's own class's cue bins (``TRUTH_GROUPS``), row 1
    how many components each holds; sums, so chunks and processes add up. ``cue_bins``: bool
    ``[H, W // 2 + 1]``, the ground truth (every class's cues); ``own_bins``: bool ``[n, H, W // 2 + 1]``
    per image (``grads``' rows), or None (the third group then holds nothing)."""
    H, W = grads.shape[-2:]
    if tuple(cue_bins.shape) != (H, W // 2 + 1):
        raise ValueError(f"cue_bins must be [{H}, {W // 2 + 1}] for {H}x{W} images, got {list(cue_bins.shape)}")
    _, mask_re, mask_im = spectral_masks(grads, tau, rho, mask, **mask_options)
    kept = mask_re + mask_im
    per_bin = kept.double().reshape(-1, H * (W // 2 + 1)).sum(0)
    cue = cue_bins.to(per_bin.device).flatten()
    components = 2.0 * kept[..., 0, 0].numel()  # re + im, every image and channel
    counts = torch.stack([cue.sum(), (~cue).sum()]).double() * components
    kept_sums = [per_bin[cue].sum(), per_bin[~cue].sum()]
    if own_bins is None:
        own, own_count = per_bin.new_zeros(()), per_bin.new_zeros(())
    else:
        own_bins = own_bins.to(kept.device)
        own = (kept.double().sum(1) * own_bins).sum()  # [n, H, Wf]: summed over the channels
        own_count = own_bins.double().sum() * 2 * kept.shape[1]
    return torch.stack([torch.stack([*kept_sums, own]), torch.cat([counts, own_count.view(1)])])
