"""Multi-domain image folders in the DomainBed layout ``root/<domain>/<class>/<image>``.

PACS, VLCS, Office-Home, DomainNet, TerraIncognita and any tree arranged this way load through
:class:`ImageFolderDomains`. Construction decodes every file of the domains used once, in
parallel, into the memory-mapped cache of :mod:`sgs_cuda.data.decode_cache` (reused by later
runs), reporting all unreadable files at once; batches are then read from the cache, so a
collection larger than memory streams.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .cells import DecodedCells
from .decode_cache import DecodeCache

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RESOLUTION = 64


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(path: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(path)
                  if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)


def _canonical(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_folder(name: str, available: Sequence[str], what: str, where: Path) -> str:
    """The folder for ``name``: exact match, else a unique match ignoring case, spaces, ``_`` and
    ``-`` (Office-Home ships ``Real World`` while DomainBed names it ``Real_World``)."""
    if name in available:
        return name
    hits = [a for a in available if _canonical(a) == _canonical(name)]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"{what} {name!r} not found in {where}; available: {list(available)}")


class ImageFolderDomains(DecodedCells):
    """The protocol over ``root/<domain>/<class>/<image>``.

    Args:
        root: dataset root; each sub-folder is a domain, each of its sub-folders a class.
        domains: domains to use, in this order (default: the preset's, else all sub-folders).
        classes: class names in label order (default: the preset's, else the sorted union of the
            class folders); every class must have readable images in every domain.
        resolution: square side images are resized to (default: the preset's, else 64).
        test_fraction: share of each (domain, class) cell held out as the test split.
        seed: seed of the split; a cell's split depends only on (seed, domain, class) and its
            readable files, not on which other domains are loaded.
        preset: a :class:`~sgs_cuda.data.presets.Preset` or its name.
        mean, std: normalisation (ImageNet statistics by default, as for pretrained backbones).
        crop: ``"squash"`` (default: the whole image resized to a square, DomainBed's test
            transform) or ``"center"`` (shorter side resized, centre crop).
        cache_dir: decode cache root (default ``$SGS_CACHE_DIR``, else ``~/.cache/sgs_cuda``).
        num_workers: decoding threads (default: the CPU count).
        progress: show a progress bar while decoding.

    ``decode_count`` is the number of images this instance decoded (0 when the cache was reused);
    ``bad_files`` lists ``(path, reason)`` for every file that could not be decoded (skipped).
    """

    def __init__(self, root, domains: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                 resolution: int | None = None, test_fraction: float = 0.2, seed: int = 0, preset=None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 crop: str = "squash", cache_dir=None, num_workers: int | None = None, progress: bool = True):
        from .presets import get_preset

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {str(self.root)!r} does not exist or is not a directory")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        if self.preset is not None:
            domains = domains if domains is not None else self.preset.domains
            classes = classes if classes is not None else self.preset.classes
            resolution = resolution if resolution is not None else self.preset.resolution
        resolution = int(resolution if resolution is not None else DEFAULT_RESOLUTION)
        cache = DecodeCache(resolution, crop, cache_dir, num_workers, progress)
        self.test_fraction, self.seed = float(test_fraction), int(seed)

        available = _subdirs(self.root)
        if domains is None:
            domains = available
        domain_dirs = {d: self.root / resolve_folder(d, available, "domain", self.root) for d in domains}
        if not domain_dirs:
            raise ValueError(f"no images found under {self.root}: expected root/<domain>/<class>/<image>")

        class_dirs = {d: _subdirs(p) for d, p in domain_dirs.items()}
        if classes is None:
            classes = sorted(set().union(*class_dirs.values()))
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate class names in {classes}")

        files: dict[tuple[str, int], list[Path]] = {}
        for d, dpath in domain_dirs.items():
            for c, name in enumerate(classes):
                files[d, c] = self._class_files(dpath, class_dirs[d], name)
        if not any(files.values()):
            raise ValueError(f"no images found under {self.root} (layout root/<domain>/<class>/<image>, "
                             f"extensions {sorted(IMAGE_EXTENSIONS)})")
        for (d, c), fs in files.items():
            if not fs:
                raise ValueError(f"domain {d!r} has no images of class {classes[c]!r} "
                                 f"(missing or empty folder under {domain_dirs[d]})")

        groups = cache.build(files, desc=f"decoding {self.root.name}")
        self.decode_count = cache.decoded
        cells, bad = {}, []
        for (d, c), group in groups.items():
            bad += group.bad_files
            good = group.good_rows
            if len(good) == 0:
                raise ValueError(f"domain {d!r} has no readable images of class {classes[c]!r} "
                                 f"({len(group.files)} file(s), all unreadable: first {group.bad_files[0]})")
            train, test = self._split(d, classes[c], good)
            cells[d, "train", c], cells[d, "test", c] = (group, train), (group, test)
        super().__init__(list(domain_dirs), classes, resolution, mean, std, cells, bad)

    def _class_files(self, domain_dir: Path, folders: list[str], cls: str) -> list[Path]:
        """The image files of class ``cls`` in one domain (none when its folder is absent)."""
        try:
            return _image_files(domain_dir / resolve_folder(cls, folders, "class", domain_dir))
        except ValueError:
            return []

    def _split(self, domain: str, cls: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Seed from names, not positions, so adding a domain never reshuffles another one.
        key = zlib.crc32(f"{domain}\0{cls}".encode())
        order = np.random.default_rng([self.seed, key]).permutation(len(rows))
        n_test = min(int(round(self.test_fraction * len(rows))), len(rows) - 1)  # keep >= 1 train image
        return rows[np.sort(order[n_test:])], rows[np.sort(order[:n_test])]

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"(root={str(self.root)!r}, ", 1)
