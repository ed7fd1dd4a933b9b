"""Multi-domain image folders in the DomainBed layout ``root/<domain>/<class>/<image>``.

PACS, VLCS, Office-Home, DomainNet, TerraIncognita and ImageNet subsets arranged this way all
load through :class:`ImageFolderDomains`. Only file names are scanned at construction; images
are decoded with PIL when a batch asks for them (with a bounded LRU cache of decoded uint8
images), so a collection larger than memory streams.
"""
from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .sampling import SPLITS, check_split, draw_indices

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


def decode_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode ``path`` to a uint8 ``[3, r, r]`` tensor (RGB, squashed to a square).

    Raises ``ValueError`` naming the file when PIL cannot read it, so a corrupt file deep in a
    large collection is found by name, not by a bare PIL traceback.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale, much faster
            if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit greyscale: PIL would clip to 255
                img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
            img = img.convert("RGB").resize((resolution, resolution), Image.BILINEAR, reducing_gap=2.0)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDomains:
    """The protocol over ``root/<domain>/<class>/<image>``.

    Args:
        root: dataset root; each sub-folder is a domain, each of its sub-folders a class.
        domains: domains to use, in this order (default: the preset's, else all sub-folders).
        classes: class names in label order (default: the preset's, else the sorted union of the
            class folders); every class must have images in every domain.
        resolution: square side images are resized to (default: the preset's, else 64).
        test_fraction: share of each (domain, class) cell held out as the test split.
        seed: seed of the split; a cell's split depends only on (seed, domain, class), not on
            which other domains are loaded.
        preset: a :class:`~sgs_cuda.data.presets.Preset` or its name.
        mean, std: normalisation (ImageNet statistics by default, as for pretrained backbones).
        cache_mb: memory budget of the LRU cache of decoded images (0 disables it).
        num_workers: threads decoding large requests (PIL releases the GIL while decoding).
    """

    def __init__(self, root, domains: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                 resolution: int | None = None, test_fraction: float = 0.2, seed: int = 0, preset=None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 cache_mb: float = 256.0, num_workers: int | None = None):
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
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.image_shape = (3, resolution, resolution)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.test_fraction, self.seed = float(test_fraction), int(seed)

        available = _subdirs(self.root)
        if domains is None:
            domains = available
        domain_dirs = {d: self.root / resolve_folder(d, available, "domain", self.root) for d in domains}
        if not domain_dirs:
            raise ValueError(f"no images found under {self.root}: expected root/<domain>/<class>/<image>")
        self.domains = list(domain_dirs)

        class_dirs = {d: _subdirs(p) for d, p in domain_dirs.items()}
        if classes is None:
            classes = sorted(set().union(*class_dirs.values()))
        self.classes = list(classes)
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")

        files: dict[tuple[str, int], list[Path]] = {}
        for d, dpath in domain_dirs.items():
            for c, name in enumerate(self.classes):
                try:
                    folder = resolve_folder(name, class_dirs[d], "class", dpath)
                except ValueError:
                    files[d, c] = []
                    continue
                files[d, c] = _image_files(dpath / folder)
        if not any(files.values()):
            raise ValueError(f"no images found under {self.root} (layout root/<domain>/<class>/<image>, "
                             f"extensions {sorted(IMAGE_EXTENSIONS)})")
        for (d, c), fs in files.items():
            if not fs:
                raise ValueError(f"domain {d!r} has no images of class {self.classes[c]!r} "
                                 f"(missing or empty folder under {domain_dirs[d]})")

        self._files: dict[tuple[str, str, int], list[Path]] = {}
        for (d, c), fs in files.items():
            train, test = self._split(d, self.classes[c], fs)
            self._files[d, "train", c], self._files[d, "test", c] = train, test

        self.decode_count = 0  # images decoded so far (cache misses); lets tests check laziness
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._cache_capacity = int(cache_mb * 2**20) // (3 * resolution * resolution)
        self._workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        self._m = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._s = torch.tensor(self.std).view(1, -1, 1, 1)

    def _split(self, domain: str, cls: str, files: list[Path]) -> tuple[list[Path], list[Path]]:
        # Seed from names, not positions, so adding a domain never reshuffles another one.
        key = zlib.crc32(f"{domain}\0{cls}".encode())
        order = np.random.default_rng([self.seed, key]).permutation(len(files))
        n_test = min(int(round(self.test_fraction * len(files))), len(files) - 1)  # keep >= 1 train image
        return [files[i] for i in sorted(order[n_test:])], [files[i] for i in sorted(order[:n_test])]

    # -- decoding --------------------------------------------------------------------------
    def _remember(self, path: Path, img: torch.Tensor) -> None:
        if self._cache_capacity > 0:
            self._cache[path] = img
            if len(self._cache) > self._cache_capacity:
                self._cache.popitem(last=False)  # least recently used

    def _load(self, path: Path) -> torch.Tensor:
        img = self._cache.get(path)
        if img is not None:
            self._cache.move_to_end(path)
            return img
        img = decode_image(path, self.resolution)
        self.decode_count += 1
        self._remember(path, img)
        return img

    def load_uint8(self, paths: Sequence[Path]) -> torch.Tensor:
        """Decode ``paths`` (through the cache) to a uint8 ``[n, 3, r, r]`` tensor."""
        if not paths:
            return torch.empty((0, *self.image_shape), dtype=torch.uint8)
        decoded: dict[Path, torch.Tensor] = {}
        missing = [p for p in dict.fromkeys(paths) if p not in self._cache]
        if self._workers > 1 and len(missing) >= 16:  # PIL releases the GIL while decoding
            with ThreadPoolExecutor(self._workers) as pool:
                decoded = dict(zip(missing, pool.map(lambda p: decode_image(p, self.resolution), missing)))
            self.decode_count += len(decoded)
            for p, img in decoded.items():
                self._remember(p, img)
        return torch.stack([decoded[p] if p in decoded else self._load(p) for p in paths])

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.to(torch.float32) / 255.0 - self._m) / self._s

    # -- protocol --------------------------------------------------------------------------
    def files(self, domain: str, label: int, split: str = "train") -> list[Path]:
        """The image paths of one (domain, class, split) cell, in a fixed order."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; available: {self.domains}")
        check_split(split)
        if not 0 <= int(label) < len(self.classes):
            raise ValueError(f"label {label} outside [0, {len(self.classes)})")
        return self._files[domain, split, int(label)]

    def count(self, domain: str, label: int, split: str = "train") -> int:
        return len(self.files(domain, label, split))

    def real_batch(self, domain: str, label: int, n: int, generator: torch.Generator | None = None,
                   split: str = "train") -> torch.Tensor:
        fs = self.files(domain, label, split)
        if not fs and n > 0:
            raise ValueError(f"domain {domain!r} has no {split} images of class {self.classes[int(label)]!r} "
                             f"(test_fraction={self.test_fraction})")
        idx = draw_indices(len(fs), n, generator).tolist()
        return self.normalize(self.load_uint8([fs[i] for i in idx]))

    def split_tensors(self, domains: Sequence[str], split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Decodes every image of the split: fine for evaluation sets, not for huge train splits."""
        paths, labels = [], []
        for d in domains:
            for c in range(len(self.classes)):
                fs = self.files(d, c, split)
                paths += fs
                labels += [c] * len(fs)
        return self.normalize(self.load_uint8(paths)), torch.tensor(labels, dtype=torch.long)

    def __repr__(self) -> str:
        n = {d: sum(len(self._files[d, s, c]) for s in SPLITS for c in range(len(self.classes))) for d in self.domains}
        return (f"ImageFolderDomains(root={str(self.root)!r}, domains={n}, classes={len(self.classes)}, "
                f"resolution={self.resolution})")
