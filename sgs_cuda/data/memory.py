"""A protocol data source backed by uint8 tensors held in memory.

Used by the embedded Fashion-MNIST styles benchmark and by pseudo-domain datasets. Images are
kept as uint8 (4x smaller than float32) and normalised only when a batch is handed out.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .base import DataSource
from .sampling import SPLITS, check_split

Cell = tuple[torch.Tensor, torch.Tensor]  # (uint8 images [n, C, H, W], int64 labels [n])


def channel_stats(images: Sequence[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units over uint8 image tensors (float64 accumulation)."""
    total, s1, s2 = 0, 0.0, 0.0
    for x in images:
        if x.numel() == 0:
            continue
        f = x.to(torch.float64) / 255.0
        total += f.shape[0] * f.shape[2] * f.shape[3]
        s1 = s1 + f.sum(dim=(0, 2, 3))
        s2 = s2 + (f * f).sum(dim=(0, 2, 3))
    if total == 0:
        raise ValueError("cannot compute normalisation statistics from an empty split")
    mean = s1 / total
    std = (s2 / total - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())


class InMemoryDomains(DataSource):
    """``cells[domain][split] = (uint8 images, labels)``; labels index ``classes``.

    ``mean``/``std`` default to the statistics of the pooled train split.
    """

    def __init__(self, cells: Mapping[str, Mapping[str, Cell]], classes: Sequence[str],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if not cells:
            raise ValueError("no domains given")
        self.domains = list(cells)
        self.classes = list(classes)
        self._cells: dict[str, dict[str, Cell]] = {}
        self._by_class: dict[tuple[str, str], list[torch.Tensor]] = {}
        shape = None
        for d, splits in cells.items():
            self._cells[d] = {}
            for split in SPLITS:
                x, y = splits.get(split, (None, None))
                if x is None:
                    x, y = torch.empty((0, 0, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.long)
                x = torch.as_tensor(x)
                y = torch.as_tensor(y, dtype=torch.long)
                if x.dtype != torch.uint8 or x.dim() != 4 or len(x) != len(y):
                    raise ValueError(f"domain {d!r} split {split!r}: expected uint8 [n,C,H,W] images and "
                                     f"[n] labels, got {tuple(x.shape)} {x.dtype} and {tuple(y.shape)}")
                if len(x):
                    if shape is not None and tuple(x.shape[1:]) != shape:
                        raise ValueError(f"domain {d!r} split {split!r}: image shape {tuple(x.shape[1:])} "
                                         f"differs from {shape}")
                    shape = tuple(x.shape[1:])
                    if int(y.min()) < 0 or int(y.max()) >= len(self.classes):
                        raise ValueError(f"domain {d!r} split {split!r}: labels outside [0, {len(self.classes)})")
                self._cells[d][split] = (x, y)
                self._by_class[d, split] = [torch.nonzero(y == c).flatten() for c in range(len(self.classes))]
        if shape is None:
            raise ValueError("no images in any domain")
        for d in self._cells:  # give empty placeholders the common image shape
            for split, (x, y) in self._cells[d].items():
                if len(x) == 0:
                    self._cells[d][split] = (torch.empty((0, *shape), dtype=torch.uint8), y)
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        if mean is None or std is None:
            mean, std = channel_stats([self._cells[d]["train"][0] for d in self.domains])
        if len(mean) != shape[0] or len(std) != shape[0]:
            raise ValueError(f"mean/std need {shape[0]} channels, got {len(mean)}/{len(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._m = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._s = torch.tensor(self.std).view(1, -1, 1, 1)

    # -- helpers ---------------------------------------------------------------------------
    def _domain(self, domain: str) -> dict[str, Cell]:
        if domain not in self._cells:
            raise ValueError(f"unknown domain {domain!r}; available: {self.domains}")
        return self._cells[domain]

    def _class_index(self, domain: str, label: int, split: str) -> torch.Tensor:
        self._domain(domain)
        check_split(split)
        if not 0 <= int(label) < len(self.classes):
            raise ValueError(f"label {label} outside [0, {len(self.classes)})")
        return self._by_class[domain, split][int(label)]

    def normalize_pixels(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.to(torch.float32) / 255.0 - self._m) / self._s

    def raw(self, domain: str, split: str = "train") -> Cell:
        """The stored uint8 images and labels of one domain and split (no copy)."""
        return self._domain(domain)[check_split(split)]

    def uint8_images(self, domain: str, label: int, index, split: str = "train") -> torch.Tensor:
        """The images at positions ``index`` among the class's images of one domain and split (uint8)."""
        idx = self._class_index(domain, label, split)
        return self._cells[domain][split][0][idx[torch.as_tensor(index, dtype=torch.long).reshape(-1)]]

    # -- protocol --------------------------------------------------------------------------
    def count(self, domain: str, label: int, split: str = "train") -> int:
        return int(self._class_index(domain, label, split).numel())

    def split_tensors(self, domains: Sequence[str], split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        check_split(split)
        cells = [c for c in (self._domain(d)[split] for d in domains) if len(c[1])]
        if not cells:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long)
        return self.normalize_pixels(torch.cat([x for x, _ in cells])), torch.cat([y for _, y in cells])

    def __repr__(self) -> str:
        n = {d: sum(len(self._cells[d][s][1]) for s in SPLITS) for d in self.domains}
        return f"{type(self).__name__}(domains={n}, classes={len(self.classes)}, image_shape={self.image_shape})"
