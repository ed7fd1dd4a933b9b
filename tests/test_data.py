"""Tests of sgs_cuda.data: folder loader, presets, sampling, IDX reader, the Fashion-MNIST styles
benchmark (on small generated IDX files) and pseudo-domains. Fast, and independent of any
dataset installed on the machine (one optional test uses Debian's Fashion-MNIST if present)."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgs_cuda.data import (PRESETS, FashionMNISTStyles, ImageFolderDomains, InMemoryDomains, MultiDomainDataset,
                           PseudoDomainDataset, assign_pseudo_domains, denormalize, load_dataset,
                           sample_class_balanced, sample_domain_batches, save_sample_grid)
from sgs_cuda.data import decode_cache
from sgs_cuda.data import fmnist_styles as fms
from sgs_cuda.data.idx import read_idx
from sgs_cuda.data.presets import Preset, get_preset
from sgs_cuda.data.sampling import draw_indices

# -- helpers ----------------------------------------------------------------------------------
CLASS_COLOURS = {"bird": (220, 30, 30), "cat": (30, 200, 40), "dog": (40, 60, 230)}


def make_tree(root: Path, domains=("dA", "dB"), classes=tuple(CLASS_COLOURS), per_class=5) -> Path:
    """root/<domain>/<class>/img<i>.<ext>: solid class colours (so labels can be checked), odd
    sizes, mixed PNG / JPEG / upper-case extensions, and a non-image file to be ignored."""
    for d in domains:
        for c in classes:
            folder = root / d / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = Image.new("RGB", (20 + i, 30), CLASS_COLOURS.get(c, (128, 128, 128)))
                if i == 0:
                    img.save(folder / f"img{i}.JPG", quality=95)
                else:
                    img.save(folder / f"img{i}.png")
            (folder / "notes.txt").write_text("not an image")
    return root


def write_idx_file(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Independent IDX writer (not the package's), so the reader is tested against the format."""
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_fashion_idx(folder: Path, per_class_train=10, per_class_test=4, gz=True, seed=0) -> Path:
    """Tiny Fashion-MNIST look-alike: one garment-like shape per class on black, 28x28."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            h, w = 8 + 2 * c, 22 - 2 * (c % 5)
            top, left = (28 - h) // 2, (28 - w) // 2
            images[i, top:top + h, left:left + w] = rng.integers(90, 255, (h, w))
        ext = ".gz" if gz else ""
        write_idx_file(folder / f"{split}-images-idx3-ubyte{ext}", images, gz)
        write_idx_file(folder / f"{split}-labels-idx1-ubyte{ext}", labels, gz)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache folder (never the user's)."""
    monkeypatch.setenv("SGS_CACHE_DIR", str(tmp_path / "sgs-cache"))


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "data")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return make_fashion_idx(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def styles_data(idx_dir, tmp_path_factory):
    return FashionMNISTStyles(root=idx_dir, cache_dir=tmp_path_factory.mktemp("cache"),
                              per_class_train=2, per_class_test=1)


# -- folder loader ----------------------------------------------------------------------------
def test_folder_shapes_labels_and_protocol(tree):
    data = ImageFolderDomains(tree, resolution=16, test_fraction=0.2)
    assert isinstance(data, MultiDomainDataset)
    assert data.domains == ["dA", "dB"] and data.classes == ["bird", "cat", "dog"]
    assert data.image_shape == (3, 16, 16)
    assert data.count("dA", 0, "train") == 4 and data.count("dA", 0, "test") == 1
    for d in data.domains:
        for label, name in enumerate(data.classes):
            x = data.real_batch(d, label, 3, generator=torch.Generator().manual_seed(0))
            assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
            rgb = denormalize(x, data.mean, data.std).mean(dim=(0, 2, 3)) * 255
            assert torch.allclose(rgb, torch.tensor(CLASS_COLOURS[name], dtype=torch.float32), atol=4)
    x, y = data.split_tensors(["dA", "dB"], "test")
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 1, 2, 0, 1, 2]
    x, y = data.split_tensors(["dB"], "train")
    assert len(x) == 12 and torch.bincount(y).tolist() == [4, 4, 4]


