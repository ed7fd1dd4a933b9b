"""Building and loading the C++/CUDA extension, and choosing the backend.

The extension is compiled on first use with ``torch.utils.cpp_extension`` into a cache folder
named by the *content* of its sources, the compile flags, torch, Python and the CPU, so two
checkouts (or a moved checkout) sharing the cache reuse one build. The sources are copied into
that folder and compiled from there, so the paths torch sees do not depend on the checkout.

The cache heals itself: a build runs in a scratch folder, the finished library is renamed into
place and a manifest (size, SHA-256) is written next to it. Before loading, Python checks the
library against its manifest, because loading a truncated library can kill the process with
SIGBUS; a missing, damaged or unloadable library is rebuilt, with one message. A file lock
(released by the OS if a process dies) makes concurrent first uses build once.

CUDA sources are compiled only where a GPU is present, unless ``SGS_BUILD_CUDA=1`` forces them
(CI does, so a CUDA kernel that does not build never lands) or ``SGS_BUILD_CUDA=0`` forbids them.
The cuFFTDx kernel needs the ``nvidia-mathdx`` headers (``pip install -e ".[cuda]"``); without
them the CUDA build has the portable and cuFFT paths only, and ``backend_info`` says why.
``setup.py`` can build the same sources ahead of time as ``sgs_cuda._C``.

``SGS_BACKEND=auto|torch|ext`` forces a choice: ``torch`` never builds, ``ext`` raises if the
extension cannot be used, ``auto`` (default) falls back to the torch reference with one warning.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

_PKG = Path(__file__).resolve().parent
CPP_SOURCES = ("bindings.cpp", "sgs_cpu.cpp")
CUDA_SOURCES = ("sgs_cuda.cu",)
DX_SOURCES = ("sgs_cuda_dx.cu", "sgs_cuda_dx_28.cu", "sgs_cuda_dx_32.cu", "sgs_cuda_dx_64.cu", "sgs_cuda_dx_128.cu",
              "sgs_cuda_dx_128p.cu")
HEADERS = ("sgs_math.h", "sgs_ops.h", "sgs_dx.h", "sgs_dx_api.h", "sgs_cuda_dx.cuh")
BACKENDS = ("auto", "torch", "ext")
MANIFEST = "manifest.json"

# torch guesses CUDA_HOME from the nvcc on PATH; a /usr/local/bin/nvcc link would make it
# /usr/local, which lacks the CUDA headers. Point it at the toolkit unless the user chose one.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

_state: dict = {"loaded": None, "reason": "not loaded yet", "cuda": False, "dx": False, "build_dir": None,
                "warned": False, "cuda_reason": None, "dx_reason": None}
_on_load: list[Callable[[], None]] = []


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning
    (logged at import on machines without a GPU, in the middle of whatever is printing)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


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


def _nvcc_home() -> str | None:
    """The CUDA toolkit torch would use, without importing cpp_extension (and its warning)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None and shutil.which("nvcc"):
        home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    return home if home and (Path(home) / "bin" / "nvcc").exists() else None


def cuda_build_possible() -> bool:
    """Torch has CUDA, nvcc is found and the CUDA sources are there (no GPU needed to compile)."""
    return torch.version.cuda is not None and _nvcc_home() is not None and (source_dir() / CUDA_SOURCES[0]).is_file()


def cuda_build_wanted() -> tuple[bool, str]:
    """Whether to compile the CUDA sources, and why (or why not). ``SGS_BUILD_CUDA=1`` forces
    them (as CI does), ``0`` forbids them, the default compiles them where a GPU is present."""
    mode = os.environ.get("SGS_BUILD_CUDA", "auto")
    if mode == "0":
        return False, "SGS_BUILD_CUDA=0"
    if not cuda_build_possible():
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
        if mode == "1":
            raise RuntimeError(f"SGS_BUILD_CUDA=1 but the CUDA sources cannot be compiled: {why}")
        return False, why
    if mode == "1":
        return True, "SGS_BUILD_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is present"
    return False, "no GPU on this machine (SGS_BUILD_CUDA=1 compiles the CUDA sources anyway)"


