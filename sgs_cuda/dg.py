"""Post-hoc domain generalisation in the evaluation networks: the route the DG-DD paper argues is
ill-suited to a distilled set (it "relies on the natural diversity of real datasets"), measured
here as methods of the pipeline (``dm_mixstyle``, ``dm_fact``: DM's set, evaluated with them).

- :class:`MixStyle` (Zhou et al., ICLR 2021): in training, with probability ``p`` per batch,
  each image's per-channel feature mean and standard deviation are mixed with those of another
  image of the batch (``lambda ~ Beta(alpha, alpha)``); inserted after the early blocks of the
  ConvNet, as the paper inserts it after the early stages of a ResNet.
- :func:`amplitude_mix`: the Fourier amplitude mix of FACT (Xu et al., CVPR 2021): an image's
  amplitude spectrum is mixed with another image's (``lambda ~ U(0, eta)``), its phase kept.
  Only the augmentation: FACT's co-teacher and its consistency losses are not part of it.

Both draw from the generator the evaluation owns, so an evaluation stays reproducible, and both
are exact no-ops at zero strength (nothing is drawn then).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MixStyle(nn.Module):
    """Mix instance-level feature statistics across the batch (training mode only)."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, generator: torch.Generator | None = None, eps: float = 1e-6):
        super().__init__()
        if not 0 <= p <= 1 or alpha <= 0:
            raise ValueError(f"MixStyle needs 0 <= p <= 1 and alpha > 0, got p={p}, alpha={alpha}")
        self.p, self.alpha, self.eps = p, alpha, eps
        self.generator = generator or torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or len(x) < 2:
            return x
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return x
        seed = int(torch.randint(0, 2 ** 62, (), generator=self.generator))
        lam = torch.from_numpy(np.random.default_rng(seed).beta(self.alpha, self.alpha, size=(len(x), 1, 1, 1)))
        lam = lam.to(x.device, x.dtype)
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        mu = x.mean(dim=(2, 3), keepdim=True)
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        mu, sig = mu.detach(), sig.detach()  # as in the paper: the statistics are not back-propagated through
        normed = (x - mu) / sig
        return normed * (lam * sig + (1 - lam) * sig[perm]) + (lam * mu + (1 - lam) * mu[perm])

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}"


def add_mixstyle(net: nn.Module, p: float, alpha: float, generator: torch.Generator) -> nn.Module:
    """Insert :class:`MixStyle` after every block of a ConvNet but the last (the early layers carry
    style; the last carries the class). Other architectures are refused with a clear message."""
    from .dm.networks import ConvNet

    if not isinstance(net, ConvNet):
        raise ValueError(f"MixStyle is implemented for the ConvNet evaluator, not {type(net).__name__}: "
                         "evaluate with --eval-arch convnet")
    if net.depth < 2:
        raise ValueError("MixStyle needs a ConvNet of depth >= 2 (it goes between blocks)")
    layers = list(net.features)
    out: list[nn.Module] = []
    for d in range(net.depth):
        out += layers[4 * d:4 * d + 4]  # conv, norm, relu, pool
        if d < net.depth - 1:
            out.append(MixStyle(p, alpha, generator))
    net.features = nn.Sequential(*out)
    return net


def amplitude_mix(x: torch.Tensor, eta: float, generator: torch.Generator) -> torch.Tensor:
    """FACT's amplitude mix of a batch ``[n, C, H, W]``: each image's amplitude spectrum becomes
    ``(1 - lam) A_i + lam A_j`` with ``j`` another image of the batch and ``lam ~ U(0, eta)``
    per image; the phase stays the image's own."""
    if not 0 <= eta <= 1:
        raise ValueError(f"amplitude mix needs 0 <= eta <= 1, got {eta}")
    if eta == 0 or len(x) < 2:
        return x
    lam = (torch.rand(len(x), 1, 1, 1, generator=generator) * eta).to(x.device, torch.float32)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    spec = torch.fft.rfft2(x.float())
    amp, phase = spec.abs(), spec.angle()
    mixed = (1 - lam) * amp + lam * amp[perm]
    return torch.fft.irfft2(torch.polar(mixed, phase), s=x.shape[-2:]).to(x.dtype)