def test_folder_split_deterministic_disjoint_and_per_domain(tmp_path):
    root = make_tree(tmp_path / "d", per_class=10)
    a = ImageFolderDomains(root, seed=3, test_fraction=0.3)
    b = ImageFolderDomains(root, seed=3, test_fraction=0.3)
    only_b = ImageFolderDomains(root, domains=["dB"], seed=3, test_fraction=0.3)
    other = ImageFolderDomains(root, seed=4, test_fraction=0.3)
    changed = False
    for d in a.domains:
        for c in range(3):
            train, test = a.files(d, c, "train"), a.files(d, c, "test")
            assert train == b.files(d, c, "train") and test == b.files(d, c, "test")
            assert not set(train) & set(test) and len(set(train) | set(test)) == 10 and len(test) == 3
            changed |= test != other.files(d, c, "test")
            if d == "dB":  # a domain's split does not depend on which other domains are loaded
                assert test == only_b.files(d, c, "test")
    assert changed


def test_folder_decodes_once_into_the_cache(tree, monkeypatch):
    data = ImageFolderDomains(tree, resolution=8)
    assert data.decode_count == 2 * 3 * 5 and data.bad_files == []  # every file once, up front

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode_cache, "decode_image", no_decode)
    monkeypatch.setattr(Image, "open", no_decode)
    again = ImageFolderDomains(tree, resolution=8)  # a later run reuses the cache
    assert again.decode_count == 0
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(data.real_batch("dA", 1, 6, g1), again.real_batch("dA", 1, 6, g2))  # batches: no decoding


def test_folder_parallel_decoding_matches_serial(tmp_path):
    root = make_tree(tmp_path / "d", per_class=8)
    serial = ImageFolderDomains(root, resolution=8, num_workers=1, cache_dir=tmp_path / "c1")
    parallel = ImageFolderDomains(root, resolution=8, num_workers=3, cache_dir=tmp_path / "c2")
    assert serial.decode_count == parallel.decode_count == 48
    serial, parallel = serial.split_tensors(["dA", "dB"], "train"), parallel.split_tensors(["dA", "dB"], "train")
    assert len(serial[1]) >= 16 and torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


def test_folder_preset_order_resolution_and_fuzzy_names(tmp_path):
    root = make_tree(tmp_path / "d", domains=("Real World", "Art"))
    preset = Preset("toy", ("real_world", "art"), ("dog", "bird"), resolution=12)
    data = ImageFolderDomains(root, preset=preset)
    assert data.domains == ["real_world", "art"] and data.classes == ["dog", "bird"]
    assert data.image_shape == (3, 12, 12)
    rgb = denormalize(data.real_batch("art", 0, 2), data.mean, data.std).mean(dim=(0, 2, 3)) * 255
    assert torch.allclose(rgb, torch.tensor(CLASS_COLOURS["dog"], dtype=torch.float32), atol=4)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ImageFolderDomains(tmp_path / "no_such_dir")
    root = make_tree(tmp_path / "d")
    with pytest.raises(ValueError, match=r"domain 'nope' not found.*available: \['dA', 'dB'\]"):
        ImageFolderDomains(root, domains=["dA", "nope"])
    with pytest.raises(ValueError, match="test_fraction"):
        ImageFolderDomains(root, test_fraction=1.0)

    empty = tmp_path / "empty"
    (empty / "dA" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDomains(empty)


def test_folder_empty_or_missing_class(tmp_path):
    root = make_tree(tmp_path / "d")
    for f in (root / "dB" / "dog").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="domain 'dB' has no images of class 'dog'"):
        ImageFolderDomains(root)
    (root / "dB" / "dog").rmdir()
    with pytest.raises(ValueError, match="domain 'dB' has no images of class 'dog'"):
        ImageFolderDomains(root)


