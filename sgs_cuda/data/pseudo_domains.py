"""Pseudo-domains for data without domain labels, following DAM (arXiv 2505.22387).

Style (colour cast, contrast, texture energy) lives mostly in the low-frequency amplitude
spectrum, while content lives in the phase. Clustering the log-amplitude of the lowest
frequencies therefore groups images by style, which stands in for the missing domain labels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import denormalize
from .memory import InMemoryDomains


def low_frequency_features(images: torch.Tensor, window: int = 8) -> torch.Tensor:
    """``log(1 + |F|)`` of the central ``window x window`` of each channel's centred ``fft2``.

    ``images`` ``[N, C, H, W]`` should be in [0, 1] (not normalised): the DC amplitude then keeps
    the brightness and colour cast, which normalisation could flip in sign and the amplitude lose.
    Returns ``[N, C * window * window]`` float32 (amplitude normalised by the pixel count, so
    the resolution does not change the scale).
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    win_h, win_w = min(window, h), min(window, w)
    spec = torch.fft.fftshift(torch.fft.fft2(images.to(torch.float32)), dim=(-2, -1))
    top, left = h // 2 - win_h // 2, w // 2 - win_w // 2
    amp = spec[..., top:top + win_h, left:left + win_w].abs() / (h * w)
    return torch.log1p(amp * 100.0).reshape(n, -1)  # x100: small amplitudes stay distinguishable


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 25,
           n_init: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on rows of ``x`` ``[N, F]``: ``(labels [N], centres [k, F])``.

    ``n_init`` seeded restarts, the lowest within-cluster sum of squares wins. An empty cluster is
    re-seeded at the point farthest from its centre, so exactly ``k`` clusters come back.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    x = x.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        centres = x[torch.randint(n, (1,), generator=g)]
        for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
            d2 = torch.cdist(x, centres).pow(2).amin(1)
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
            centres = torch.cat([centres, x[torch.multinomial(p, 1, generator=g)]])
        for _ in range(iters):
            dist = torch.cdist(x, centres)
            labels = dist.argmin(1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
            own = dist.gather(1, labels[:, None]).squeeze(1)
            for empty in torch.nonzero(counts == 0).flatten().tolist():
                far = own.argmax()
                new[empty] = x[far]
                own[far] = -1.0  # the next empty cluster takes another point
            if torch.allclose(new, centres):
                centres = new
                break
            centres = new
        labels = torch.cdist(x, centres).argmin(1)
        inertia = (x - centres[labels]).pow(2).sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    _, labels, centres = best
    # Relabel by decreasing size so the ids do not depend on the seeding order.
    order = torch.argsort(-torch.bincount(labels, minlength=k), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return rank[labels], centres[order].to(torch.float32)


def assign_pseudo_domains(images: torch.Tensor, k: int, seed: int = 0, window: int = 8,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Cluster images into ``k`` pseudo-domains by low-frequency amplitude: labels ``[N]`` int64.

    Give images in [0, 1], or normalised images together with their ``mean``/``std``.
    """
    if mean is not None and std is not None:
        images = denormalize(images, mean, std)
    return kmeans(low_frequency_features(images, window), k, seed)[0]


class PseudoDomainDataset(InMemoryDomains):
    """A protocol dataset whose domains are ``pseudo0 .. pseudo{k-1}``, found by clustering.

    The train images of all of ``base``'s domains are pooled (a single-domain dataset works too)
    and clustered; test images go to the nearest train centre, so both splits share the clusters.
    Images are held as uint8, which is exact for 8-bit sources (all the shipped ones).
    ``source_domain[name][split]`` keeps each image's original domain (an index into
    ``base_domains``) for diagnostics. A pseudo-domain may lack a class: ``count`` then says 0
    and ``real_batch`` raises a clear error.
    """

    def __init__(self, base, k: int, seed: int = 0, window: int = 8):
        per_split = {}
        for split in ("train", "test"):
            parts = [(i, *base.split_tensors([d], split)) for i, d in enumerate(base.domains)]
            x = torch.cat([p[1] for p in parts])
            y = torch.cat([p[2] for p in parts])
            src = torch.cat([torch.full((len(p[2]),), p[0], dtype=torch.long) for p in parts])
            per_split[split] = (denormalize(x, base.mean, base.std), y, src)
        x_train = per_split["train"][0]
        if len(x_train) < k:
            raise ValueError(f"cannot form {k} pseudo-domains from {len(x_train)} train images")
        labels, centres = kmeans(low_frequency_features(x_train, window), k, seed)
        assign = {"train": labels}
        if len(per_split["test"][0]):
            feats = low_frequency_features(per_split["test"][0], window)
            assign["test"] = torch.cdist(feats.double(), centres.double()).argmin(1)
        else:
            assign["test"] = torch.empty(0, dtype=torch.long)
        domains = [f"pseudo{j}" for j in range(k)]
        cells, self.source_domain = {}, {}
        for split, (x, y, _) in per_split.items():
            x8 = (x * 255.0).round().to(torch.uint8)
            for j, name in enumerate(domains):
                sel = assign[split] == j
                cells.setdefault(name, {})[split] = (x8[sel], y[sel])
        for j, name in enumerate(domains):
            self.source_domain[name] = {s: per_split[s][2][assign[s] == j] for s in per_split}
        self.base_domains = list(base.domains)
        super().__init__(cells, base.classes, mean=base.mean, std=base.std)
