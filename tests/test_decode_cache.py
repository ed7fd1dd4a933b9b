"""Tests of sgs_cuda.data.decode_cache: the decode-once, memory-mapped cache behind every folder source.

Real JPEG/PNG files written with PIL; a killed build is a real SIGKILL in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgs_cuda.data import ImageFolderDomains, decode_cache
from sgs_cuda.data.decode_cache import DecodeCache, decode_image
from sgs_cuda.data.sampling import draw_indices

REPO = Path(__file__).resolve().parents[1]


def noise_image(path: Path, size=(24, 18), seed=0, fmt=None) -> Path:
    """A random RGB image (every file different, so rows can be told apart)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def make_groups(root: Path, n_groups=3, per_group=5) -> dict[str, list[Path]]:
    groups = {}
    for g in range(n_groups):
        groups[f"g{g}"] = [noise_image(root / f"g{g}" / f"{i}.{'png' if i % 2 else 'jpg'}", seed=100 * g + i)
                           for i in range(per_group)]
    return groups


def test_decode_image_center_crop_and_squash(tmp_path):
    """A 40x20 image: red | green | blue bands of 10, 20, 10 columns."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:30] = (0, 255, 0)
    a[:, 30:] = (0, 0, 255)
    path = tmp_path / "bands.png"
    Image.fromarray(a).save(path)
    center = decode_image(path, 10, "center")
    assert center.shape == (3, 10, 10) and center.dtype == np.uint8
    inner = center[:, :, 1:-1]  # only the central square, green (the outer columns see the filter's tails)
    assert (inner[1] == 255).all() and (inner[[0, 2]] == 0).all() and center[1].min() > 200
    squash = decode_image(path, 8, "squash")
    assert squash.shape == (3, 8, 8) and squash[0, :, 0].min() > 200 and squash[2, :, -1].min() > 200
    # equals resizing the shorter side and centre-cropping, done in two steps by PIL
    photo = noise_image(tmp_path / "p.png", size=(60, 36), seed=3)
    with Image.open(photo) as img:
        img = img.resize((30, 18), Image.BILINEAR, reducing_gap=2.0)
        two_step = np.asarray(img.crop((6, 0, 24, 18))).transpose(2, 0, 1).astype(int)
    smooth = decode_image(photo, 18, "center").astype(int)
    assert np.abs(smooth - two_step).mean() < 12  # same geometry; differs only by one vs two resamplings
    with pytest.raises(ValueError, match="crop must be"):
        decode_image(path, 8, "fit")
    with pytest.raises(ValueError, match=r"cannot decode image .*nope\.jpg"):
        decode_image(tmp_path / "nope.jpg", 8)


def test_cache_reuse_and_invalidation(tmp_path):
    groups = make_groups(tmp_path / "img")
    cache = DecodeCache(12, cache_dir=tmp_path / "c", progress=False)
    first = cache.build(groups)
    assert cache.decoded == 15
    for name, files in groups.items():
        direct = np.stack([decode_image(f, 12) for f in files])
        assert np.array_equal(first[name].read(np.arange(5)), direct)  # rows = files, in order
        assert np.array_equal(np.load(first[name].path, mmap_mode="r"), direct)  # a plain .npy file
    again = DecodeCache(12, cache_dir=tmp_path / "c", progress=False)
    assert {n: g.key for n, g in again.build(groups).items()} == {n: g.key for n, g in first.items()}
    assert again.decoded == 0

    os.utime(groups["g1"][2], ns=(1, 10**18))  # touched: only that folder is decoded again
    touched = DecodeCache(12, cache_dir=tmp_path / "c", progress=False)
    out = touched.build(groups)
    assert touched.decoded == 5 and out["g1"].key != first["g1"].key and out["g0"].key == first["g0"].key
    noise_image(groups["g2"][0], seed=999)  # rewritten with other content
    rewritten = DecodeCache(12, cache_dir=tmp_path / "c", progress=False)
    out = rewritten.build(groups)
    assert rewritten.decoded == 5
    assert np.array_equal(out["g2"].read([0])[0], decode_image(groups["g2"][0], 12))
    for other in (DecodeCache(16, cache_dir=tmp_path / "c", progress=False),  # other settings: other entries
                  DecodeCache(12, crop="squash", cache_dir=tmp_path / "c", progress=False)):
        other.build(groups)
        assert other.decoded == 15
    extra = groups["g0"] + [noise_image(tmp_path / "img" / "g0" / "new.png", seed=7)]  # an added file
    assert DecodeCache(12, cache_dir=tmp_path / "c").key(extra) != first["g0"].key
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def test_damaged_entries_are_rebuilt(tmp_path):
    groups = make_groups(tmp_path / "img", n_groups=2)
    built = DecodeCache(8, cache_dir=tmp_path / "c", progress=False).build(groups)
    with open(built["g0"].path, "r+b") as f:  # truncated images
        f.truncate(os.path.getsize(built["g0"].path) - 10)
    (built["g1"].path.parent / "meta.json").write_text("[1, 2")  # damaged metadata
    cache = DecodeCache(8, cache_dir=tmp_path / "c", progress=False)
    with pytest.warns(UserWarning, match="damaged decode cache entry") as caught:
        out = cache.build(groups)
    assert len(caught) == 2 and cache.decoded == 10
    assert np.array_equal(out["g0"].read([4])[0], decode_image(groups["g0"][4], 8))


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    folder = tmp_path / "img"
    good = [noise_image(folder / f"{i}.jpg", seed=i) for i in range(3)]
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:200])
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "text.jpg"
    text.write_text("not an image")
    files = [good[0], truncated, good[1], empty, text, good[2]]
    group = DecodeCache(8, cache_dir=tmp_path / "c", progress=False).build({"g": files})["g"]
    assert [p for p, _ in group.bad_files] == [str(truncated), str(empty), str(text)]
    assert all(reason for _, reason in group.bad_files)
    assert group.good_rows.tolist() == [0, 2, 5]
    assert np.array_equal(group.read(group.good_rows), np.stack([decode_image(f, 8) for f in good]))
    reused = DecodeCache(8, cache_dir=tmp_path / "c", progress=False)
    assert reused.build({"g": files})["g"].bad_files == group.bad_files and reused.decoded == 0  # kept in meta.json


def test_killed_build_leaves_no_valid_looking_entry(tmp_path):
    """SIGKILL when the second folder is complete but not yet renamed into place: the first
    folder's entry is complete, the rest exist only as temporary folders; the next build removes
    the debris and decodes only what is missing."""
    groups = make_groups(tmp_path / "img")
    script = textwrap.dedent(f"""
        import os, signal
        from sgs_cuda.data import decode_cache
        real, calls = decode_cache._EntryWriter.commit, [0]
        def commit(self):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self)
        decode_cache._EntryWriter.commit = commit
        groups = {json.dumps({k: [str(f) for f in v] for k, v in groups.items()})}
        decode_cache.DecodeCache(10, cache_dir={str(tmp_path / "c")!r}, num_workers=1, progress=False).build(groups)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr
    root = tmp_path / "c" / "decoded" / f"v{decode_cache.DECODE_VERSION}"
    cache = DecodeCache(10, cache_dir=tmp_path / "c", num_workers=1, progress=False)
    entries = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    assert entries == [cache.key(groups["g0"])]
    assert list(root.glob(f".tmp-{cache.key(groups['g1'])}.*"))  # written in full, but never under its name
    out = cache.build(groups)
    assert cache.decoded == 10 and not list(root.glob(".tmp-*"))
    for name, files in groups.items():
        assert np.array_equal(out[name].read(np.arange(5)), np.stack([decode_image(f, 10) for f in files]))