def test_folder_corrupt_image_skipped_and_listed(tree):
    bad = tree / "dA" / "cat" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*zz_broken\.png"):
        data = ImageFolderDomains(tree, test_fraction=0.0, resolution=8)
    assert [p for p, _ in data.bad_files] == [str(bad)] and data.bad_files[0][1]
    assert data.count("dA", 1, "train") == 5 and bad not in data.files("dA", 1, "train")
    assert data.split_tensors(["dA"], "train")[0].shape == (15, 3, 8, 8)
    for f in (tree / "dB" / "dog").iterdir():  # a class with no readable image at all is an error
        f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="domain 'dB' has no readable images of class 'dog'"):
        ImageFolderDomains(tree, resolution=8)


def test_hold_out_of_a_folder_source_reads_by_position(tmp_path, monkeypatch):
    """Training-domain validation on a folder source: the same split as the copying path, without
    copying the source's train split into memory."""
    from sgs_cuda.data.holdout import HeldOutPositions, hold_out

    data = ImageFolderDomains(make_tree(tmp_path / "d", per_class=9), resolution=8, test_fraction=0.2)

    class ProtocolOnly:  # the same source, seen through the protocol alone (the copying path)
        def __init__(self, base):
            self.base, self.domains, self.classes = base, base.domains, base.classes
            self.image_shape, self.mean, self.std = base.image_shape, base.mean, base.std

        def split_tensors(self, domains, split="test"):
            return self.base.split_tensors(domains, split)

    copied = hold_out(ProtocolOnly(data), ["dA", "dB"], fraction=0.3, seed=1)
    monkeypatch.setattr(data, "split_tensors", lambda *a, **k: pytest.fail("copied the train split"))
    view = hold_out(data, ["dA", "dB"], fraction=0.3, seed=1)
    assert isinstance(view, HeldOutPositions) and view.domains == ["dA", "dB"]
    for split in ("train", "test"):
        for d in ("dA", "dB"):
            x, y = view.split_tensors([d], split)
            cx, cy = copied.split_tensors([d], split)
            assert torch.equal(x, cx) and torch.equal(y, cy)
    assert [view.count("dA", c, "test") for c in range(3)] == [2, 2, 2]  # round(0.3 * 7)
    assert view.real_batch("dB", 2, 4, torch.Generator().manual_seed(0), split="test").shape == (4, 3, 8, 8)


# -- presets and load_dataset -----------------------------------------------------------------
def test_presets_and_load_dataset(tree, idx_dir, tmp_path):
    assert PRESETS["PACS"].domains == ("art_painting", "cartoon", "photo", "sketch")
    assert len(PRESETS["PACS"].classes) == 7 and PRESETS["PACS"].resolution == 64
    assert PRESETS["VLCS"].classes == ("bird", "car", "chair", "dog", "person")
    assert get_preset("office-home").name == "OfficeHome"
    assert get_preset("terra_incognita").domains[-1] == "location_100"
    data = load_dataset(str(tree), resolution=8)
    assert isinstance(data, ImageFolderDomains) and data.domains == ["dA", "dB"]
    assert load_dataset("imagefolder", root=tree).image_shape == (3, 64, 64)
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("PACS")
    with pytest.raises(FileNotFoundError, match="neither a known dataset"):
        load_dataset(str(tmp_path / "nothing_here"))
    with pytest.raises(ValueError, match="domain 'art_painting' not found"):
        load_dataset("pacs", root=tree)
    fm = load_dataset("fmnist-styles", root=idx_dir, cache_dir=tmp_path / "c", per_class_train=1, per_class_test=1)
    assert isinstance(fm, FashionMNISTStyles)
    pseudo = load_dataset(str(tree), resolution=8, pseudo_domains=2)
    assert pseudo.domains == ["pseudo0", "pseudo1"]


