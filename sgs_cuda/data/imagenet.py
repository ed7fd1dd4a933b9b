"""ImageNet class subsets with out-of-distribution targets, decoded once into the memory-mapped cache.

Layouts read (``<wnid>`` is a WordNet id such as ``n01440764``):

- ImageNet: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (validation images sorted
  into class folders, as torchvision's ``ImageFolder`` expects).
- ImageNet-Sketch, ImageNet-R, ImageNet-A: ``<root>/<wnid>/*`` (a single wrapping folder such as
  ``sketch/`` is looked through). ImageNet-R and -A hold 200 classes each; the classes of the
  subset that a target lacks are listed in ``missing_classes[target]`` and that target is scored
  on the classes it has (its cells are empty, never filled with anything).
- ImageNet-V2: ``<root>/<i>/*`` with ``i`` in ``0..999`` the class index in the sorted order of
  the 1000 ImageNet-1k wnids (shipped as ``wnids/imagenet1k.txt``).

Class subsets: the six 10-class subsets of the dataset-distillation literature exactly as the MTT
code base defines them (GeorgeCazenavette/mtt-distillation, ``utils.py``, ``Config``: ImageNet-1k
class indices; labels follow the list order), ImageNet-100 (the CMC list, ``wnids/imagenet100.txt``),
or any list file with one wnid per line (``#`` comments and blank lines allowed).
"""
from __future__ import annotations

import os
import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .cells import DecodedCells
from .decode_cache import DecodeCache
from .folder import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, _image_files

# As in mtt-distillation utils.py (Config): ImageNet-1k class indices (sorted-wnid order), in MTT's label order.
MTT_SUBSETS: dict[str, tuple[int, ...]] = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "imagemeow": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagesquawk": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    "imagefruit": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    "imageyellow": (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
}
LIST_SUBSETS = {"imagenet-100": "imagenet100.txt"}  # shipped list files
SUBSET_NAMES = (*MTT_SUBSETS, *LIST_SUBSETS)
TARGETS = {  # domain name -> layout of its folders
    "imagenet-sketch": "wnid", "imagenet-r": "wnid", "imagenet-a": "wnid", "imagenet-v2": "index"}
TARGET_OPTIONS = {"imagenet-sketch": "sketch_root", "imagenet-r": "r_root", "imagenet-a": "a_root",
                  "imagenet-v2": "v2_root"}
DEFAULT_RESOLUTION = 128
_WNID = re.compile(r"^n\d{8}$")


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def read_wnid_list(path) -> list[str]:
    """WordNet ids from a list file: one per line, ``#`` starts a comment, blank lines are skipped.

    Raises ``ValueError`` naming the file and line for anything that is not a wnid, or a repeat.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the class list {path}: {e}") from e
    return _parse_wnids(text, str(path))


def _parse_wnids(text: str, where: str) -> list[str]:
    wnids, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not _WNID.match(item):
            raise ValueError(f"{where}, line {number}: {item!r} is not a WordNet id (like n01440764)")
        if item in seen:
            raise ValueError(f"{where}, line {number}: {item} repeats line {seen[item]}")
        seen[item] = number
        wnids.append(item)
    if not wnids:
        raise ValueError(f"{where} lists no WordNet ids")
    return wnids


def _package_list(name: str) -> list[str]:
    text = resources.files(__package__).joinpath("wnids", name).read_text()
    return _parse_wnids(text, f"sgs_cuda/data/wnids/{name}")


@lru_cache(maxsize=1)
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids, sorted: position = class index (ImageNet-V2 folder name)."""
    wnids = tuple(_package_list("imagenet1k.txt"))
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):  # the shipped file is checked, not trusted
        raise RuntimeError("sgs_cuda/data/wnids/imagenet1k.txt is damaged: expected 1000 sorted WordNet ids")
    return wnids


