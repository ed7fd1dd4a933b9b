"""Run-folder I/O: atomic, durable writes and loads that turn a damaged file into one clear line.

Every file of a run folder is written by :func:`atomic_write`: into ``.<name>.tmp<pid>`` next to
it, ``fsync``-ed, renamed over the final name, then the folder is ``fsync``-ed, so a kill or a
power cut leaves either the old file or the new one, never a torn or empty one. A failed write
removes its temporary file; :func:`clean_stale_temporaries` removes those of killed processes at
the next start. File-system failures (a run folder that is a file, a path under a file, a
read-only file system, a full disk) and damaged files raise :class:`RunFolderError`, whose
message is one line naming the path and what to do.
"""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

TMP_MARK = ".tmp"  # temporary names: ".<name>.tmp<pid>"
UNREADABLE = (errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR)  # the file system's fault, not the file's
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of a complete PNG


class RunFolderError(Exception):
    """A run-folder problem the user has to act on; ``str()`` is one line naming the file."""


def describe_os_error(exc: OSError, path) -> str:
    """One line for a failed write to ``path``: what went wrong and what to do."""
    path = Path(path)
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return (f"cannot write {path}: no space left on the device; free some space, then run again "
                "with --resume (finished work is kept)")
    if code == errno.EROFS:
        return f"cannot write {path}: the file system is read-only; choose a writable --run-dir"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied; choose a writable --run-dir"
    if code == errno.ENOTDIR:
        parent = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path.parent)
        return f"cannot write {path}: {parent} is a file, not a folder; choose another --run-dir"
    if code == errno.EEXIST or (code == errno.EISDIR and path.is_dir()):
        what = "a folder" if path.is_dir() else "a file"
        return f"cannot use {path}: it is {what} already; choose another --run-dir"
    return f"cannot write {path}: {exc.strerror or exc}"


def ensure_dir(path) -> Path:
    """``mkdir -p`` with one-line errors (a file in the way, a read-only or full file system)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a folder; choose another --run-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(describe_os_error(exc, path)) from exc
    return path


def check_writable_dir(path) -> None:
    """Fail early, without creating anything, when ``path`` cannot become a writable folder:
    it or a parent is a file, or the nearest existing parent is on a read-only file system."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise RunFolderError(f"the run folder {path} {where}, not a folder; choose another --run-dir")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): the first write will say
        return
    if read_only:
        raise RunFolderError(f"cannot write the run folder {path}: {existing} is on a read-only file system; "
                             "choose a writable --run-dir")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders: the rename is all we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Recorder:
    """A write-only file that remembers the first ``OSError`` of its writes: ``torch.save``
    replaces a failed write's ``ENOSPC`` by its own ``unexpected pos`` error."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` atomically and durably (see the module docstring).

    Whatever fails (the writer, the disk, an interrupt), the temporary file is removed and the
    old ``path``, if any, is untouched; a failed write to the disk becomes a one-line
    :class:`RunFolderError`.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _Recorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = exc if isinstance(exc, OSError) else getattr(recorder, "error", None)
        if cause is not None:
            raise RunFolderError(describe_os_error(cause, path)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_torch(obj, path) -> Path:
    """``torch.save`` atomically (to a file object, so a full disk is an ``OSError``, not
    torch's ``unexpected pos``)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def save_figure(fig, path) -> Path:
    """A matplotlib figure as a PNG, atomically."""
    buf = io.BytesIO()  # render first: a plotting error never touches the disk
    fig.savefig(buf, format="png")
    return write_bytes(path, buf.getvalue())


def clean_stale_temporaries(folder) -> list[Path]:
    """Remove ``.<name>.tmp<pid>`` files under ``folder`` left by killed or failed writes (a
    running process's own temporary files are left alone). Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.rglob(f".*{TMP_MARK}*"):
        pid = tmp.name.rpartition(TMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except (IsADirectoryError, PermissionError, FileNotFoundError):
            pass
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, not ours
    return True


# --- loads ----------------------------------------------------------------------------------

def _damaged(path: Path, exc: BaseException, hint: str) -> RunFolderError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(reason) > 120:
        reason = reason[:117] + "..."
    return RunFolderError(f"{path} is damaged ({reason}); {hint}")


def load_torch(path, hint: str):
    """``torch.load`` of a run-folder file (CPU); a damaged file raises one line with ``hint``."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in UNREADABLE:
            raise RunFolderError(f"cannot read {path}: {exc.strerror}") from exc
        raise _damaged(path, exc, hint) from exc  # a truncated file can give EINVAL
    except Exception as exc:  # truncated zip, bad pickle, EOF ...: torch raises many kinds
        raise _damaged(path, exc, hint) from exc


def load_json(path, hint: str, mapping: bool = True):
    """A JSON file of a run folder; damaged (or, with ``mapping``, not an object): one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RunFolderError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(path, exc, hint) from exc
    if mapping and not isinstance(data, dict):
        raise RunFolderError(f"{path} is damaged (it holds a {type(data).__name__}, not a mapping); {hint}")
    return data


def try_load_json(path, mapping: bool = True):
    """A derived JSON file, or None when it is missing or damaged (the caller rebuilds it)."""
    try:
        return load_json(path, "", mapping)
    except (FileNotFoundError, RunFolderError):
        return None


def is_complete_png(path) -> bool:
    """Whether ``path`` is a PNG with its end marker (cheap: 16 bytes read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < 16:
                return False
            f.seek(-8, os.SEEK_END)
            return head == PNG_SIGNATURE and f.read(8) == PNG_END
    except OSError:
        return False