# -- sampling ---------------------------------------------------------------------------------
def test_draw_indices_balanced():
    g = torch.Generator().manual_seed(0)
    idx = draw_indices(10, 7, g)
    assert len(set(idx.tolist())) == 7  # without replacement while enough
    counts = torch.bincount(draw_indices(4, 10, g), minlength=4)
    assert counts.sum() == 10 and counts.min() >= 2 and counts.max() <= 3
    assert torch.equal(draw_indices(9, 5, torch.Generator().manual_seed(1)),
                       draw_indices(9, 5, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="empty class"):
        draw_indices(0, 3)


def test_sample_domain_batches_equal_sizes_and_balance(tree):
    data = ImageFolderDomains(tree, resolution=8, test_fraction=0.2)
    g = torch.Generator().manual_seed(0)
    batch = sample_domain_batches(data, data.domains, 2, 6, g)  # 6 > the 4 train images: resampled
    assert batch.shape == (2, 6, 3, 8, 8)
    rgb = denormalize(batch.flatten(0, 1), data.mean, data.std).mean(dim=(2, 3)) * 255
    assert torch.allclose(rgb, torch.tensor(CLASS_COLOURS["dog"], dtype=torch.float32).expand_as(rgb), atol=4)
    x, y = sample_class_balanced(data, "dB", 3, g)
    assert x.shape == (9, 3, 8, 8) and torch.bincount(y).tolist() == [3, 3, 3]


# -- IDX reader -------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx_file(tmp_path / "a", a, gz)), a)
    b = np.array([-5, 7, 1 << 20], dtype=np.int32)
    out = read_idx(write_idx_file(tmp_path / "b", b, gz))
    assert out.dtype == np.int32 and np.array_equal(out, b)


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    good = write_idx_file(tmp_path / "t", np.zeros((4, 4), np.uint8), gz=False)
    good.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match="IDX data has"):
        read_idx(good)
    (tmp_path / "g.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "g.gz")


# -- Fashion-MNIST styles ---------------------------------------------------------------------
def test_styles_shapes_labels_and_disjoint_sources(styles_data, idx_dir):
    data = styles_data
    assert isinstance(data, MultiDomainDataset)
    assert data.domains == ["photo", "cartoon", "sketch", "painting"] and len(data.classes) == 10
    assert data.image_shape == (3, 32, 32) and len(data.mean) == 3 and min(data.std) > 0
    _, all_labels = fms.load_fashion_mnist(fms.find_fashion_mnist(idx_dir))
    seen = []
    for d in data.domains:
        for split, n in (("train", 2), ("test", 1)):
            x, y = data.raw(d, split)
            assert x.dtype == torch.uint8 and x.shape == (10 * n, 3, 32, 32)
            assert torch.bincount(y, minlength=10).tolist() == [n] * 10
            src = data.source_index[d, split]
            assert torch.equal(torch.from_numpy(all_labels)[src], y)  # each image keeps its garment's class
            seen += src.tolist()
    assert len(seen) == len(set(seen))  # no source image is used twice, across domains and splits
    x = data.real_batch("sketch", 3, 5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32


def test_styles_deterministic_and_cached(idx_dir, tmp_path, monkeypatch):
    kw = dict(root=idx_dir, per_class_train=2, per_class_test=1)
    a = FashionMNISTStyles(cache_dir=tmp_path, **kw)
    b = FashionMNISTStyles(cache_dir=tmp_path / "other", use_cache=False, **kw)
    assert not a.from_cache and a.cache_path.is_file() and not (tmp_path / "other").exists()
    for d in a.domains:
        for s in ("train", "test"):
            assert torch.equal(a.raw(d, s)[0], b.raw(d, s)[0])
    assert list(tmp_path.rglob("*.tmp")) == []  # the atomic write left no temporaries

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt despite the cache")

    monkeypatch.setattr(fms, "build_styles", no_build)
    c = FashionMNISTStyles(cache_dir=tmp_path, **kw)
    assert c.from_cache and c.mean == a.mean and torch.equal(c.raw("photo", "train")[0], a.raw("photo", "train")[0])
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters: another key
        FashionMNISTStyles(cache_dir=tmp_path, seed=1, **kw)
    monkeypatch.undo()
    a.cache_path.write_bytes(b"garbage")  # a corrupt cache is rebuilt, with a warning
    with pytest.warns(UserWarning, match="unreadable cache"):
        d = FashionMNISTStyles(cache_dir=tmp_path, **kw)
    assert not d.from_cache and torch.equal(d.raw("cartoon", "test")[0], a.raw("cartoon", "test")[0])


def test_styles_domains_differ(styles_data):
    """Each domain has its own colour / brightness / high-frequency signature."""
    stats = {}
    for d in styles_data.domains:
        x = styles_data.raw(d, "train")[0].float() / 255
        saturation = (x.amax(1) - x.amin(1)).mean()
        brightness = x.mean()
        lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2]
               - x[..., 1:-1, 2:]).abs().mean()
        stats[d] = torch.stack([saturation, brightness, lap])
    assert stats["sketch"][0] < 0.08 and stats["sketch"][0] < min(stats[d][0] for d in stats if d != "sketch")
    assert stats["sketch"][1] > max(stats[d][1] for d in stats if d != "sketch")
    assert stats["cartoon"][0] > stats["photo"][0]
    names = list(stats)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            assert (stats[p] - stats[q]).abs().max() > 0.04, (p, q, stats[p], stats[q])


