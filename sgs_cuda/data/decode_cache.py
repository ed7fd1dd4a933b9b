"""Decode image files once into a uint8 memory-mapped cache: the decode path of every folder source.

A *group* is a list of image files (in practice one class folder of one domain or split). Each
group is decoded once, in parallel threads (PIL releases the GIL while decoding), resized to a
square of side ``resolution`` and stored as one cache entry::

    <cache_dir>/decoded/v1/<key>/images.npy   # [n, 3, r, r] uint8, a plain .npy file
    <cache_dir>/decoded/v1/<key>/meta.json    # settings, count, the unreadable files and why

``key`` hashes the settings and every file's path, size and mtime, so a touched, added or removed
file (or another resolution or crop) gives a new entry, and an entry never changes once written.
An entry is written in a temporary folder, fsync'ed, and renamed into place only when complete:
a build killed at any point leaves no entry that looks valid, and the temporary folders of dead
builds are removed by the next build. Unreadable files are skipped (their rows stay zero and are
never handed out) and reported all at once, before any training starts.

Images stored inside files (IDX, MATLAB ``.mat``, libsvm text) are entries too
(:meth:`DecodeCache.build_array`), keyed by those files, with their labels in ``meta.json``.

Reads map the file for the duration of one batch only, so a process holds the batches it asked
for, never the data set (``np.load(path, mmap_mode="r")`` opens an entry for inspection).
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import secrets
import shutil
import socket
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
from numpy.lib import format as npy_format

DECODE_VERSION = 1  # bump when decode_image changes its output
STALE_SECONDS = 7 * 24 * 3600  # another host's temporary folder this old is debris of a dead build
CROPS = ("center", "squash")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGS_CACHE_DIR") or Path.home() / ".cache" / "sgs_cuda").expanduser()


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an ``.npz`` to a temporary file in the same folder, fsync, then rename: readers never
    see half a file, and a power cut cannot leave an empty one under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared data, not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def decode_image(path, resolution: int, crop: str = "center") -> np.ndarray:
    """Decode ``path`` to a uint8 ``[3, r, r]`` RGB array.

    ``crop="center"``: the centred square of side ``min(w, h)`` is resized to ``r`` (the same as
    resizing the shorter side to ``r`` and centre-cropping, in one resampling step).
    ``crop="squash"``: the whole image is resized to ``r x r`` (DomainBed's test transform, and in
    effect what the MTT code does with ``Resize((128, 128))``).
    Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    from PIL import Image

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    resolution = int(resolution)
    try:
        with Image.open(path) as img:
            img.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale (shorter side >= r)
            if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit greyscale: PIL would clip to 255
                img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
            img = img.convert("RGB")
            w, h = img.size
            m = min(w, h) if crop == "center" else None
            box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2) if m else (0, 0, w, h)
            img = img.resize((resolution, resolution), Image.BILINEAR, box=box, reducing_gap=2.0)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files (OSError, SyntaxError, bombs ...)
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_rgb_square(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 ``[n, h, w]`` (grey) or ``[n, h, w, 3]`` images -> uint8 ``[n, 3, r, r]`` RGB: what
    :func:`decode_image` gives for a file, for images that come out of a container (IDX, .mat ...).
    Grey is repeated over the channels; a size other than ``r x r`` is resized bilinearly by PIL."""
    from PIL import Image

    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected [n, h, w] or [n, h, w, 3] images, got {list(images.shape)}")
    if images.shape[1:3] != (resolution, resolution):
        images = np.stack([np.asarray(Image.fromarray(x).resize((resolution, resolution), Image.BILINEAR))
                           for x in images]) if len(images) else np.empty((0, resolution, resolution, 3), np.uint8)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


@dataclass(frozen=True, eq=False)
class DecodedGroup:
    """One cache entry: the decoded images of ``files``, row ``i`` holding ``files[i]``."""
    path: Path  # the images.npy file
    key: str
    files: tuple[str, ...]
    resolution: int
    offset: int  # bytes of the .npy header
    bad: dict[int, str] = field(default_factory=dict)  # row -> why it could not be decoded

    @property
    def good_rows(self) -> np.ndarray:
        """The rows that hold an image, in file order."""
        ok = np.ones(len(self.files), dtype=bool)
        ok[list(self.bad)] = False
        return np.flatnonzero(ok)

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        return [(self.files[i], self.bad[i]) for i in sorted(self.bad)]

    def read(self, rows) -> np.ndarray:
        """uint8 ``[len(rows), 3, r, r]`` (a copy); the file is mapped only during the call."""
        rows = np.asarray(rows, dtype=np.int64)
        shape = (len(self.files), 3, self.resolution, self.resolution)
        if rows.size == 0:
            return np.empty((0, *shape[1:]), dtype=np.uint8)
        if rows.min() < 0 or rows.max() >= len(self.files):
            raise IndexError(f"rows outside [0, {len(self.files)}) for {self.path}")
        count = int(np.prod(shape))
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                images = np.frombuffer(mapped, dtype=np.uint8, count=count, offset=self.offset).reshape(shape)
                out = images[rows]  # fancy indexing copies
                del images  # release the buffer so the map can close: unmapped at once, RSS stays bounded
        except (OSError, ValueError) as e:
            raise RuntimeError(f"decode cache entry {self.path} cannot be read any more ({e}): was the cache "
                               f"deleted while running? Run again to rebuild it") from e
        return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(key: str) -> str:
    """``.tmp-<key>.<host>.<pid>.<random>``: which live process owns it can be told (shared caches too)."""
    host = "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname()) or "host"
    return f".tmp-{key}.{host}.{os.getpid()}.{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class _EntryWriter:
    """Writes one entry in a temporary folder; ``commit`` renames it into place when complete."""

    def __init__(self, root: Path, key: str, files: Sequence[str], resolution: int, crop: str):
        self.root, self.key, self.files, self.resolution, self.crop = root, key, tuple(files), resolution, crop
        self.tmp = root / _temporary_name(key)
        self.row_bytes = 3 * resolution * resolution
        self.bad: dict[int, str] = {}
        self.remaining = len(self.files)
        self.fd = -1
        try:
            self.tmp.mkdir(parents=True)
            self.fd = os.open(self.tmp / "images.npy", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(os.dup(self.fd), "wb") as f:
                npy_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (len(self.files), 3, resolution, resolution)})
                self.offset = f.tell()
            size = self.offset + len(self.files) * self.row_bytes
            try:  # reserve the space now: a full disk fails here, not half-way through the group
                os.posix_fallocate(self.fd, 0, size)
            except (AttributeError, OSError) as e:
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise
                os.ftruncate(self.fd, size)  # file systems without fallocate
        except BaseException:
            self.abort()
            raise

    def put(self, row: int, image: np.ndarray | None, reason: str | None) -> None:
        if image is None:
            self.bad[row] = reason or "unreadable"
        else:
            data = image.tobytes()
            if os.pwrite(self.fd, data, self.offset + row * self.row_bytes) != len(data):
                raise OSError(errno.ENOSPC, "short write (disk full?)", str(self.tmp))
        self.remaining -= 1

    def commit(self, extra: Mapping | None = None) -> DecodedGroup:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        meta = {"version": DECODE_VERSION, "key": self.key, "resolution": self.resolution, "crop": self.crop,
                "count": len(self.files), "bad": {str(i): r for i, r in sorted(self.bad.items())},
                "bad_files": [self.files[i] for i in sorted(self.bad)], **(extra or {})}
        with open(self.tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        final = self.root / self.key
        try:
            os.rename(self.tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # another process finished the same entry first
        _fsync_dir(self.root)
        return DecodedGroup(final / "images.npy", self.key, self.files, self.resolution, self.offset, dict(self.bad))

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shutil.rmtree(self.tmp, ignore_errors=True)


class DecodeCache:
    """Decodes groups of image files once, into entries under ``<cache_dir>/decoded/v1``.

    Args:
        resolution: square side of the stored images.
        crop: ``"center"`` (shorter side to ``resolution``, centre crop) or ``"squash"``.
        cache_dir: default ``$SGS_CACHE_DIR``, else ``~/.cache/sgs_cuda``.
        num_workers: decoding threads (default: the CPU count).
        progress: show a tqdm progress bar while decoding.

    ``decoded`` counts the images this object has decoded (0 when everything came from the cache).
    """

    def __init__(self, resolution: int, crop: str = "center", cache_dir=None, num_workers: int | None = None,
                 progress: bool = True):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.resolution, self.crop, self.progress = int(resolution), crop, progress
        self.root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.root = self.root / "decoded" / f"v{DECODE_VERSION}"
        self.num_workers = max(1, int(num_workers if num_workers is not None else min(32, os.cpu_count() or 1)))
        self.decoded = 0

    # -- keys and entries ----------------------------------------------------------------
    def key(self, files: Sequence, tag: str = "") -> str:
        """Hash of the settings and each file's absolute path, size and mtime (and ``tag``)."""
        h = hashlib.sha256(json.dumps([DECODE_VERSION, self.resolution, self.crop, *([tag] if tag else [])]).encode())
        for f in files:
            st = os.stat(f)
            h.update(f"\0{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    def _open(self, key: str, files: tuple[str, ...]) -> DecodedGroup | None:
        """The complete entry for ``key``, or None (a damaged one is removed, with a warning)."""
        folder = self.root / key
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if not isinstance(meta, dict) or meta.get("key") != key or meta.get("count") != len(files) \
                    or meta.get("resolution") != self.resolution:
                raise ValueError("meta.json does not match the files it should describe")
            with open(folder / "images.npy", "rb") as f:
                version = npy_format.read_magic(f)
                read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
                if version not in read_header:
                    raise ValueError(f"images.npy has .npy format version {version}")
                shape, fortran, dtype = read_header[version](f)
                offset = f.tell()
            expected = (len(files), 3, self.resolution, self.resolution)
            if shape != expected or fortran or dtype != np.uint8:
                raise ValueError(f"images.npy holds {dtype}{list(shape)}, expected uint8{list(expected)}")
            size, want = os.path.getsize(folder / "images.npy"), offset + int(np.prod(expected))
            if size != want:
                raise ValueError(f"images.npy has {size} bytes, expected {want} (truncated?)")
            bad = {int(i): str(r) for i, r in meta.get("bad", {}).items()}
            if any(not 0 <= i < len(files) for i in bad):
                raise ValueError("meta.json lists unreadable rows outside the entry")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            warnings.warn(f"ignoring damaged decode cache entry {folder} ({e}); decoding its images again",
                          stacklevel=3)
            self._remove(folder)
            return None
        return DecodedGroup(folder / "images.npy", key, files, self.resolution, offset, bad)

    def _remove(self, folder: Path) -> None:
        trash = folder.with_name(_temporary_name(folder.name))
        try:
            os.rename(folder, trash)  # out of sight at once, then deleted
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporary folders that builds killed earlier left behind."""
        here = _temporary_name("x").split(".")[2]
        for entry in self.root.glob(".tmp-*"):
            parts = entry.name.split(".")
            if len(parts) != 5 or not parts[3].isdigit():
                continue  # not ours
            try:
                age = time.time() - entry.stat().st_mtime
            except OSError:
                continue
            mine = parts[2] == here
            if (mine and int(parts[3]) != os.getpid() and not _pid_alive(int(parts[3]))) or age > STALE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)

    @contextmanager
    def _lock(self):
        """One builder per cache folder at a time; a second process waits, then reuses the entries."""
        try:
            import fcntl
        except ImportError:  # not POSIX: concurrent builds may duplicate work, never corrupt entries
            yield
            return
        with open(self.root / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                warnings.warn(f"another process is decoding into {self.root}; waiting for it", stacklevel=4)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- building ------------------------------------------------------------------------
    def build(self, groups: Mapping[Hashable, Sequence], desc: str = "decoding") -> dict[Hashable, DecodedGroup]:
        """The entry of every group, decoding (all at once, in parallel) the groups not cached yet."""
        files = {name: tuple(str(f) for f in fs) for name, fs in groups.items()}
        keys = {name: self.key(fs) for name, fs in files.items()}
        found = {name: self._open(keys[name], fs) for name, fs in files.items()}
        if all(v is not None for v in found.values()):
            return found
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the decode cache folder {self.root}: {e.strerror or e} "
                          f"(set SGS_CACHE_DIR to a writable folder)") from e
        with self._lock():
            self._remove_stale_temporaries()
            for name in found:
                if found[name] is None:  # another process may have built it while we waited
                    found[name] = self._open(keys[name], files[name])
            todo = [(name, keys[name], files[name]) for name in files if found[name] is None]
            if todo:
                found.update(self._decode(todo, desc))
        return found

    def build_array(self, sources: Sequence, read: Callable[[], tuple[np.ndarray, np.ndarray]],
                    ) -> tuple[DecodedGroup, np.ndarray]:
        """The entry of images stored inside files (IDX, MATLAB .mat, libsvm text ...), and their labels.

        ``read()`` returns the uint8 images (``[n, h, w]`` or ``[n, h, w, 3]``) and labels ``[n]``
        of ``sources``; it is called only when no entry exists for them (keyed by their paths,
        sizes and mtimes, as files are). Row ``i`` is named ``"<first source>[i]"``. ``read``'s
        ``ValueError`` (an unreadable file) propagates.
        """
        sources = [str(f) for f in sources]
        key = self.key(sources, tag="array")
        try:
            meta = json.loads((self.root / key / "meta.json").read_text())
            count, labels = int(meta["count"]), np.asarray(meta["labels"], dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError):
            count, labels = -1, None
        if labels is not None and len(labels) == count:
            group = self._open(key, tuple(f"{sources[0]}[{i}]" for i in range(count)))
            if group is not None:
                return group, labels
        images, labels = read()
        images = to_rgb_square(images, self.resolution)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(images) != len(labels):
            raise ValueError(f"{sources[0]}: {len(images)} images but {len(labels)} labels")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._remove_stale_temporaries()
            self._check_space(len(images))
            writer = _EntryWriter(self.root, key, tuple(f"{sources[0]}[{i}]" for i in range(len(images))),
                                  self.resolution, self.crop)
            try:
                for i, image in enumerate(images):
                    writer.put(i, image, None)
                group = writer.commit({"labels": labels.tolist()})
            except BaseException:
                writer.abort()
                raise
        self.decoded += len(images)
        return group, labels

    def _check_space(self, n_images: int) -> None:
        need = n_images * 3 * self.resolution ** 2
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise OSError(errno.ENOSPC, f"decoding {n_images} images at {self.resolution}px needs "
                                        f"{need / 2**30:.2f} GiB under {self.root} but only {free / 2**30:.2f} GiB "
                                        f"are free: free space or set SGS_CACHE_DIR to another disk")

    def _decode_one(self, slot: int, row: int, path: str):
        try:
            return slot, row, decode_image(path, self.resolution, self.crop), None
        except ValueError as e:
            reason = str(e).split(": ", 1)[-1] if str(e).startswith("cannot decode image") else str(e)
            return slot, row, None, reason

    def _decode(self, todo: list[tuple[Hashable, str, tuple[str, ...]]], desc: str) -> dict[Hashable, DecodedGroup]:
        from tqdm.auto import tqdm

        total = sum(len(fs) for _, _, fs in todo)
        self._check_space(total)
        done: dict[Hashable, DecodedGroup] = {}
        writers: dict[int, _EntryWriter] = {}
        folders = f"{len(todo)} folder{'s' * (len(todo) > 1)}"
        bar = tqdm(total=total, unit="img", desc=f"{desc} ({folders}, {self.resolution}px)",
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sgs-decode")
        pending: set = set()
        window = 8 * self.num_workers  # bounded in flight: memory does not grow with the data set

        def finish(futures) -> None:
            for slot, row, image, reason in sorted((f.result() for f in futures), key=lambda r: r[:2]):
                writer = writers[slot]
                writer.put(row, image, reason)
                bar.update(1)
                if writer.remaining == 0:
                    done[todo[slot][0]] = writer.commit()
                    del writers[slot]

        try:
            for slot, (name, key, fs) in enumerate(todo):
                writers[slot] = _EntryWriter(self.root, key, fs, self.resolution, self.crop)
                if not fs:
                    done[name] = writers.pop(slot).commit()
                for row, path in enumerate(fs):
                    pending.add(pool.submit(self._decode_one, slot, row, path))
                    if len(pending) >= window:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        finish(finished)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                finish(finished)
        except BaseException as e:
            pool.shutdown(wait=True, cancel_futures=True)
            for writer in writers.values():
                writer.abort()
            if isinstance(e, OSError):  # decoding errors never get here (they mark the file bad)
                raise OSError(e.errno, f"cannot write the decode cache under {self.root}: {e.strerror or e}; "
                                       "nothing half-written was kept: free space, fix the permissions or set "
                                       "SGS_CACHE_DIR to another folder") from e
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
        self.decoded += total
        return done


def summarize_bad_files(bad: Sequence[tuple[str, str]], limit: int = 3) -> str:
    """One line about unreadable files: how many, and the first few with the reason."""
    shown = "; ".join(f"{p}: {r}" for p, r in bad[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"skipped {len(bad)} unreadable image file(s) ({shown}{more})"
