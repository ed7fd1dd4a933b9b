"""The embedded default benchmark: four style domains rendered from real Fashion-MNIST images.

PACS-like data (a few GB, licence-restricted) cannot ship with the project, but the DGDD setting
needs labelled source domains that share classes and differ in appearance. Fashion-MNIST is small,
freely installable (Debian's ``dataset-fashion-mnist``) and has 10 shape-defined classes, so each
garment is rendered in four styles — ``photo``, ``cartoon``, ``sketch``, ``painting`` (see
:mod:`sgs_cuda.data.styles`) — at 3x32x32. Every domain is rendered from its own, disjoint set of
source images, so no garment appears in two domains and leave-one-domain-out stays honest.

The build is deterministic in ``seed`` and cached on disk (``$SGS_CACHE_DIR`` or
``~/.cache/sgs_cuda``), keyed by every build parameter, a hash of the source files and
``BUILD_VERSION`` (bump it whenever the rendering changes).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import styles
from .decode_cache import default_cache_dir, save_npz_atomic
from .idx import read_idx
from .memory import InMemoryDomains

BUILD_VERSION = 1
IMAGE_SIZE = 32
CHUNK = 2048  # images rendered at once (bounded memory); fixed, since the random draws follow it
STYLE_DOMAINS = ("photo", "cartoon", "sketch", "painting")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SGS_FASHION_MNIST"


# -- finding and reading the source -----------------------------------------------------------
def _idx_files_in(directory: Path) -> dict[str, Path] | None:
    """The four IDX files (raw or ``.gz``) in ``directory`` or its torchvision ``FashionMNIST/raw``."""
    for d in (directory, directory / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in IDX_FILES.items():
            hit = next((d / n for n in (stem, stem + ".gz") if (d / n).is_file()), None)
            if hit is None:
                break
            found[key] = hit
        else:
            return found
    return None


def find_fashion_mnist(root=None, download_dir: Path | None = None) -> dict[str, Path]:
    """Locate the Fashion-MNIST IDX files.

    An explicit ``root`` must hold them (no silent fallback to other data). Otherwise tries
    ``$SGS_FASHION_MNIST``, then Debian's ``/usr/share/datasets/fashion-mnist``, then, only if
    torchvision is installed, downloads into ``download_dir``.
    """
    names = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
    if root is not None:
        found = _idx_files_in(Path(root).expanduser())
        if found is None:
            raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {str(root)!r} (need {names})")
        return found
    tried = []
    for label, cand in ((f"${ENV_VAR}", os.environ.get(ENV_VAR)), ("Debian package path", DEBIAN_PATH)):
        if cand:
            tried.append(f"{cand} ({label})")
            found = _idx_files_in(Path(cand).expanduser())
            if found is not None:
                return found
    try:
        import torchvision
    except ImportError:
        tried.append("torchvision download (torchvision not installed)")
    else:
        target = Path(download_dir or default_cache_dir()) / "torchvision"
        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            tried.append(f"torchvision download into {target} ({type(e).__name__}: {e})")
        else:
            found = _idx_files_in(target)
            if found is not None:
                return found
            tried.append(f"torchvision download into {target} (files not where expected)")
    raise FileNotFoundError(
        "Fashion-MNIST not found; tried: " + "; ".join(tried) + f". Install it with "
        f"'apt-get install dataset-fashion-mnist', or put {names} in a folder and pass root=<folder> "
        f"or set {ENV_VAR}=<folder>.")


def load_fashion_mnist(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """All 70k images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64, train first then test."""
    images, labels = [], []
    for split in ("train", "test"):
        x, y = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{files[f'{split}_images']}: expected uint8 images [n,H,W] and labels [n], "
                             f"got {x.dtype}{list(x.shape)} and {y.dtype}{list(y.shape)}")
        if y.size and (y.min() < 0 or y.max() >= len(FASHION_MNIST_CLASSES)):
            raise ValueError(f"{files[f'{split}_labels']}: labels outside 0..9")
        images.append(x)
        labels.append(y.astype(np.int64))
    if images[0].shape[1:] != images[1].shape[1:]:
        raise ValueError("Fashion-MNIST train and test images differ in size")
    return np.concatenate(images), np.concatenate(labels)


def partition_sources(labels: np.ndarray, n_domains: int, per_class_train: int, per_class_test: int,
                      seed: int) -> list[dict[str, np.ndarray]]:
    """Disjoint source indices: ``result[d][split]`` for each domain, sorted by class.

    Each class's images are shuffled once and cut into ``n_domains`` equal blocks; domain ``d``
    takes its train then test images from block ``d`` only, so no source image is shared.
    """
    rng = np.random.default_rng([seed, BUILD_VERSION, 0x5EED])
    parts = [{"train": [], "test": []} for _ in range(n_domains)]
    need = per_class_train + per_class_test
    for c in range(len(FASHION_MNIST_CLASSES)):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        block = len(idx) // n_domains
        if block < need:
            raise ValueError(f"class {c} ({FASHION_MNIST_CLASSES[c]}) has {len(idx)} images: at most {block} "
                             f"per domain, but per_class_train + per_class_test = {need}")
        for d in range(n_domains):
            own = idx[d * block:(d + 1) * block]
            parts[d]["train"].append(own[:per_class_train])
            parts[d]["test"].append(own[per_class_train:need])
    return [{s: np.concatenate(v) for s, v in p.items()} for p in parts]


# -- rendering --------------------------------------------------------------------------------
def render_domain(domain: str, garments: np.ndarray, seed: int, backgrounds: list[torch.Tensor]) -> np.ndarray:
    """Render uint8 ``[n, H, W]`` garments in one style to uint8 ``[n, 3, 32, 32]``."""
    d = STYLE_DOMAINS.index(domain)
    rng = np.random.default_rng([seed, BUILD_VERSION, 1 + d])
    out = np.empty((len(garments), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, len(garments), CHUNK):
            g = torch.from_numpy(garments[start:start + CHUNK]).float().unsqueeze(1) / 255.0
            g = F.interpolate(g, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
            if domain == "photo":
                rgb = styles.style_photo(g, rng, backgrounds)
            else:
                rgb = getattr(styles, f"style_{domain}")(g, rng)
            out[start:start + len(g)] = (rgb * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def build_styles(images: np.ndarray, labels: np.ndarray, per_class_train: int, per_class_test: int,
                 seed: int, backgrounds: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """All arrays of the benchmark, keyed ``"<domain>/<split>/<images|labels|source>"``."""
    arrays = {}
    parts = partition_sources(labels, len(STYLE_DOMAINS), per_class_train, per_class_test, seed)
    for domain, part in zip(STYLE_DOMAINS, parts):
        order = np.concatenate([part["train"], part["test"]])  # one render call: train and test alike
        rendered = render_domain(domain, images[order], seed, backgrounds)
        n_train = len(part["train"])
        for split, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
            arrays[f"{domain}/{split}/images"] = rendered[sl]
            arrays[f"{domain}/{split}/labels"] = labels[order[sl]]
            arrays[f"{domain}/{split}/source"] = order[sl]
    return arrays


# -- cache ------------------------------------------------------------------------------------
def _file_digest(paths: dict[str, Path]) -> str:
    h = hashlib.sha1()
    for key in sorted(paths):
        with open(paths[key], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class FashionMNISTStyles(InMemoryDomains):
    """Fashion-MNIST in four style domains (``photo``, ``cartoon``, ``sketch``, ``painting``), 3x32x32.

    Args:
        root: folder with the four IDX files (else ``$SGS_FASHION_MNIST``, Debian's path, torchvision).
        cache_dir: where built arrays are cached (default ``$SGS_CACHE_DIR`` or ``~/.cache/sgs_cuda``).
        per_class_train, per_class_test: images per class and domain in each split (at most 1750 together).
        seed: seeds the source partition and every style parameter.
        use_cache: read and write the on-disk cache.

    ``mean``/``std`` are the per-channel statistics of the pooled train split. After construction
    ``from_cache`` tells whether the cache was hit and ``cache_path`` where it lives;
    ``source_index[domain, split]`` gives each image's index into the 70k Fashion-MNIST images
    (train then test).
    """

    def __init__(self, root=None, cache_dir=None, per_class_train: int = 300, per_class_test: int = 100,
                 seed: int = 0, use_cache: bool = True):
        if per_class_train < 1 or per_class_test < 0:
            raise ValueError(f"need per_class_train >= 1 and per_class_test >= 0, "
                             f"got {per_class_train}, {per_class_test}")
        cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        files = find_fashion_mnist(root, download_dir=cache_dir)
        key = {"version": BUILD_VERSION, "per_class_train": per_class_train, "per_class_test": per_class_test,
               "seed": seed, "size": IMAGE_SIZE, "source": _file_digest(files),
               "backgrounds": list(styles.BACKGROUND_IMAGES), "skimage": _skimage_version()}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_path = cache_dir / "fmnist_styles" / f"fmnist_styles_v{BUILD_VERSION}_{digest}.npz"
        self.from_cache = False
        self.background_names: list[str] | None = None  # known only when built in this process
        arrays = self._read_cache() if use_cache else None
        if arrays is None:
            images, labels = load_fashion_mnist(files)
            backgrounds, self.background_names = styles.load_backgrounds()
            arrays = build_styles(images, labels, per_class_train, per_class_test, seed, backgrounds)
            if use_cache:
                try:
                    save_npz_atomic(self.cache_path, arrays)
                except OSError as e:  # a read-only home must not stop the experiment
                    warnings.warn(f"could not cache the Fashion-MNIST styles build at {self.cache_path}: {e}")
        self.source_index = {(d, s): torch.from_numpy(arrays[f"{d}/{s}/source"].astype(np.int64))
                             for d in STYLE_DOMAINS for s in ("train", "test")}
        cells = {d: {s: (torch.from_numpy(arrays[f"{d}/{s}/images"]),
                         torch.from_numpy(arrays[f"{d}/{s}/labels"].astype(np.int64)))
                     for s in ("train", "test")} for d in STYLE_DOMAINS}
        super().__init__(cells, FASHION_MNIST_CLASSES)
        self.seed, self.per_class_train, self.per_class_test = seed, per_class_train, per_class_test

    def _read_cache(self) -> dict[str, np.ndarray] | None:
        if not self.cache_path.is_file():
            return None
        try:
            with np.load(self.cache_path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated/foreign: rebuild
            warnings.warn(f"ignoring unreadable cache {self.cache_path}: {e}")
            return None
        expected = {f"{d}/{s}/{k}" for d in STYLE_DOMAINS for s in ("train", "test")
                    for k in ("images", "labels", "source")}
        if not expected <= arrays.keys():
            warnings.warn(f"ignoring incomplete cache {self.cache_path}")
            return None
        self.from_cache = True
        return arrays


def _skimage_version() -> str:
    import skimage  # lazy: slow to import

    return skimage.__version__
