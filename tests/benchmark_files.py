"""Tiny copies of the benchmarks' downloads, written in their native formats by code independent of
the package's readers: IDX (gzipped), MNIST-M PNGs + label lists, SVHN / SYN MATLAB v5 ``.mat``
(scipy), USPS bz2 libsvm text, Dassl ``digits_dg`` folders, CORe50 ``core50_128x128`` folders and a
PACS tree. Every image of class ``c`` is one flat colour (``digit_value``, ``CORE50_COLOURS``), so
a loader's labels can be checked from the pixels."""
from __future__ import annotations

import bz2
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def digit_value(c: int) -> int:
    """The grey level every generated image of digit ``c`` has."""
    return 20 + 23 * c


def _idx(path: Path, array: np.ndarray) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data))


def _labels(per_class: int) -> np.ndarray:
    return np.repeat(np.arange(10), per_class)


def write_mnist(folder: Path, train=3, test=2) -> None:
    folder.mkdir(parents=True)
    for stem, n in (("train", train), ("t10k", test)):
        y = _labels(n).astype(np.uint8)
        _idx(folder / f"{stem}-images-idx3-ubyte.gz", np.stack([np.full((28, 28), digit_value(c), np.uint8) for c in y]))
        _idx(folder / f"{stem}-labels-idx1-ubyte.gz", y)


def write_mnist_m(folder: Path, train=3, test=2) -> None:
    for split, n in (("train", train), ("test", test)):
        images = folder / f"mnist_m_{split}"
        images.mkdir(parents=True)
        lines = []
        for i, c in enumerate(_labels(n)):
            name = f"{i:08d}.png"
            Image.new("RGB", (32, 32), (digit_value(c),) * 3).save(images / name)
            lines.append(f"{name} {c}")
        (folder / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines) + "\n")


def write_svhn_mat(path: Path, n: int) -> None:
    """MATLAB v5: X [32, 32, 3, N] uint8, y [N, 1] with 10 for the digit 0 (as SVHN ships it)."""
    y = _labels(n)
    x = np.stack([np.full((32, 32, 3), digit_value(c), np.uint8) for c in y], axis=-1)
    savemat(path, {"X": x, "y": np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)}, format="5")


def write_usps(path: Path, n: int) -> None:
    """LIBSVM: ``label idx:value`` (1-based), labels 1..10 = digit + 1, values in [-1, 1]."""
    lines = []
    for c in _labels(n):
        v = digit_value(c) / 127.5 - 1.0
        lines.append(f"{c + 1} " + " ".join(f"{i}:{v:.6f}" for i in range(1, 257)))
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))


def make_digits(root: Path, train=3, test=2) -> Path:
    """``root/{mnist, mnist_m, svhn, syn, usps}`` in the native releases' file names."""
    write_mnist(root / "mnist", train, test)
    write_mnist_m(root / "mnist_m", train, test)
    for folder, prefix in (("svhn", ""), ("syn", "synth_")):
        (root / folder).mkdir(parents=True)
        write_svhn_mat(root / folder / f"{prefix}train_32x32.mat", train)
        write_svhn_mat(root / folder / f"{prefix}test_32x32.mat", test)
    (root / "usps").mkdir(parents=True)
    write_usps(root / "usps" / "usps.bz2", train)
    write_usps(root / "usps" / "usps.t.bz2", test)
    return root


def make_dassl_digits(root: Path, domains=("mnist", "mnist_m", "svhn", "syn"), train=3, val=2) -> Path:
    """Dassl's ``digits_dg/<domain>/{train,val}/<class>/*.png``."""
    for d in domains:
        for split, n in (("train", train), ("val", val)):
            for c in range(10):
                folder = root / "digits_dg" / d / split / str(c)
                folder.mkdir(parents=True)
                for i in range(n):
                    Image.new("RGB", (32, 32), (digit_value(c),) * 3).save(folder / f"{i}.png")
    return root


CORE50_COLOURS = [(25 * k + 10, 200 - 15 * k, (80 * k) % 255) for k in range(10)]  # one per category


def make_core50(root: Path, frames=2) -> Path:
    """``root/core50_128x128/s1..s11/o1..o50/C_<s>_<o>_<f>.png`` (small frames, a colour per category)."""
    base = root / "core50_128x128"
    for s in range(1, 12):
        for o in range(1, 51):
            folder = base / f"s{s}" / f"o{o}"
            folder.mkdir(parents=True)
            for f in range(frames):
                Image.new("RGB", (16, 16), CORE50_COLOURS[(o - 1) // 5]).save(folder / f"C_{s:02d}_{o:02d}_{f:03d}.png")
    return root


def make_pacs(root: Path, per_class=3) -> Path:
    """``root/<domain>/<class>/*.jpg`` with PACS's domain and class folder names."""
    from sgs_cuda.data import PRESETS

    p = PRESETS["PACS"]
    for d in p.domains:
        for k, c in enumerate(p.classes):
            folder = root / d / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (24, 24), (30 * k, 255 - 30 * k, 40 * i)).save(folder / f"pic_{i:03d}.jpg")
    return root
