"""Training-domain validation (DomainBed's rule): hold out part of each source domain's training
split and select hyper-parameters on it, so the unseen target is never looked at.

:func:`hold_out` returns a view of the source domains only (the target is not in it): its
``train`` split is every source training image except the held-out ones, its ``test`` split is
the held-out images. Distil from the view's train split; validate on its test split.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import DataSource
from .sampling import check_source_domains, check_split, draw_indices


class HeldOutDomains:
    """A :class:`~sgs_cuda.data.base.MultiDomainDataset` over tensors held in memory.

    ``cells[domain][split] = (images, labels)``; ``convert`` turns stored images into the
    normalised float32 images the protocol hands out (the source's ``normalize_pixels`` for uint8
    images, ``None`` for images stored already normalised).
    """

    def __init__(self, cells: dict, classes: Sequence[str], image_shape, mean, std,
                 convert: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.domains = list(cells)
        self.classes = list(classes)
        self.image_shape = tuple(image_shape)
        self.mean, self.std = tuple(mean), tuple(std)
        self._cells = cells
        self._convert = convert
        self._by_class = {(d, s): [torch.nonzero(y == c).flatten() for c in range(len(self.classes))]
                          for d, splits in cells.items() for s, (_, y) in splits.items()}

    def _out(self, images: torch.Tensor) -> torch.Tensor:
        return self._convert(images) if self._convert is not None else images.clone()

    def _index(self, domain: str, label: int, split: str) -> torch.Tensor:
        if domain not in self._cells:
            raise ValueError(f"unknown domain {domain!r}; this validation view holds {self.domains}")
        return self._by_class[domain, check_split(split)][int(label)]

    def count(self, domain: str, label: int, split: str = "train") -> int:
        return int(self._index(domain, label, split).numel())

    def real_batch(self, domain: str, label: int, n: int, generator: torch.Generator | None = None,
                   split: str = "train") -> torch.Tensor:
        idx = self._index(domain, label, split)
        if idx.numel() == 0 and n > 0:
            raise ValueError(f"domain {domain!r} has no {split} images of class {self.classes[int(label)]!r}")
        return self._out(self._cells[domain][split][0][idx[draw_indices(idx.numel(), n, generator)]])

    def split_tensors(self, domains: Sequence[str], split: str = "test"):
        check_split(split)
        for d in domains:
            if d not in self._cells:
                raise ValueError(f"unknown domain {d!r}; this validation view holds {self.domains}")
        cells = [self._cells[d][split] for d in domains]
        if not cells:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long)
        return self._out(torch.cat([x for x, _ in cells])), torch.cat([y for _, y in cells])

    def __repr__(self) -> str:
        n = {d: {s: len(y) for s, (_, y) in splits.items()} for d, splits in self._cells.items()}
        return f"{type(self).__name__}({n}, classes={len(self.classes)})"


def hold_out(data, source_domains: Sequence[str], fraction: float = 0.2, seed: int = 0) -> HeldOutDomains:
    """The training-domain validation view of ``source_domains`` of ``data``.

    Per source domain and class, ``round(fraction * n)`` of the ``n`` training images (at least
    one, and at least one left for training) are drawn at random with ``seed`` and become the
    view's test split; the rest is its train split. Class-balanced by construction. Images come
    out normalised exactly as ``data`` normalises them. Sources with ``raw()`` (in-memory uint8
    sets such as the embedded benchmark) are kept as uint8; others are read once through
    ``split_tensors``.
    """
    source_domains = check_source_domains(data, source_domains, "hold_out")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    raw = hasattr(data, "raw") and hasattr(data, "normalize_pixels")
    if not raw and hasattr(data, "uint8_images"):  # folder sources: held out by position, nothing copied
        return _hold_out_by_position(data, source_domains, fraction, gen)
    cells = {}
    for d in source_domains:
        x, y = data.raw(d, "train") if raw else data.split_tensors([d], "train")
        held = []
        for c in range(len(data.classes)):
            idx = torch.nonzero(y == c).flatten()
            if len(idx):
                held.append(idx[_held_positions(len(idx), fraction, gen, d, data.classes[c])])
        held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.long)
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[held_idx] = False
        cells[d] = {"train": (x[keep], y[keep]), "test": (x[held_idx], y[held_idx])}
    return HeldOutDomains(cells, data.classes, data.image_shape, data.mean, data.std,
                          convert=data.normalize_pixels if raw else None)


def _held_positions(n: int, fraction: float, gen: torch.Generator, domain: str, cls: str) -> torch.Tensor:
    """Which of a class's ``n`` training images (positions) are held out."""
    if n < 2:
        raise ValueError(f"domain {domain!r} has {n} training image of class {cls!r}: need 2 to hold one out")
    k = min(max(1, round(fraction * n)), n - 1)
    return torch.randperm(n, generator=gen)[:k]


class HeldOutPositions(DataSource):
    """The training-domain validation view of a source with indexed reads (``uint8_images``):
    it keeps, per (domain, split, class), positions into the source's train cell, and reads the
    images through the source when asked, so a large (memory-mapped) source is never copied."""

    def __init__(self, data, domains: Sequence[str], positions: dict):
        self.data, self.domains, self._positions = data, list(domains), positions
        self.classes, self.image_shape = list(data.classes), tuple(data.image_shape)
        self.mean, self.std = tuple(data.mean), tuple(data.std)

    def _index(self, domain: str, label: int, split: str) -> torch.Tensor:
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this validation view holds {self.domains}")
        if not 0 <= int(label) < len(self.classes):
            raise ValueError(f"label {label} outside [0, {len(self.classes)})")
        return self._positions[domain, check_split(split), int(label)]

    def count(self, domain: str, label: int, split: str = "train") -> int:
        return int(self._index(domain, label, split).numel())

    def uint8_images(self, domain: str, label: int, index, split: str = "train") -> torch.Tensor:
        pos = self._index(domain, label, split)[torch.as_tensor(index, dtype=torch.long).reshape(-1)]
        return self.data.uint8_images(domain, label, pos.numpy(), "train")

    def normalize_pixels(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.data.normalize_pixels(images_uint8)

    def split_tensors(self, domains: Sequence[str], split: str = "test"):
        parts = [(self.uint8_images(d, c, torch.arange(self.count(d, c, split)), split), c)
                 for d in domains for c in range(len(self.classes))]
        if not parts:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long)
        return (self.normalize_pixels(torch.cat([x for x, _ in parts])),
                torch.cat([torch.full((len(x),), c, dtype=torch.long) for x, c in parts]))

    def __repr__(self) -> str:
        n = {d: {s: sum(self.count(d, c, s) for c in range(len(self.classes))) for s in ("train", "test")}
             for d in self.domains}
        return f"{type(self).__name__}({n}, classes={len(self.classes)})"


def _hold_out_by_position(data, source_domains: Sequence[str], fraction: float,
                          gen: torch.Generator) -> HeldOutPositions:
    """The same draws as the copying path (class by class, in the source's order), on positions."""
    positions = {}
    for d in source_domains:
        for c in range(len(data.classes)):
            n = data.count(d, c, "train")
            held = _held_positions(n, fraction, gen, d, data.classes[c]).sort().values if n else \
                torch.empty(0, dtype=torch.long)
            keep = torch.ones(n, dtype=torch.bool)
            keep[held] = False
            positions[d, "train", c], positions[d, "test", c] = torch.nonzero(keep).flatten(), held
    return HeldOutPositions(data, source_domains, positions)