def mathdx_include() -> Path | None:
    """The include folder of the nvidia-mathdx headers (cufftdx.hpp), or None."""
    candidates = [os.environ.get("SGS_MATHDX_INCLUDE")] + [str(Path(p) / "nvidia" / "mathdx" / "include") for p in sys.path if p]
    for c in candidates:
        if c and (Path(c) / "cufftdx.hpp").is_file():
            return Path(c).resolve()
    return None


def dx_build_wanted(with_cuda: bool) -> tuple[bool, str]:
    if not with_cuda:
        return False, "no CUDA build"
    if os.environ.get("SGS_BUILD_DX", "auto") == "0":
        return False, "SGS_BUILD_DX=0"
    if mathdx_include() is None:
        return False, "nvidia-mathdx is not installed (pip install -e \".[cuda]\" adds the cuFFTDx kernel)"
    return True, "nvidia-mathdx found"


def _cpu_tag() -> str:
    # -march=native code must not be reused on another CPU that shares the cache folder.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return platform.machine()


def sources(with_cuda: bool, with_dx: bool = False) -> tuple[str, ...]:
    return CPP_SOURCES + (CUDA_SOURCES if with_cuda else ()) + (DX_SOURCES if with_dx else ())


def cuda_arch_list(with_cuda: bool) -> str:
    """The architectures the CUDA sources are compiled for: ``TORCH_CUDA_ARCH_LIST``, else (no GPU
    to detect) Hopper, sm_90, which the cuFFTDx kernel needs. Hashed into the build key as the
    value the build uses, so a later process that inherits the variable finds the same build."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if with_cuda and not arch and not torch.cuda.is_available():
        arch = "9.0"
    return arch


def build_key(with_cuda: bool, with_dx: bool = False) -> str:
    """Content hash of everything the build depends on (never the checkout's path)."""
    h = hashlib.sha256()
    src = source_dir()
    for name in sources(with_cuda, with_dx) + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes() if (src / name).is_file() else b"")
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{with_cuda}|{with_dx}|{_cpu_tag()}".encode())
    h.update(cuda_arch_list(with_cuda).encode())
    h.update(repr(compile_flags(with_cuda, with_dx)).encode())
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


