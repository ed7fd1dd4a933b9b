"""Pseudo-domains for data without domain labels, following DAM (arXiv 2505.22387).

Style (colour cast, contrast, texture energy) lives mostly in the low-frequency amplitude
spectrum, while content lives in the phase. Clustering the log-amplitude of the lowest
frequencies therefore groups images by style, which stands in for the missing domain labels.
"""
from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import DataSource, denormalize
from .decode_cache import default_cache_dir, save_npz_atomic
from .memory import InMemoryDomains
from .sampling import SPLITS, check_cell

CACHE_VERSION = 2  # of the cached assignment; bump when the clustering changes


def _dft_rows(n: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the DFT rows for the ``window`` frequencies nearest 0 (``-window//2 ...``)."""
    freqs = torch.arange(window, dtype=torch.float64) - window // 2
    angle = 2 * torch.pi * freqs[:, None] * torch.arange(n, dtype=torch.float64)[None, :] / n
    return torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)


def low_frequency_features(images: torch.Tensor, window: int = 8) -> torch.Tensor:
    """``log(1 + |F|)`` of the central ``window x window`` of each channel's centred ``fft2``.

    ``images`` ``[N, C, H, W]`` should be in [0, 1] (not normalised): the DC amplitude then keeps
    the brightness and colour cast, which normalisation could flip in sign and the amplitude lose.
    Returns ``[N, C * window * window]`` float32 (amplitude normalised by the pixel count, so
    the resolution does not change the scale).

    Only those ``window**2`` frequencies are computed (two small real DFT matrix products per
    plane), not the whole spectrum: the memory is that of the images, at any resolution.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    win_h, win_w = min(window, h), min(window, w)
    x = images.to(torch.float32)
    ch, sh = _dft_rows(h, win_h)  # F = (Ch - i Sh) x (Cw - i Sw)^T
    cw, sw = _dft_rows(w, win_w)
    p, q = ch @ x, sh @ x  # [N, C, win_h, W]
    real = p @ cw.T - q @ sw.T
    imag = p @ sw.T + q @ cw.T  # the sign of the imaginary part does not change the amplitude
    amp = torch.sqrt(real * real + imag * imag) / (h * w)
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


class PseudoDomainDataset(DataSource):
    """A protocol dataset whose domains are ``pseudo0 .. pseudo{k-1}``, found by clustering.

    The train images of ``base``'s domains (all, or ``domains``) are pooled and clustered by
    low-frequency amplitude (:func:`kmeans` on :func:`low_frequency_features`), fitted on at most
    ``fit_sample`` of them (a seeded random sample: bounded time and memory on any data size);
    every other image, and every test image, goes to the nearest centre. The result is a view:
    batches are read from ``base`` when asked for, so nothing is copied.

    ``base`` should offer indexed reads (``uint8_images``, as the folder and in-memory sources
    do); another protocol dataset is first copied into memory as uint8, which is exact for 8-bit
    sources. When ``base`` has a ``cache_key`` the assignment is cached on disk
    (``<cache_dir>/pseudo_domains``, written atomically) and reused by later runs.

    ``source_domain[name][split]`` keeps each image's original domain (an index into
    ``base_domains``) for diagnostics. A pseudo-domain may lack a class: ``count`` then says 0
    and ``real_batch`` raises a clear error. ``from_cache`` tells whether the assignment was reused.
    """

    def __init__(self, base, k: int, seed: int = 0, window: int = 8, domains: Sequence[str] | None = None,
                 fit_sample: int = 20000, cache_dir=None, chunk: int = 256):
        domains = list(domains if domains is not None else base.domains)
        if hasattr(base, "base") and not hasattr(base, "uint8_images") and hasattr(base.base, "uint8_images"):
            base = base.base  # a view restricting the domains (the CLI's DomainSubset): read through it
        if not hasattr(base, "uint8_images"):
            base = _in_memory(base, domains)
        if fit_sample < k:
            raise ValueError(f"fit_sample must be at least k={k}, got {fit_sample}")
        self.base, self.base_domains, self.classes = base, domains, list(base.classes)
        self.image_shape, self.mean, self.std = tuple(base.image_shape), tuple(base.mean), tuple(base.std)
        self.domains = [f"pseudo{j}" for j in range(k)]
        self.bad_files = list(getattr(base, "bad_files", []))
        K = len(self.classes)
        # Every image of the pooled domains, in a fixed order: (base domain, label, position in the cell).
        items = {split: np.concatenate([np.empty((0, 3), dtype=np.int64)] + [
            np.stack(np.broadcast_arrays(i, c, np.arange(base.count(d, c, split))), axis=1)
            for i, d in enumerate(domains) for c in range(K)]) for split in SPLITS}
        if len(items["train"]) < k:
            raise ValueError(f"cannot form {k} pseudo-domains from {len(items['train'])} train images")

        key = getattr(base, "cache_key", None)
        if key is not None:
            key = repr((CACHE_VERSION, key, domains, k, seed, window, fit_sample))
            key = hashlib.sha256(key.encode()).hexdigest()[:32]
            self.cache_path = Path(cache_dir or default_cache_dir()).expanduser() / "pseudo_domains" / f"{key}.npz"
        else:
            self.cache_path = None
        assign = self._read_cache(items)
        self.from_cache = assign is not None
        if assign is None:
            assign = self._cluster(items, k, seed, window, fit_sample, chunk)
            if self.cache_path is not None:
                try:
                    save_npz_atomic(self.cache_path, {f"{s}_assign": a for s, a in assign.items()}
                                    | {f"{s}_count": np.array(len(items[s])) for s in SPLITS})
                except OSError as e:
                    warnings.warn(f"could not cache the pseudo-domain assignment at {self.cache_path}: {e}")

        # cells[(pseudo domain, split, label)] = rows of items[split]
        self._cells = {}
        for split in SPLITS:
            for j, name in enumerate(self.domains):
                mine = assign[split] == j
                for c in range(K):
                    self._cells[name, split, c] = np.flatnonzero(mine & (items[split][:, 1] == c))
        self._items = items
        self.source_domain = {name: {s: torch.from_numpy(items[s][assign[s] == j, 0]) for s in SPLITS}
                              for j, name in enumerate(self.domains)}

    # -- building ---------------------------------------------------------------------------
    def _features(self, part: np.ndarray, split: str, window: int, chunk: int) -> torch.Tensor:
        """Low-frequency features of the images ``part`` (item rows), read ``chunk`` at a time."""
        feats = [low_frequency_features(self._read(part[i:i + chunk], split).to(torch.float32) / 255.0, window)
                 for i in range(0, len(part), chunk)]
        return torch.cat(feats)

    def _read(self, part: np.ndarray, split: str) -> torch.Tensor:
        """uint8 images of ``part`` (rows of (domain, label, position)), in that order."""
        out = torch.empty((len(part), *self.image_shape), dtype=torch.uint8)
        cell_id = part[:, 0] * len(self.classes) + part[:, 1]
        for cid in np.unique(cell_id):
            where = np.flatnonzero(cell_id == cid)
            d, c = self.base_domains[int(cid) // len(self.classes)], int(cid) % len(self.classes)
            out[torch.from_numpy(where)] = self.base.uint8_images(d, c, part[where, 2], split)
        return out

    def _cluster(self, items, k, seed, window, fit_sample, chunk) -> dict[str, np.ndarray]:
        n = len(items["train"])
        rng = np.random.default_rng([seed, 0x5A11])
        fit_rows = np.sort(rng.choice(n, fit_sample, replace=False)) if n > fit_sample else np.arange(n)
        labels, centres = kmeans(self._features(items["train"][fit_rows], "train", window, chunk), k, seed)
        centres = centres.double()
        assign = {}
        for split in SPLITS:
            if split == "train" and len(fit_rows) == n:
                assign[split] = labels.numpy()
                continue
            out = np.empty(len(items[split]), dtype=np.int64)
            for start in range(0, len(out), chunk):  # nearest centre, a chunk at a time
                f = self._features(items[split][start:start + chunk], split, window, chunk).double()
                out[start:start + len(f)] = torch.cdist(f, centres).argmin(1).numpy()
            if split == "train":
                out[fit_rows] = labels.numpy()  # the fitted images keep their k-means labels
            assign[split] = out
        return assign

    def _read_cache(self, items) -> dict[str, np.ndarray] | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            with np.load(self.cache_path) as z:
                assign = {s: z[f"{s}_assign"] for s in SPLITS}
                ok = all(int(z[f"{s}_count"]) == len(items[s]) == len(assign[s]) for s in SPLITS)
            if not ok or any(a.size and (a.min() < 0 or a.max() >= len(self.domains)) for a in assign.values()):
                raise ValueError("it does not match the data")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"ignoring unreadable pseudo-domain cache {self.cache_path} ({e}); clustering again")
            return None
        return assign

    # -- protocol ---------------------------------------------------------------------------
    def _cell(self, domain: str, label: int, split: str) -> np.ndarray:
        return self._cells[check_cell(self, domain, label, split)]

    def normalize_pixels(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.base.normalize_pixels(images_uint8)  # batches exactly as the base source gives them

    def uint8_images(self, domain: str, label: int, index, split: str = "train") -> torch.Tensor:
        rows = self._cell(domain, label, split)[np.asarray(index, dtype=np.int64).reshape(-1)]
        return self._read(self._items[split][rows], split)

    def count(self, domain: str, label: int, split: str = "train") -> int:
        return len(self._cell(domain, label, split))

    def split_tensors(self, domains: Sequence[str], split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        K = len(self.classes)
        rows = [self._cell(d, c, split) for d in domains for c in range(K)]
        labels = torch.cat([torch.full((len(r),), i % K, dtype=torch.long) for i, r in enumerate(rows)] +
                           [torch.empty(0, dtype=torch.long)])
        rows = np.concatenate(rows + [np.empty(0, dtype=np.int64)])
        return self.normalize_pixels(self._read(self._items[split][rows], split)), labels

    def __repr__(self) -> str:
        n = {d: sum(len(self._cells[d, s, c]) for s in SPLITS for c in range(len(self.classes))) for d in self.domains}
        return f"PseudoDomainDataset(domains={n}, classes={len(self.classes)}, of={self.base_domains})"


def _in_memory(base, domains: Sequence[str]) -> InMemoryDomains:
    """A copy of ``base``'s ``domains`` as uint8 in memory (for sources without indexed reads)."""
    cells = {}
    for d in domains:
        cells[d] = {}
        for split in SPLITS:
            x, y = base.split_tensors([d], split)
            cells[d][split] = ((denormalize(x, base.mean, base.std) * 255.0).round().to(torch.uint8), y) \
                if len(y) else (None, None)
    return InMemoryDomains(cells, base.classes, mean=base.mean, std=base.std)