def test_full_disk_is_refused_before_decoding(tmp_path, monkeypatch):
    groups = make_groups(tmp_path / "img", n_groups=1)
    monkeypatch.setattr(decode_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(OSError, match=r"needs 0\.00 GiB .* SGS_CACHE_DIR"):
        DecodeCache(64, cache_dir=tmp_path / "c", progress=False).build(groups)
    assert not list((tmp_path / "c").rglob("images.npy"))


def test_reads_unmap_the_file(tmp_path):
    """A batch is copied out and the map closed: the process never keeps the cache mapped."""
    group = DecodeCache(8, cache_dir=tmp_path / "c", progress=False).build(make_groups(tmp_path / "i", 1))["g0"]
    batch = group.read([4, 0, 4])
    assert np.array_equal(batch[0], batch[2]) and np.array_equal(batch[1], group.read([0])[0])
    if Path("/proc/self/maps").exists():
        assert str(group.path) not in Path("/proc/self/maps").read_text()
    with pytest.raises(IndexError):
        group.read([5])


def test_memory_map_batches_equal_direct_decoding_and_are_balanced(tmp_path):
    root = tmp_path / "tree"
    for d in ("dA", "dB"):
        for c in ("x", "y"):
            for i in range(4):
                noise_image(root / d / c / f"{i}.jpg", seed=hash((d, c, i)) % 10**6)
    data = ImageFolderDomains(root, resolution=8, test_fraction=0.25)
    files = data.files("dB", 1, "train")
    assert len(files) == 3
    g = torch.Generator().manual_seed(5)
    drawn = draw_indices(3, 8, torch.Generator().manual_seed(5))  # the same draw real_batch makes
    batch = data.real_batch("dB", 1, 8, generator=g)
    direct = data.normalize_pixels(torch.from_numpy(np.stack([decode_image(files[i], 8, "squash") for i in drawn])))
    assert torch.equal(batch, direct)
    counts = torch.bincount(drawn, minlength=3)
    assert counts.min() >= 2 and counts.max() <= 3  # balanced draws over the cell
    x, y = data.split_tensors(["dA", "dB"], "test")
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 1, 0, 1]
    streamed = list(data.iter_split(["dA", "dB"], "test", batch_size=1))
    assert torch.equal(torch.cat([b for b, _ in streamed]), x)


def test_write_failure_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    groups = make_groups(tmp_path / "img", n_groups=2)
    real_pwrite, calls = os.pwrite, [0]

    def failing_pwrite(fd, data, offset):  # the disk fills up after a few images
        calls[0] += 1
        if calls[0] > 6:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(decode_cache.os, "pwrite", failing_pwrite)
    with pytest.raises(OSError, match="cannot write the decode cache under .*No space left.*SGS_CACHE_DIR"):
        DecodeCache(8, cache_dir=tmp_path / "c", num_workers=1, progress=False).build(groups)
    root = tmp_path / "c" / "decoded" / f"v{decode_cache.DECODE_VERSION}"
    assert not list(root.glob(".tmp-*"))  # the unfinished folder is removed ...
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1  # ... the finished one is kept
