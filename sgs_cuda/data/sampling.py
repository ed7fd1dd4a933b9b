"""Class-balanced, per-domain sampling shared by every data source.

DM matches class-conditional feature means per domain, so every real batch is drawn from one
(domain, class) cell and all domains contribute batches of the same size: with equal sizes the
mean of the domain-wise gradients is exactly the pooled-batch DM gradient (spec section 2).
The draws come from a ``torch.Generator`` so an experiment seeded once is reproducible.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SPLITS = ("train", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_source_domains(data, domains: Sequence[str], who: str) -> list[str]:
    """``domains`` as a list, refused with one line when empty or not all in ``data``."""
    domains = list(domains)
    if not domains:
        raise ValueError(f"{who} needs at least one source domain")
    unknown = [d for d in domains if d not in data.domains]
    if unknown:
        raise ValueError(f"unknown source domain(s) {unknown}; the dataset has {list(data.domains)}")
    return domains


def check_cell(source, domain: str, label: int, split: str) -> tuple[str, str, int]:
    """``(domain, split, label)`` of one cell of ``source`` (its ``domains`` and ``classes``), checked."""
    if domain not in source.domains:
        raise ValueError(f"unknown domain {domain!r}; available: {source.domains}")
    check_split(split)
    if not 0 <= int(label) < len(source.classes):
        raise ValueError(f"label {label} outside [0, {len(source.classes)})")
    return domain, split, int(label)


def draw_indices(available: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` indices into a cell of ``available`` images, as an int64 CPU tensor.

    Without replacement while the cell is large enough. When it is not, whole shuffled passes
    over the cell are concatenated and topped up from one more shuffle, so every image is used
    ``n // available`` or ``n // available + 1`` times (a balanced draw with replacement)
    instead of the uneven counts of i.i.d. sampling.
    """
    if n < 0:
        raise ValueError(f"cannot draw a negative number of images ({n})")
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    if available <= 0:
        raise ValueError("cannot draw from an empty class (0 images)")
    device = generator.device if generator is not None else torch.device("cpu")
    passes = [torch.randperm(available, generator=generator, device=device)
              for _ in range(-(-n // available))]
    return torch.cat(passes)[:n].cpu()


def sample_domain_batches(data, domains: Sequence[str], label: int, n_per_domain: int,
                          generator: torch.Generator | None = None, split: str = "train") -> torch.Tensor:
    """Real batches of class ``label``, one per domain, stacked to ``[D, n, C, H, W]``.

    This is what the DM loop calls each iteration for each class; sizes are equal across
    domains by construction (``real_batch`` tops up small classes by resampling).
    """
    if len(domains) == 0:
        raise ValueError("sample_domain_batches needs at least one domain")
    batches = [data.real_batch(d, label, n_per_domain, generator=generator, split=split) for d in domains]
    shapes = {tuple(b.shape) for b in batches}
    if len(shapes) != 1:  # a data source broke the protocol; fail here rather than in torch.stack
        raise RuntimeError(f"real_batch returned different shapes across domains: {sorted(shapes)}")
    return torch.stack(batches)


def sample_class_balanced(data, domain: str, n_per_class: int, generator: torch.Generator | None = None,
                          split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of every class of one domain: ``(images [K*n,C,H,W], labels [K*n])``.

    Useful for class-balanced initialisation of the synthetic set and for quick evaluations.
    """
    images = [data.real_batch(domain, c, n_per_class, generator=generator, split=split)
              for c in range(len(data.classes))]
    labels = torch.arange(len(data.classes)).repeat_interleave(n_per_class)
    return torch.cat(images), labels


def iter_uint8_split(source, domains, split: str, batch_size: int):
    """``(images, labels)`` of ``split`` in batches of at most ``batch_size``, class by class, for a
    source that stores uint8 cells (``count``, ``uint8_images``, ``normalize_pixels``)."""
    for d in domains:
        for c in range(len(source.classes)):
            n = source.count(d, c, split)
            for start in range(0, n, batch_size):
                index = np.arange(start, min(n, start + batch_size))
                yield (source.normalize_pixels(source.uint8_images(d, c, index, split)),
                       torch.full((len(index),), c, dtype=torch.long))
