"""The interface every multi-domain data source implements.

The distillation loop and the evaluation only talk to this protocol, so a folder of images,
the embedded Fashion-MNIST styles benchmark and pseudo-domain data are interchangeable.
:class:`DataSource` is the base class the sources derive from. Images come out as float32 tensors
``[n, C, H, W]`` already normalised with ``mean``/``std``.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch

from .sampling import draw_indices


@runtime_checkable
class MultiDomainDataset(Protocol):
    domains: list[str]  # domain names, in a fixed order
    classes: list[str]  # class names; labels are indices into this list
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per-channel normalisation applied to every returned image
    std: tuple[float, ...]

    def real_batch(self, domain: str, label: int, n: int, generator: torch.Generator | None = None,
                   split: str = "train") -> torch.Tensor:
        """``n`` normalised images of class ``label`` from ``domain`` (sampled with replacement
        only when the class has fewer than ``n`` images)."""
        ...

    def split_tensors(self, domains: Sequence[str], split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels of ``split`` for the given domains: ``(images [M,C,H,W], labels [M])``."""
        ...

    def count(self, domain: str, label: int, split: str = "train") -> int:
        """How many images of class ``label`` the domain holds in ``split``."""
        ...


class DataSource:
    """Base class of the sources: the optional attributes callers read have their defaults here,
    and ``real_batch`` is written once over what a subclass provides: ``domains``, ``classes``,
    ``count``, ``uint8_images(domain, label, index, split)`` and ``normalize_pixels``."""
    train_domains: list[str] | None = None  # the domains with a train split, when only some have one
    target_domains: list[str] | None = None  # the out-of-distribution targets, when they differ from those
    bad_files: Sequence[tuple[str, str]] = ()  # (path, why) of every unreadable file skipped
    missing_classes: Mapping[str, list[str]] = MappingProxyType({})  # domain -> classes it lacks
    missing_domains: Mapping[str, str] = MappingProxyType({})  # domain -> why it is absent (files looked for)
    target_groups: Mapping[str, tuple[str, ...]] = MappingProxyType({})  # named target sets (CORe50 "outdoor")

    def check_targets(self, targets: Sequence[str]) -> None:
        """Refuse, with one line, target domains this source cannot be tested on (default: any will do)."""

    def real_batch(self, domain: str, label: int, n: int, generator: torch.Generator | None = None,
                   split: str = "train") -> torch.Tensor:
        available = self.count(domain, label, split)
        if available == 0 and n > 0:
            raise ValueError(f"domain {domain!r} has no {split} images of class {self.classes[int(label)]!r}")
        index = draw_indices(available, n, generator).numpy()
        return self.normalize_pixels(self.uint8_images(domain, label, index, split))


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the dataset normalisation, clamp to [0, 1] (for saving grids)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)
