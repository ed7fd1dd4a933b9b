"""The digit domains of the domain-generalisation literature, read from the files users download.

``digits`` has one domain per digit set found under its root, each read from its native release
(no conversion step):

=========  ==============================================================  =====================
domain     files under ``<root>/<domain>/``                                train / test
=========  ==============================================================  =====================
mnist      ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,       IDX (``.gz`` or not)
           ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
mnist_m    ``mnist_m_train/*.png`` + ``mnist_m_train_labels.txt``,          PNGs + label lists
           ``mnist_m_test/*.png`` + ``mnist_m_test_labels.txt``
svhn       ``train_32x32.mat``, ``test_32x32.mat``                          MATLAB v5 (scipy)
syn        ``synth_train_32x32.mat``, ``synth_test_32x32.mat``              MATLAB v5 (scipy)
usps       ``usps.bz2``, ``usps.t.bz2``                                     bz2 libsvm text
=========  ==============================================================  =====================

Dassl's Digits-DG layout, ``<root>/digits_dg/<domain>/{train,val}/<class>/`` (or
``<root>/<domain>/{train,val}/<class>/``), is used instead where present (``val`` is the test split).
Grey domains are expanded to RGB and everything is resized to ``resolution`` (32) and decoded once
into the cache of :mod:`sgs_cuda.data.decode_cache`.
"""
from __future__ import annotations

import bz2
import os
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .cells import DecodedCells
from .decode_cache import DecodeCache
from .folder import _image_files, _subdirs
from .idx import read_idx

DOMAINS = ("mnist", "mnist_m", "svhn", "syn", "usps")
CLASSES = tuple("0123456789")
MEAN = STD = (0.5, 0.5, 0.5)
# Folder names the releases unpack to (matched ignoring case and punctuation), and the native files.
FOLDERS = {"mnist": ("mnist", "MNIST/raw", "mnist/MNIST/raw"), "mnist_m": ("mnist_m",),
           "svhn": ("svhn",), "syn": ("syn", "synth", "syn_digits", "syndigits"), "usps": ("usps",)}
