"""Building and loading the C++/CUDA extension, and choosing the backend.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into a cache
folder keyed by the sources, torch, Python and CPU, so a rebuild happens only when one of them
changes. A file lock (released by the OS if a process dies) makes concurrent first uses build
once. CUDA sources are compiled whenever torch has CUDA and nvcc is found, GPU or not, so a
kernel that does not build is caught on any machine. ``setup.py`` can build the same sources
ahead of time as ``sgs_cuda._C``.

``SGS_BACKEND=auto|torch|ext`` forces a choice: ``torch`` never builds, ``ext`` raises if the
extension cannot be used, ``auto`` (default) falls back to the torch reference with one warning.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

_PKG = Path(__file__).resolve().parent
CPP_SOURCES = ("bindings.cpp", "sgs_cpu.cpp")
CUDA_SOURCES = ("sgs_cuda.cu",)
HEADERS = ("sgs_math.h", "sgs_ops.h")
BACKENDS = ("auto", "torch", "ext")

# torch guesses CUDA_HOME from the nvcc on PATH; a /usr/local/bin/nvcc link would make it
# /usr/local, which lacks the CUDA headers. Point it at the toolkit unless the user chose one.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

_state: dict = {"loaded": None, "reason": "not loaded yet", "cuda": False, "build_dir": None,
                "warned": False}
_on_load: list[Callable[[], None]] = []


def source_dir() -> Path:
    """``csrc/`` of a source checkout, else the copy that ``setup.py`` installs in the package."""
    for candidate in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (candidate / CPP_SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"C++ sources not found in {_PKG.parent / 'csrc'} or {_PKG / '_csrc'}")


def cache_root() -> Path:
    if os.environ.get("SGS_CACHE_DIR"):
        return Path(os.environ["SGS_CACHE_DIR"]) / "extensions"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sgs_cuda" / "extensions"


def requested_backend() -> str:
    backend = os.environ.get("SGS_BACKEND", "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"SGS_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def cuda_build_possible() -> bool:
    """Torch has CUDA and nvcc is found (a GPU is not needed to compile). ``SGS_BUILD_CUDA=0``
    skips the CUDA sources, e.g. to save build time on a machine without a GPU."""
    from torch.utils import cpp_extension

    if os.environ.get("SGS_BUILD_CUDA", "auto") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and \
        (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists() and \
        (source_dir() / CUDA_SOURCES[0]).is_file()


def _cpu_tag() -> str:
    # -march=native code must not be reused on another CPU that shares the cache folder.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return platform.machine()


def build_key(with_cuda: bool) -> str:
    h = hashlib.sha256()
    src = source_dir()
    for name in CPP_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else ()):
        h.update(name.encode())
        h.update((src / name).read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{with_cuda}|{_cpu_tag()}".encode())
    h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    h.update(repr(compile_flags(with_cuda)).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def compile_flags(with_cuda: bool) -> dict:
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the plane loop runs serially.
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("SGS_NATIVE", "1") == "1":
        cflags.append("-march=native")
    flags = {"extra_cflags": cflags + (["-DSGS_WITH_CUDA"] if with_cuda else []), "extra_ldflags": ["-fopenmp"]}
    if with_cuda:
        flags["extra_cuda_cflags"] = ["-O3", "-DSGS_WITH_CUDA"]
    return flags


def build_extension(with_cuda: bool | None = None, build_dir: Path | None = None,
                    verbose: bool = False) -> Path:
    """Compile (if needed) and load the extension; return its build folder."""
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = cuda_build_possible()
    if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to detect: build for Hopper only
    src = source_dir()
    sources = [str(src / s) for s in CPP_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    name = f"sgs_ext_{build_key(with_cuda)}"
    build_dir = Path(build_dir or cache_root() / name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "sgs.lock"):
        # A torch build lock left by a killed process would make load() wait forever; holding
        # our lock means nobody else is building here, so any such file is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir),
                           extra_include_paths=[str(src)], is_python_module=False,
                           verbose=verbose, **compile_flags(with_cuda))
    return build_dir


def _try_load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        try:  # built ahead of time by setup.py
            import sgs_cuda._C  # noqa: F401

            _state.update(reason="ahead-of-time build sgs_cuda._C",
                          cuda=hasattr(torch.ops.sgs, "cuda_enabled") and bool(torch.ops.sgs.cuda_enabled()))
        except ImportError:
            with_cuda = cuda_build_possible()
            _state["build_dir"] = str(build_extension(with_cuda))
            _state.update(reason=f"JIT build in {_state['build_dir']}", cuda=with_cuda)
        _state["loaded"] = True
        for fn in _on_load:
            fn()
    except Exception as exc:  # no compiler, failed build, ...
        _state.update(loaded=False, reason=f"extension unavailable: {type(exc).__name__}: {exc}")
        if requested_backend() == "ext":
            raise RuntimeError(f"SGS_BACKEND=ext but the C++ extension could not be built or loaded: {exc}") from exc
    return _state["loaded"]


def _warn_once(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# Under torch.compile the answer is computed eagerly and traced as a constant: the first call
# may build or import the extension, which dynamo cannot trace.
@torch._dynamo.assume_constant_result
def use_extension(device: torch.device) -> bool:
    """Whether ``sgs::surgery`` should run for tensors on ``device`` (else the torch reference)."""
    backend = requested_backend()
    if backend == "torch" or device.type not in ("cpu", "cuda"):
        return False
    if not _try_load():
        _warn_once("sgs_cuda: the C++ extension is unavailable, using the pure-torch fallback "
                   f"(same results, slower). Reason: {_state['reason']}. Set SGS_BACKEND=torch "
                   "to silence this warning.")
        return False
    if device.type == "cuda" and not _state["cuda"]:
        if backend == "ext":
            raise RuntimeError("SGS_BACKEND=ext but the extension was built without CUDA (nvcc not found)")
        _warn_once("sgs_cuda: the extension was built without CUDA (no nvcc); CUDA tensors use the "
                   "pure-torch fallback.")
        return False
    return True


def on_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the op library is loaded (or now, if it already is)."""
    _on_load.append(fn)
    if _state["loaded"]:
        fn()


def backend_info(device: str | torch.device = "cpu") -> dict:
    """Which implementation runs for ``device`` and why."""
    device = torch.device(device)
    requested = requested_backend()
    try:
        ext = use_extension(device)
    except RuntimeError as exc:
        return {"requested": requested, "device": str(device), "implementation": "none",
                "reason": str(exc)}
    if requested == "torch":
        reason = "SGS_BACKEND=torch"
    else:
        reason = _state["reason"]
    impl = f"extension ({device.type})" if ext else "torch reference"
    return {"requested": requested, "device": str(device), "implementation": impl,
            "reason": reason, "cuda_kernel_built": bool(_state["cuda"]),
            "build_dir": _state["build_dir"]}