def test_styles_bad_parameters_and_missing_source(idx_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="per_class_train"):
        FashionMNISTStyles(root=idx_dir, cache_dir=tmp_path, per_class_train=0)
    with pytest.raises(ValueError, match="at most 3 per domain"):
        FashionMNISTStyles(root=idx_dir, cache_dir=tmp_path, per_class_train=3, per_class_test=1)
    with pytest.raises(FileNotFoundError, match="IDX files not found in"):
        FashionMNISTStyles(root=tmp_path / "nothing", cache_dir=tmp_path)
    monkeypatch.delenv(fms.ENV_VAR, raising=False)
    monkeypatch.setattr(fms, "DEBIAN_PATH", tmp_path / "not_installed")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails: no download attempt
    with pytest.raises(FileNotFoundError, match=r"not_installed.*apt-get install dataset-fashion-mnist"):
        FashionMNISTStyles(cache_dir=tmp_path)
    monkeypatch.setenv(fms.ENV_VAR, str(idx_dir))  # the environment variable is honoured
    assert fms.find_fashion_mnist()["train_images"].parent == idx_dir


def test_styles_raw_idx_files(tmp_path):
    raw = make_fashion_idx(tmp_path / "raw", per_class_train=3, per_class_test=1, gz=False)
    data = FashionMNISTStyles(root=raw, cache_dir=tmp_path / "c", per_class_train=1, per_class_test=0)
    assert data.raw("painting", "train")[0].shape == (10, 3, 32, 32) and data.raw("photo", "test")[0].shape[0] == 0


def test_save_sample_grid(styles_data, tmp_path):
    path = save_sample_grid(styles_data, tmp_path / "g" / "grid.png", per_domain=12)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