NATIVE = {
    "mnist": {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
    "mnist_m": {"train": ("mnist_m_train", "mnist_m_train_labels.txt"),
                "test": ("mnist_m_test", "mnist_m_test_labels.txt")},
    "svhn": {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
    "syn": {"train": ("synth_train_32x32.mat",), "test": ("synth_test_32x32.mat",)},
    "usps": {"train": ("usps.bz2",), "test": ("usps.t.bz2",)},
}
DASSL_SPLITS = {"train": "train", "test": "val"}


def _canonical(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _child(folder: Path, name: str) -> Path | None:
    """``folder/name``, the name matched ignoring case and punctuation (one level per ``/``)."""
    for part in name.split("/"):
        if not folder.is_dir():
            return None
        hit = next((folder / e for e in sorted(os.listdir(folder)) if _canonical(e) == _canonical(part)), None)
        if hit is None:
            return None
        folder = hit
    return folder


def _native_file(folder: Path, name: str) -> Path | None:
    """``folder/name``, or the ``.gz`` of an IDX file."""
    return next((p for p in (folder / name, folder / (name + ".gz")) if p.exists()), None)


# -- readers of the native formats: (uint8 images [n,h,w] or [n,h,w,3], labels [n]) -------------
def read_mnist(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images_path), read_idx(labels_path)
    if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{images_path}: expected uint8 images [n,h,w] and {len(x)} labels, "
                         f"got {x.dtype}{list(x.shape)} and {y.dtype}{list(y.shape)}")
    return x, y.astype(np.int64)


def read_svhn_mat(path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN / SYN ``*_32x32.mat``: ``X`` ``[32, 32, 3, N]``, ``y`` ``[N, 1]`` with 10 meaning 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
        x, y = mat["X"], mat["y"]
    except Exception as e:  # noqa: BLE001 - scipy raises many types for a damaged file
        raise ValueError(f"{path}: not a readable MATLAB file with X and y ({type(e).__name__}: {e})") from e
    if x.ndim != 4 or x.shape[2] != 3 or y.size != x.shape[3]:
        raise ValueError(f"{path}: expected X [32, 32, 3, N] and N labels, got X {list(x.shape)}, y {list(y.shape)}")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8), y.reshape(-1).astype(np.int64) % 10


def read_usps_libsvm(path) -> tuple[np.ndarray, np.ndarray]:
    """USPS from the LIBSVM site: bz2 text ``label idx:value ...``, labels 1..10 (digit + 1),
    256 values in [-1, 1] (16x16 grey)."""
    images, labels = [], []
    try:
        with bz2.open(path, "rt") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                label, *items = line.split()
                pixels = np.zeros(256, dtype=np.float32)
                for item in items:
                    i, v = item.split(":")
                    pixels[int(i) - 1] = float(v)
                labels.append(int(float(label)) - 1)
                images.append(pixels)
    except (OSError, EOFError, ValueError, IndexError) as e:
        where = f" line {n}" if "n" in locals() else ""
        raise ValueError(f"{path}{where}: not a readable bz2 libsvm file ({type(e).__name__}: {e})") from e
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels outside 1..10")
    x = ((np.stack(images) + 1.0) * 127.5).round().clip(0, 255) if images else np.zeros((0, 256))
    return x.astype(np.uint8).reshape(-1, 16, 16), y


def read_label_list(path, folder: Path) -> tuple[list[Path], np.ndarray]:
    """MNIST-M's ``mnist_m_*_labels.txt``: one ``<file name> <label>`` per line."""
    files, labels = [], []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the label list ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) > 9:
            raise ValueError(f"{path} line {n}: expected '<file name> <label 0-9>', got {line!r}")
        files.append(folder / parts[0])
        labels.append(int(parts[1]))
    return files, np.asarray(labels, dtype=np.int64)


class Digits(DecodedCells):
    """The digit domains found under ``root`` (see the module docstring for the files).

    Args:
        root: the folder holding ``mnist/``, ``mnist_m/``, ``svhn/``, ``syn/``, ``usps/`` (any of
            them) or ``digits_dg/``.
        domains: the domains to use, in this order (default: those of :data:`DOMAINS` found; a
            domain named here and not found is an error naming the files looked for).
        resolution: square side (32).
        train_per_class: keep only this many training images per class and domain (seeded).
        seed: seed of that choice.
        mean, std: normalisation (0.5 per channel).
        cache_dir, num_workers, progress: as for :class:`~sgs_cuda.data.decode_cache.DecodeCache`.

    ``missing_domains`` says, for each domain of :data:`DOMAINS` not found, the files looked for;
    ``bad_files`` lists the unreadable files skipped; ``decode_count`` the images decoded now.
    """

    def __init__(self, root, domains: Sequence[str] | None = None, resolution: int = 32,
                 train_per_class: int | None = None, seed: int = 0, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD, cache_dir=None, num_workers: int | None = None, progress: bool = True):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"digits root {str(self.root)!r} does not exist or is not a directory")
        unknown = [d for d in (domains or ()) if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown digits domain(s) {unknown}; known: {list(DOMAINS)}")
        if train_per_class is not None and int(train_per_class) < 1:
            raise ValueError(f"train_per_class must be >= 1, got {train_per_class}")
        cache = DecodeCache(resolution, "squash", cache_dir, num_workers, progress)
        cells, bad, missing = {}, [], {}
        for d in (domains or DOMAINS):
            found = self._load_domain(d, cache, bad)
            if isinstance(found, str):
                missing[d] = found
                continue
            for (split, c), (group, rows) in found.items():
                if split == "train" and train_per_class is not None and len(rows) > train_per_class:
                    # seeded by names, so a domain's choice does not depend on the other domains loaded
                    rng = np.random.default_rng([seed, zlib.crc32(f"{d}\0{c}".encode())])
                    rows = np.sort(rng.choice(rows, int(train_per_class), replace=False))
                cells[d, split, c] = (group, rows)
        self.missing_domains = missing
        self.decode_count = cache.decoded
        if domains is not None and missing:
            raise FileNotFoundError("; ".join(f"digits domain {d!r} not found: {why}" for d, why in missing.items()))
        present = [d for d in (domains or DOMAINS) if d not in missing]
        if not present:
            raise FileNotFoundError(f"no digit domain found under {self.root}: "
                                    + "; ".join(f"{d}: {why}" for d, why in missing.items()))
        if missing:
            warnings.warn(f"digits: domain(s) {', '.join(missing)} not found, left out ("
                          + "; ".join(f"{d}: {why}" for d, why in missing.items()) + ")", stacklevel=2)
        super().__init__(present, CLASSES, resolution, mean, std, cells, bad)

    # -- finding and reading one domain ----------------------------------------------------
    def _load_domain(self, domain: str, cache: DecodeCache, bad: list) -> dict | str:
        """``{(split, label): (group, rows)}``, or why the domain is missing (the files looked for)."""
        for base in (self.root / "digits_dg", self.root):
            folder = _child(base, domain)
            if folder is not None and _child(folder, "train") is not None:
                return self._load_dassl(domain, folder, cache, bad)
        native = NATIVE[domain]
        for name in FOLDERS[domain]:
            folder = _child(self.root, name)
            if folder is None:
                continue
            paths = {split: [_native_file(folder, n) for n in names] for split, names in native.items()}
            if any(all(paths[s]) for s in paths):
                return self._load_native(domain, paths, cache, bad)
        files = ", ".join(n + "[.gz]" * (domain == "mnist") for names in native.values() for n in names)
        return (f"no {' or '.join(f + '/' for f in FOLDERS[domain])} under {self.root} holding {files}, "
                f"nor digits_dg/{domain}/train/")

    def _load_native(self, domain: str, paths: dict, cache: DecodeCache, bad: list) -> dict | str:
        out = {}
        for split, files in paths.items():
            if not all(files):
                continue  # the other split alone
            try:
                if domain == "mnist_m":
                    groups = self._mnist_m_groups(files[0], files[1], bad)
                    built = cache.build({c: fs for c, fs in groups.items()}, desc=f"decoding {domain} {split}")
                    for c, group in built.items():
                        bad += group.bad_files
                        out[split, c] = (group, group.good_rows)
                    continue
                read = {"mnist": lambda: read_mnist(*files), "svhn": lambda: read_svhn_mat(files[0]),
                        "syn": lambda: read_svhn_mat(files[0]), "usps": lambda: read_usps_libsvm(files[0])}[domain]
                group, labels = cache.build_array(files, read)
            except ValueError as e:  # an unreadable file: reported, and its split skipped
                bad.append((str(files[0]), str(e).split(": ", 1)[-1]))
                continue
            for c in range(len(CLASSES)):
                out[split, c] = (group, np.flatnonzero(labels == c))
        return out or f"no readable file ({', '.join(str(p) for fs in paths.values() for p in fs if p)})"

    @staticmethod
    def _mnist_m_groups(folder: Path, labels_path: Path, bad: list) -> dict[int, list[Path]]:
        files, labels = read_label_list(labels_path, folder)
        groups: dict[int, list[Path]] = {c: [] for c in range(len(CLASSES))}
        for f, c in zip(files, labels):
            if f.is_file():
                groups[int(c)].append(f)
            else:
                bad.append((str(f), f"listed in {labels_path.name} but missing"))
        return groups

    def _load_dassl(self, domain: str, folder: Path, cache: DecodeCache, bad: list) -> dict:
        groups = {}
        for split, name in DASSL_SPLITS.items():
            split_dir = _child(folder, name)
            classes = _subdirs(split_dir) if split_dir is not None else []
            for c, cls in enumerate(CLASSES):
                groups[split, c] = _image_files(split_dir / cls) if cls in classes else []
        built = cache.build(groups, desc=f"decoding {domain}")
        out = {}
        for key, group in built.items():
            bad += group.bad_files
            out[key] = (group, group.good_rows)
        return out
