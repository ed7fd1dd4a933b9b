"""The ``digits`` dataset on generated files in every native format (IDX, MNIST-M PNG + label
list, SVHN / SYN .mat v5, USPS bz2 libsvm, Dassl folders): labels, shapes and value ranges,
unreadable files reported by name and skipped, missing domains reported, the decode-once cache
reused and invalidated."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from benchmark_files import digit_value, make_dassl_digits, make_digits
from sgs_cuda.data import load_dataset
from sgs_cuda.data.digits import DOMAINS, Digits, read_svhn_mat, read_usps_libsvm


@pytest.fixture
def root(tmp_path):
    return make_digits(tmp_path / "digits")


def load(root, tmp_path, **kw):
    return Digits(root, cache_dir=tmp_path / "cache", progress=False, **kw)


def assert_labels_match_pixels(data, domain, split, per_class):
    for c in range(10):
        assert data.count(domain, c, split) == per_class, (domain, split, c)
        x = data.uint8_images(domain, c, np.arange(per_class), split)
        assert x.shape == (per_class, 3, 32, 32)
        assert (x.int() - digit_value(c)).abs().max() <= 1, (domain, split, c)  # the class's grey level


def test_every_native_format_loads_with_the_right_labels(root, tmp_path):
    data = load_dataset("digits", root=root, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(data, Digits) and data.domains == list(DOMAINS) and not data.missing_domains
    assert data.classes == list("0123456789") and data.image_shape == (3, 32, 32) and not data.bad_files
    for d in DOMAINS:  # SVHN / SYN's 10 -> 0, USPS's 1..10 -> 0..9, grey MNIST / USPS -> RGB 32x32
        assert_labels_match_pixels(data, d, "train", 3)
        assert_labels_match_pixels(data, d, "test", 2)
    x = data.real_batch("usps", 4, 5)
    assert x.dtype.is_floating_point and x.shape == (5, 3, 32, 32)
    assert abs(float(x.mean()) - (digit_value(4) / 255 - 0.5) / 0.5) < 0.01  # normalised with 0.5 / 0.5
    images, labels = data.split_tensors(["svhn", "mnist"], "test")
    assert images.shape == (40, 3, 32, 32) and sorted(labels.tolist()) == sorted(list(range(10)) * 4)
    assert float(images.min()) >= -1 and float(images.max()) <= 1


def test_readers_of_the_container_formats(root):
    x, y = read_svhn_mat(root / "svhn" / "test_32x32.mat")
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.tolist() == np.repeat(np.arange(10), 2).tolist()
    x, y = read_usps_libsvm(root / "usps" / "usps.t.bz2")
    assert x.shape == (20, 16, 16) and y.tolist() == np.repeat(np.arange(10), 2).tolist()
    assert int(x[0, 0, 0]) == digit_value(0) and int(x[-1, 15, 15]) == digit_value(9)


def test_dassl_layout_is_used_where_present(tmp_path):
    root = make_dassl_digits(tmp_path / "dg", domains=("mnist", "svhn"))
    with pytest.warns(UserWarning, match="mnist_m, syn, usps not found"):
        data = load(root, tmp_path)
    assert data.domains == ["mnist", "svhn"] and set(data.missing_domains) == {"mnist_m", "syn", "usps"}
    assert "usps.bz2" in data.missing_domains["usps"] and "digits_dg/usps" in data.missing_domains["usps"]
    assert_labels_match_pixels(data, "svhn", "train", 3)
    assert_labels_match_pixels(data, "svhn", "test", 2)  # val/ is the test split


@pytest.mark.parametrize("name", ["svhn/train_32x32.mat", "mnist/train-images-idx3-ubyte.gz", "usps/usps.bz2"])
def test_a_truncated_container_is_reported_by_name_and_its_split_skipped(root, tmp_path, name):
    path = root / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable .*{path.name}"):
        data = load(root, tmp_path)
    domain = name.split("/")[0]
    assert [p for p, _ in data.bad_files] == [str(path)]
    assert domain in data.domains and data.count(domain, 0, "train") == 0
    assert_labels_match_pixels(data, domain, "test", 2)  # the readable split still loads


def test_a_broken_png_and_a_listed_missing_one_are_skipped(root, tmp_path):
    broken = root / "mnist_m" / "mnist_m_train" / "00000000.png"  # a "0"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "mnist_m" / "mnist_m_train" / "00000029.png").unlink()  # the last "9"
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = load(root, tmp_path)
    assert {p for p, _ in data.bad_files} == {str(broken), str(root / "mnist_m" / "mnist_m_train" / "00000029.png")}
    assert data.count("mnist_m", 0) == 2 and data.count("mnist_m", 9) == 2 and data.count("mnist_m", 5) == 3


def test_a_missing_domain_is_reported_with_the_files_looked_for(root, tmp_path):
    shutil.rmtree(root / "usps")
    with pytest.warns(UserWarning, match=r"domain\(s\) usps not found.*usps\.bz2, usps\.t\.bz2"):
        data = load(root, tmp_path)
    assert "usps" not in data.domains and "usps.t.bz2" in data.missing_domains["usps"]
    with pytest.raises(FileNotFoundError, match=r"digits domain 'usps' not found: .*usps\.bz2"):
        load(root, tmp_path, domains=["svhn", "usps"])
    with pytest.raises(FileNotFoundError, match="no digit domain found under .*train_32x32.mat"):
        load(tmp_path / "cache", tmp_path)  # a folder without any of the files
    with pytest.raises(ValueError, match="unknown digits domain"):
        load(root, tmp_path, domains=["mnist", "kmnist"])


def test_the_cache_is_reused_and_invalidated_when_a_file_changes(root, tmp_path):
    first = load(root, tmp_path)
    assert first.decode_count == 5 * 50
    again = load(root, tmp_path)
    assert again.decode_count == 0 and again.cache_key == first.cache_key
    mat = root / "svhn" / "test_32x32.mat"
    os.utime(mat, ns=(mat.stat().st_atime_ns, mat.stat().st_mtime_ns + 10**9))
    touched = load(root, tmp_path)
    assert touched.decode_count == 20 and touched.cache_key != first.cache_key  # only that file again
    assert_labels_match_pixels(touched, "svhn", "test", 2)


def test_options(root, tmp_path):
    data = load(root, tmp_path, domains=["usps", "svhn"], train_per_class=2, resolution=16)
    assert data.domains == ["usps", "svhn"] and data.image_shape == (3, 16, 16)
    assert data.count("usps", 3, "train") == 2 and data.count("usps", 3, "test") == 2
    alone = load(root, tmp_path, domains=["usps"], train_per_class=2, resolution=16)
    for c in range(10):  # the seeded choice of a domain does not depend on the other domains loaded
        assert alone.files("usps", c) == data.files("usps", c)
    assert str(data.files("usps", 3)[0]).startswith(str(root / "usps" / "usps.bz2") + "[")