@pytest.mark.skipif(not (fms.DEBIAN_PATH / "train-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_styles_on_real_fashion_mnist(tmp_path):
    data = FashionMNISTStyles(root=fms.DEBIAN_PATH, cache_dir=tmp_path, per_class_train=3, per_class_test=1)
    x, y = data.split_tensors(data.domains, "test")
    assert x.shape == (40, 3, 32, 32) and torch.bincount(y).tolist() == [4] * 10


# -- pseudo-domains ---------------------------------------------------------------------------
def planted_casts(n_per=30, size=16, seed=0):
    """Three style clusters: the same kind of random content under red, green and blue casts."""
    g = torch.Generator().manual_seed(seed)
    casts = torch.tensor([[0.9, 0.3, 0.3], [0.3, 0.9, 0.3], [0.3, 0.3, 0.9]])
    content = torch.rand(3 * n_per, 1, size, size, generator=g)
    images = (casts.repeat_interleave(n_per, 0).view(-1, 3, 1, 1) * (0.6 + 0.4 * content)).clamp(0, 1)
    return images, torch.arange(3).repeat_interleave(n_per)


def purity(pred: torch.Tensor, truth: torch.Tensor) -> float:
    k = int(pred.max()) + 1
    return sum(torch.bincount(truth[pred == j]).max().item() for j in range(k) if (pred == j).any()) / len(pred)


def test_low_frequency_features_equal_the_fft_definition():
    """The partial DFT gives the central window of the centred fft2 (float64 reference), odd sizes
    and windows wider than the image included."""
    from sgs_cuda.data.pseudo_domains import low_frequency_features

    g = torch.Generator().manual_seed(0)
    for shape, window in (((5, 3, 16, 16), 8), ((4, 3, 17, 9), 8), ((3, 1, 5, 7), 8), ((2, 3, 64, 48), 6)):
        x = torch.rand(shape, generator=g)
        n, c, h, w = shape
        wh, ww = min(window, h), min(window, w)
        spec = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
        top, left = h // 2 - wh // 2, w // 2 - ww // 2
        ref = torch.log1p(spec[..., top:top + wh, left:left + ww].abs() / (h * w) * 100.0).reshape(n, -1)
        out = low_frequency_features(x, window)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)


def test_assign_pseudo_domains_recovers_planted_clusters():
    images, truth = planted_casts()
    perm = torch.randperm(len(truth), generator=torch.Generator().manual_seed(1))
    images, truth = images[perm], truth[perm]
    labels = assign_pseudo_domains(images, 3, seed=0)
    assert labels.shape == truth.shape and labels.dtype == torch.long
    assert purity(labels, truth) >= 0.95
    assert torch.equal(labels, assign_pseudo_domains(images, 3, seed=0))  # seeded
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normed = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert purity(assign_pseudo_domains(normed, 3, mean=mean, std=std), truth) >= 0.95
    with pytest.raises(ValueError, match="k must be"):
        assign_pseudo_domains(images[:2], 3)


def test_pseudo_domain_dataset_wraps_a_protocol_dataset():
    images, truth = planted_casts(n_per=40)
    x8 = (images * 255).round().to(torch.uint8)
    cls = torch.arange(len(truth)) % 2
    cells = {}
    for d in range(3):
        sel = torch.nonzero(truth == d).flatten()
        tr, te = sel[:30], sel[30:]
        cells[f"style{d}"] = {"train": (x8[tr], cls[tr]), "test": (x8[te], cls[te])}
    base = InMemoryDomains(cells, ["even", "odd"])
    data = PseudoDomainDataset(base, 3, seed=0)
    assert isinstance(data, MultiDomainDataset)
    assert data.domains == ["pseudo0", "pseudo1", "pseudo2"] and data.classes == ["even", "odd"]
    assert data.mean == base.mean and data.image_shape == (3, 16, 16)
    for split, n in (("train", 90), ("test", 30)):
        src = torch.cat([data.source_domain[d][split] for d in data.domains])
        pred = torch.cat([torch.full((len(data.source_domain[d][split]),), j) for j, d in enumerate(data.domains)])
        assert len(src) == n and purity(pred, src) >= 0.95
    x, y = data.split_tensors(data.domains, "train")
    ref, _ = base.split_tensors(base.domains, "train")
    assert torch.allclose(x.sum(0), ref.sum(0), atol=1e-3)  # the same images, only regrouped (uint8-exact)
    assert sample_domain_batches(data, data.domains, 1, 4, torch.Generator().manual_seed(0)).shape == (3, 4, 3, 16, 16)
    single = InMemoryDomains({"all": {"train": (x8, cls)}}, ["even", "odd"])  # no domain labels at all
    assert single.raw("all", "test")[0].shape == (0, 3, 16, 16)
    assert len(PseudoDomainDataset(single, 2).domains) == 2