def subset_wnids(classes) -> list[str]:
    """The wnids of a subset: a name in ``SUBSET_NAMES``, a list-file path, or wnids themselves."""
    if isinstance(classes, (str, os.PathLike)):
        name = str(classes)
        by_key = {_key(n): n for n in SUBSET_NAMES}
        if _key(name) in by_key and not Path(name).is_file():
            name = by_key[_key(name)]
            if name in MTT_SUBSETS:
                all_wnids = imagenet1k_wnids()
                return [all_wnids[i] for i in MTT_SUBSETS[name]]
            return _package_list(LIST_SUBSETS[name])
        if not Path(name).expanduser().is_file():
            raise ValueError(f"{name!r} is neither a known ImageNet subset {list(SUBSET_NAMES)} nor a class list file")
        wnids = read_wnid_list(name)
        where = name
    else:
        wnids = _parse_wnids("\n".join(map(str, classes)), "the class list")
        where = "the class list"
    unknown = sorted(set(wnids) - set(imagenet1k_wnids()))
    if unknown:
        raise ValueError(f"{where}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                         f"{'is' if len(unknown) == 1 else 'are'} not ImageNet-1k classes")
    return wnids


def _class_root(root: Path, names: set[str], what: str, layout: str) -> Path:
    """``root``, or the single folder it wraps, whichever holds folders named in ``names``."""
    here = root
    for _ in range(3):
        subdirs = [e for e in os.scandir(here) if e.is_dir() and not e.name.startswith(".")]
        if any(e.name in names for e in subdirs):
            return here
        if len(subdirs) != 1:
            break
        here = Path(subdirs[0].path)
    raise ValueError(f"{what} root {root} holds no class folders (expected {layout})")


def _checked_dir(path, option: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{option}={str(path)!r} does not exist or is not a directory")
    return path


class ImageNetSubset(DecodedCells):
    """A multi-domain view of an ImageNet class subset and its out-of-distribution targets.

    Domains: ``imagenet`` (train split = ImageNet train, test split = ImageNet val) followed by
    the targets given, in this order: ``imagenet-sketch``, ``imagenet-r``, ``imagenet-a``,
    ``imagenet-v2`` (test split only). Classes are wnids, labels follow the subset's order.

    Args:
        root: the ImageNet folder holding ``train/`` and ``val/``.
        classes: a subset name (``imagenette``, ``imagewoof``, ``imagefruit``, ``imagemeow``,
            ``imagesquawk``, ``imageyellow``, ``imagenet-100``), a list-file path, or wnids.
        resolution: stored square side (128 by default; 64 and 256 work the same way).
        crop: ``"center"`` (shorter side resized, centre crop; default) or ``"squash"``.
        sketch_root, r_root, a_root, v2_root: the ImageNet-Sketch, -R, -A, -V2 folders (optional).
        train_per_class: keep only this many training images per class (seeded choice; all by default).
        seed: seed of that choice.
        mean, std: normalisation (ImageNet statistics by default).
        cache_dir, num_workers, progress: as for :class:`~sgs_cuda.data.decode_cache.DecodeCache`.

    Besides the protocol: ``train_domains`` (``["imagenet"]``: the only domain with a train
    split), ``target_domains`` (the OOD targets present), ``missing_classes[domain]`` (wnids of
    the subset that domain lacks: left out of its score), ``bad_files`` (unreadable files skipped),
    ``decode_count``, ``files``, ``uint8_images``, ``iter_split``, ``cache_key``.
    """

    def __init__(self, root, classes="imagenette", resolution: int = DEFAULT_RESOLUTION, crop: str = "center",
                 sketch_root=None, r_root=None, a_root=None, v2_root=None, train_per_class: int | None = None,
                 seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 cache_dir=None, num_workers: int | None = None, progress: bool = True):
        self.root = _checked_dir(root, "root (the ImageNet folder)")
        wnids = subset_wnids(classes)
        if train_per_class is not None and int(train_per_class) < 1:
            raise ValueError(f"train_per_class must be >= 1, got {train_per_class}")
        cache = DecodeCache(resolution, crop, cache_dir, num_workers, progress)

        groups: dict[tuple[str, str, int], list[Path]] = {}
        for split, folder in (("train", "train"), ("test", "val")):
            where = self.root / folder
            if not where.is_dir():
                raise FileNotFoundError(f"ImageNet root {self.root} has no {folder}/ folder "
                                        f"(expected {self.root}/train/<wnid>/ and {self.root}/val/<wnid>/)")
            lacking = [w for w in wnids if not (where / w).is_dir()]
            if lacking and split == "test" and any(Path(e).suffix.lower() in IMAGE_EXTENSIONS
                                                   for e in os.listdir(where)):
                raise ValueError(f"the ImageNet validation images in {where} are not sorted into <wnid>/ folders: "
                                 "sort them by class first (as torchvision's ImageFolder needs)")
            if lacking:
                raise ValueError(f"{where} lacks the class folder(s) {lacking[:5]}{' ...' if len(lacking) > 5 else ''}"
                                 f" of the subset ({len(lacking)} of {len(wnids)})")
            for c, w in enumerate(wnids):
                files = _image_files(where / w)
                if split == "train" and train_per_class is not None and len(files) > train_per_class:
                    pick = np.random.default_rng([seed, c]).choice(len(files), int(train_per_class), replace=False)
                    files = [files[i] for i in np.sort(pick)]
                if not files:
                    raise ValueError(f"{where / w} holds no images (extensions {sorted(IMAGE_EXTENSIONS)})")
                groups["imagenet", split, c] = files

        roots = {"imagenet-sketch": sketch_root, "imagenet-r": r_root, "imagenet-a": a_root, "imagenet-v2": v2_root}
        domains = ["imagenet"]
        for target, given in roots.items():
            if given is None:
                continue
            folders = self._target_folders(target, _checked_dir(given, TARGET_OPTIONS[target]), wnids)
            if not any(folders.values()):
                warnings.warn(f"{target} ({given}) has none of the {len(wnids)} classes of the subset: "
                              "it is left out of the domains", stacklevel=2)
                continue
            domains.append(target)
            groups.update({(target, "test", c): files for c, files in folders.items() if files})

        decoded = cache.build(groups, desc=f"decoding {self.root.name} subset")
        self.decode_count = cache.decoded
        cells = {key: (group, group.good_rows) for key, group in decoded.items()}
        for (d, split, c), (group, rows) in cells.items():
            if d == "imagenet" and len(rows) == 0:
                raise ValueError(f"no readable ImageNet {split} image of class {wnids[c]} "
                                 f"(all {len(group.files)} unreadable, first {group.bad_files[0]})")
        self.train_domains = ["imagenet"]
        self.target_domains = domains[1:]
        # A class is missing from a target when it has no folder there or only unreadable files.
        self.missing_classes: dict[str, list[str]] = {
            d: [w for c, w in enumerate(wnids) if (d, "test", c) not in cells or len(cells[d, "test", c][1]) == 0]
            for d in domains}
        for d in self.target_domains:
            lacking = self.missing_classes[d]
            if lacking:
                warnings.warn(f"{d} lacks {len(lacking)} of the {len(wnids)} classes ({', '.join(lacking[:5])}"
                              f"{' ...' if len(lacking) > 5 else ''}): it is scored on the other classes only; "
                              f"see missing_classes[{d!r}]", stacklevel=2)
        bad = [item for group in decoded.values() for item in group.bad_files]
        super().__init__(domains, wnids, resolution, mean, std, cells, bad)

    @staticmethod
    def _target_folders(target: str, root: Path, wnids: list[str]) -> dict[int, list[Path]]:
        """``{label: files}`` for the subset's classes in a target's folders (empty list: absent)."""
        all_wnids = imagenet1k_wnids()
        if TARGETS[target] == "index":  # ImageNet-V2: folder i holds ImageNet-1k class i (sorted wnids)
            index = {w: i for i, w in enumerate(all_wnids)}
            names = {w: str(index[w]) for w in wnids}
            base = _class_root(root, {str(i) for i in range(1000)}, target, "<root>/<i>/ folders, i = 0..999")
        else:
            names = {w: w for w in wnids}
            base = _class_root(root, set(all_wnids), target, "<root>/<wnid>/ folders")
        return {c: _image_files(base / names[w]) if (base / names[w]).is_dir() else [] for c, w in enumerate(wnids)}