def compile_flags(with_cuda: bool, with_dx: bool = False) -> dict:
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the plane loop runs serially.
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("SGS_NATIVE", "1") == "1":
        cflags.append("-march=native")
    defines = (["-DSGS_WITH_CUDA"] if with_cuda else []) + (["-DSGS_WITH_DX"] if with_dx else [])
    flags = {"extra_cflags": cflags + defines, "extra_ldflags": ["-fopenmp"]}
    if with_cuda:
        flags["extra_cuda_cflags"] = ["-O3"] + defines
    if with_dx:
        flags["extra_include_paths"] = [str(mathdx_include())]
    return flags


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_state(build_dir: Path, name: str) -> str:
    """``ok`` when ``name.so`` matches its manifest, else what is wrong with it (read in Python:
    mapping a truncated library can kill the process with SIGBUS before any handler runs)."""
    lib, manifest = build_dir / f"{name}.so", build_dir / MANIFEST
    if not lib.exists():
        return "missing"
    try:
        expected = json.loads(manifest.read_text())
        size = lib.stat().st_size
        if expected.get("size") != size:
            return f"damaged (size {size} bytes, expected {expected.get('size')})"
        if expected.get("sha256") != _sha256(lib):
            return "damaged (checksum mismatch)"
    except (OSError, ValueError, AttributeError) as exc:
        return f"unverified (no valid manifest: {type(exc).__name__})"
    return "ok"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_sources(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file() and (not (dst / name).is_file() or (dst / name).read_bytes() != (src / name).read_bytes()):
            shutil.copy2(src / name, dst / name)


def _compile(name: str, build_dir: Path, with_cuda: bool, with_dx: bool, verbose: bool) -> None:
    """Compile into a scratch folder, then rename the library into place and write its manifest."""
    cpp_extension = _cpp_extension()
    if with_cuda and cuda_arch_list(True) and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(True)  # (torch reads it; no GPU to detect)
    src = build_dir / "src"
    _copy_sources(source_dir(), src, sources(with_cuda, with_dx) + HEADERS)
    scratch = build_dir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    flags = compile_flags(with_cuda, with_dx)
    includes = [str(src)] + flags.pop("extra_include_paths", [])
    parts = "C++" + (" + CUDA" if with_cuda else "") + (" + cuFFTDx" if with_dx else "")
    print(f"sgs_cuda: compiling the {parts} extension in {build_dir} (once per source version; "
          f"{'a few minutes' if with_cuda else 'about a minute'})", file=sys.stderr, flush=True)
    t0 = time.time()
    cpp_extension.load(name=name, sources=[str(src / s) for s in sources(with_cuda, with_dx)],
                       build_directory=str(scratch), extra_include_paths=includes, is_python_module=False,
                       verbose=verbose, **flags)
    lib = build_dir / f"{name}.so"
    os.replace(scratch / f"{name}.so", lib)
    _write_atomic(build_dir / MANIFEST, json.dumps({"name": name, "size": lib.stat().st_size,
                                                     "sha256": _sha256(lib), "cuda": with_cuda, "dx": with_dx,
                                                     "torch": torch.__version__}))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"sgs_cuda: extension built in {time.time() - t0:.0f} s: {lib}", file=sys.stderr, flush=True)


def build_extension(with_cuda: bool | None = None, build_dir: Path | None = None, verbose: bool = False,
                    with_dx: bool | None = None) -> Path:
    """Compile (if needed) and load the extension; return its build folder."""
    if with_cuda is None:
        with_cuda = cuda_build_wanted()[0]
    if with_dx is None:
        with_dx = dx_build_wanted(with_cuda)[0]
    key = build_key(with_cuda, with_dx)
    name = f"sgs_ext_{key}"
    build_dir = Path(build_dir or cache_root() / name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "sgs.lock"):
        state = library_state(build_dir, name)
        if state != "ok":
            if state != "missing":
                print(f"sgs_cuda: the cached extension {build_dir / (name + '.so')} is {state}; rebuilding it",
                      file=sys.stderr, flush=True)
            _compile(name, build_dir, with_cuda, with_dx, verbose)  # loads it too
        else:
            try:
                torch.ops.load_library(str(build_dir / f"{name}.so"))
            except OSError as exc:  # verified but unloadable (e.g. a library it links against changed)
                print(f"sgs_cuda: the cached extension {build_dir} does not load ({exc}); rebuilding it",
                      file=sys.stderr, flush=True)
                (build_dir / MANIFEST).unlink(missing_ok=True)
                _compile(name, build_dir, with_cuda, with_dx, verbose)
    return build_dir


def _try_load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        try:  # built ahead of time by setup.py
            import sgs_cuda._C  # noqa: F401

            cuda = hasattr(torch.ops.sgs, "cuda_enabled") and bool(torch.ops.sgs.cuda_enabled())
            _state.update(reason="ahead-of-time build sgs_cuda._C", cuda=cuda,
                          dx=cuda and "not built" not in str(torch.ops.sgs.cuda_build_info()),
                          cuda_reason="ahead-of-time build")
        except ImportError:
            with_cuda, why = cuda_build_wanted()
            with_dx, dx_why = dx_build_wanted(with_cuda)
            _state.update(cuda_reason=why, dx_reason=dx_why)
            _state["build_dir"] = str(build_extension(with_cuda, with_dx=with_dx))
            _state.update(reason=f"JIT build in {_state['build_dir']}", cuda=with_cuda, dx=with_dx)
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
        why = _state.get("cuda_reason") or "built without CUDA"
        if backend == "ext":
            raise RuntimeError(f"SGS_BACKEND=ext but the extension was built without CUDA ({why})")
        _warn_once(f"sgs_cuda: the extension was built without CUDA ({why}); CUDA tensors use the "
                   "pure-torch fallback.")
        return False
    return True


def on_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the op library is loaded (or now, if it already is)."""
    _on_load.append(fn)
    if _state["loaded"]:
        fn()


# The plane sizes backend_info reports the CUDA path for.
REPORTED_SIZES = ((28, 28), (32, 32), (64, 64), (128, 128))


def backend_info(device: str | torch.device = "cpu") -> dict:
    """Which implementation runs for ``device`` and why; for CUDA also which kernels the build
    has, with a GPU which CUDA path (dx, portable or cufft) each common plane size takes, and
    ``self_check``: the first-use self-check's mode and its verdicts so far (sgs_cuda/selfcheck.py)."""
    device = torch.device(device)
    requested = requested_backend()
    info = {"requested": requested, "device": str(device)}
    if device.type == "cuda":
        from . import selfcheck  # the first-use verdicts of the CUDA paths (sgs_cuda/selfcheck.py)
        info["self_check"] = selfcheck.report()
    if device.type == "cuda" and not torch.cuda.is_available():
        return {**info, "implementation": "none", "reason": "no CUDA device on this machine",
                "cuda_kernel_built": bool(_state["cuda"]), "build_dir": _state["build_dir"]}
    try:
        ext = use_extension(device)
    except RuntimeError as exc:
        return {**info, "implementation": "none", "reason": str(exc)}
    general = ext and device.type == "cpu" and hasattr(torch.ops.sgs, "surgery_general")
    info.update(implementation=f"extension ({device.type})" if ext else "torch reference",
                # the formulations beyond the spec (SGSConfig: agree_on, equalize, decay, combine;
                # mean_weight alone runs the fused kernels)
                general_formulations="extension (cpu): sgs::surgery_general; combine=pcgrad: torch reference"
                if general else f"torch reference ({device.type})",
                reason="SGS_BACKEND=torch" if requested == "torch" else _state["reason"],
                cuda_kernel_built=bool(_state["cuda"]), cuda_build_reason=_state["cuda_reason"],
                build_dir=_state["build_dir"])
    if _state["cuda"] and hasattr(torch.ops.sgs, "cuda_build_info"):
        info["cuda_kernels"] = str(torch.ops.sgs.cuda_build_info())
        if not _state["dx"]:
            info["dx_reason"] = _state["dx_reason"]
        if ext and device.type == "cuda":
            info["cuda_path_option"] = str(torch.ops.sgs.cuda_path_option())
            info["cuda_path_by_size"] = {}
            for H, W in REPORTED_SIZES:
                probe = torch.empty(1, 1, 1, H, W, device=device)
                try:
                    info["cuda_path_by_size"][f"{H}x{W}"] = str(torch.ops.sgs.cuda_path(probe, False))
                except RuntimeError as exc:  # a forced path that cannot take this size
                    info["cuda_path_by_size"][f"{H}x{W}"] = f"error: {str(exc).splitlines()[0]}"
    return info


def set_cuda_path(path: str) -> None:
    """Force a CUDA path for later calls (``auto``, ``dx``, ``portable``, ``cufft``), as
    ``SGS_CUDA_PATH`` does at start-up; for tests and benchmarks."""
    if not _try_load() or not hasattr(torch.ops.sgs, "set_cuda_options"):
        raise RuntimeError("set_cuda_path needs the extension built with CUDA")
    torch.ops.sgs.set_cuda_options(path, -1)
