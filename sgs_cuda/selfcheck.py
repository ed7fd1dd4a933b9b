"""First-use self-check of the fused CUDA paths.

The CUDA kernels (dx: cuFFTDx, portable: the Stockham kernel, cufft) are chosen by default on a
CUDA tensor. Before the first call of a class of shapes uses one, it runs once on a small seeded
input of the same plane shape, D, dtype, mask and outputs (and on the caller's own shape when
that is small), and its result is compared with the float64 torch reference on the same device,
to the tolerance of the GPU tests (1e-5 of the largest value, plus the rounding of a 16-bit
output). A path that disagrees, returns NaN/Inf or raises is disabled for that class in this
process (``sgs::disable_cuda_path``: the C++ dispatch skips it) with one warning, and the next
path of the ladder dx -> portable -> cufft -> torch reference is checked the same way. So a
result never comes from a path that failed its check.

Verdicts are kept for the process and on disk next to the JIT build (``selfcheck.json``, keyed
by the GPU name, the driver and the build key, written atomically), so a second process does not
repeat them. ``SGS_SELF_CHECK=0`` turns the check off (benchmarks), ``always`` checks every new
full shape (on that shape), the default ``1`` once per class.

Cost, once per class and process (a DM loop has one class): the seeded input is built on the
CPU (measured on a 2-core CPU at D = 3: 3 ms at 32x32, 28 ms at 128x128); then, by arithmetic
until a GPU measures it (``sgs-dgdd self-check`` prints each check's time), one kernel
call and one float64 reference on ``D x 9`` planes (plus the caller's shape when it has at most
2**20 values) and one host synchronisation: milliseconds.

The logic runs against a ``backend`` (``CudaPaths`` on a GPU); the tests drive the same code with
a fake backend on the CPU (a wrong result, a raised error, a NaN).
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .reference import separated_grads, sgs_reference

LADDER = ("dx", "portable", "cufft")  # then the torch reference
MODES = ("0", "1", "always")
PARTS = "parts"
SMALL = 1 << 20  # the caller's own shape is checked too when it has at most this many values
CACHE_NAME = "selfcheck.json"
REPORT = "please report it with this line and the output of sgs_cuda.backend_info('cuda')"


def mode() -> str:
    value = os.environ.get("SGS_SELF_CHECK", "1").strip().lower()
    if value not in MODES:
        raise ValueError(f"SGS_SELF_CHECK must be one of {MODES}, got {value!r}")
    return value


def tolerance(dtype: torch.dtype) -> float:
    """The GPU tests' 1e-5 relative to the largest value, plus the output's own rounding."""
    return 1e-5 + (torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0)


class Key(NamedTuple):
    """A class of calls that take the same path: device, plane shape, D, dtype, outputs, mask
    and, in ``always`` mode, N and C (the C++ side copies a misaligned input, so where a tensor
    starts does not change the path)."""
    device: int
    H: int
    W: int
    D: int
    dtype: str
    outputs: str
    mask: str
    NC: tuple | None

    def text(self) -> str:
        nc = f" N={self.NC[0]} C={self.NC[1]}" if self.NC else ""
        return f"{self.H}x{self.W} D={self.D}{nc} {self.dtype} {self.outputs} {self.mask}"


class Verdict(NamedTuple):
    ok: bool
    error: float  # largest relative error (inf: NaN/Inf or raised)
    detail: str
    seconds: float

    def text(self) -> str:
        return f"{'pass' if self.ok else 'FAIL'}: {self.detail}"


def tensor_meta(grads: torch.Tensor) -> tuple:
    """What of ``grads`` decides the path: shape, dtype, device index."""
    index = grads.device.index if grads.device.index is not None else -1
    return tuple(int(n) for n in grads.shape), grads.dtype, index


def make_key(meta: tuple, outputs: str, mask: str, always: bool) -> Key:
    (D, N, C, H, W), dtype, index = meta
    return Key(index, H, W, D, str(dtype).replace("torch.", ""), outputs, mask, (N, C) if always else None)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    scale = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((out - ref).abs().max() / scale).item()) if out.numel() else 0.0


def compare(out, grads: torch.Tensor, assign: torch.Tensor, outputs: str, params) -> tuple[float, str]:
    """The largest relative error of a path's outputs against the float64 reference on the same
    device (inf: NaN/Inf, or a wrong number of components), and which output it is in."""
    ref = sgs_reference(grads.double(), assign, *params, return_parts=True)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    names = ("update", "mean", "shared", "diversity")[:4 if outputs == PARTS else 1]
    errors = {name: _relative_error(t, r) for name, t, r in zip(names, outs, ref)}
    if outputs != "update":  # the diagnostic sums: the kept-component count (a few components may
        s, r = outs[-1].double().cpu(), ref[4].double().cpu()  # sit on a threshold) and the energies
        if not bool(torch.isfinite(s).all()) or s[1].item() != r[1].item():
            errors["diagnostic sums"] = float("inf")
        else:
            slack = 4 * grads.shape[1] * grads.shape[2]
            errors["kept-component count"] = max(abs(s[0].item() - r[0].item()) - slack, 0) / max(r[1].item(), 1)
            errors["energy sums"] = (s[2:] - r[2:]).abs().max().item() / max(r[3].item(), 1e-300)
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def _probe(D: int, N: int, C: int, H: int, W: int, dtype, device, rho: float, seed: int):
    """A seeded input away from the mask's decision boundaries, and an assignment using every domain."""
    g = separated_grads(D, N, C, H, W, rho=rho, seed=seed).to(dtype=dtype, device=device)
    return g, ((torch.arange(N) * 2 + 1) % D).to(device)


class CudaPaths:
    """The real backend: the compiled op's CUDA paths."""

    def ident(self, device: int) -> dict:
        from . import _build
        name = torch.cuda.get_device_name(device)
        try:
            version = ctypes.c_int()
            ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
            driver = str(version.value)
        except (OSError, AttributeError):
            driver = "unknown"
        build = Path(_build._state["build_dir"]).name if _build._state["build_dir"] else "ahead-of-time"
        return {"gpu": name, "driver": driver, "build": build}

    def cache_file(self) -> Path | None:
        from . import _build
        return Path(_build._state["build_dir"]) / CACHE_NAME if _build._state["build_dir"] else None

    def forced(self) -> str:
        return str(torch.ops.sgs.cuda_path_option())

    def choose(self, grads: torch.Tensor, outputs: str) -> str:
        return str(torch.ops.sgs.cuda_path(grads, outputs == PARTS))

    def run(self, grads, assign, outputs: str, params):
        op = {"update": torch.ops.sgs.surgery, "stats": torch.ops.sgs.surgery_stats,
              PARTS: torch.ops.sgs.surgery_parts}[outputs]
        return op(grads, assign, *params)

    def disable(self, key: Key, path: str) -> None:
        torch.ops.sgs.disable_cuda_path(key.device, key.H, key.W, key.D, getattr(torch, key.dtype), path)

    def context_error(self, device: int) -> str | None:
        """None when the CUDA context still works after a failure, else why not."""
        try:
            torch.cuda.synchronize(device)
            if torch.ones(2, device=f"cuda:{device}").sum().item() != 2.0:
                return "a test addition gave a wrong result"
        except Exception as exc:  # an illegal address or a device assert poisons the context
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()


class SelfCheck:
    """The verdicts of one process, and the ladder walk that produces them."""

    def __init__(self, backend):
        self.backend = backend
        self.routes: dict[Key, str] = {}  # "ext" (the C++ dispatch, failed paths disabled) or "torch"
        self.verdicts: dict[tuple[Key, str], Verdict] = {}
        self._lock = threading.RLock()

    def route(self, grads: torch.Tensor, outputs: str, params) -> str:
        """``ext`` (run the op: its dispatch takes a path that passed) or ``torch`` (every CUDA
        path failed for this class: the reference)."""
        return self.route_meta(tensor_meta(grads), outputs, tuple(params))

    def route_meta(self, meta: tuple, outputs: str, params: tuple) -> str:
        m = mode()
        if m == "0":
            return "ext"
        key = make_key(meta, outputs, params[4], m == "always")
        route = self.routes.get(key)
        if route is None:
            with self._lock:
                route = self.routes.get(key) or self._resolve(key, meta[0], params)
                self.routes[key] = route
        return route

    # --- the ladder ------------------------------------------------------------------------------

    def _resolve(self, key: Key, shape, params) -> str:
        if self.backend.capturing():  # checking needs host synchronisations (and allocations)
            raise RuntimeError(f"sgs_cuda: the first call of {key.text()} runs the CUDA self-check, which cannot "
                               "run inside CUDA graph capture: call the op once before capturing (a warm-up), "
                               "or set SGS_SELF_CHECK=0")
        device = torch.device("cuda", key.device) if key.device >= 0 else torch.device("cpu")
        dtype = getattr(torch, key.dtype)
        D, N, C = shape[:3]
        probes = [_probe(D, 3, 3, key.H, key.W, dtype, device, params[1], seed=key.H + key.W + D)]
        if key.NC is not None or (D * N * C * key.H * key.W <= SMALL and (N, C) != (3, 3) and N * C > 0):
            probes.append(_probe(D, N, C, key.H, key.W, dtype, device, params[1], seed=1))
        forced, tried = self.backend.forced(), set()
        while True:
            path = self.backend.choose(probes[0][0], key.outputs)
            if path in tried:  # the dispatch cannot avoid a failed path: use the reference
                return "torch"
            tried.add(path)
            verdict = self._verdict(key, path, probes, params)
            if verdict.ok:
                return "ext"
            self.backend.disable(key, path)
            later = LADDER[LADDER.index(path) + 1:] if path in LADDER else ()
            if forced != "auto":
                raise RuntimeError(f"sgs_cuda: SGS_CUDA_PATH={forced} but that path failed its self-check for "
                                   f"{key.text()} ({verdict.detail}); {REPORT}")
            warnings.warn(f"sgs_cuda: the {path} CUDA path failed its self-check for {key.text()} "
                          f"({verdict.detail}); it is disabled for this process and "
                          f"{later[0] if later else 'the torch reference'} is tried instead; {REPORT}",
                          RuntimeWarning, stacklevel=2)
            if not later:
                return "torch"

    def _verdict(self, key: Key, path: str, probes, params) -> Verdict:
        if (key, path) in self.verdicts:
            return self.verdicts[(key, path)]
        stored = self._load(key, path)
        if stored is not None:
            self.verdicts[(key, path)] = stored
            return stored
        t0, tol = time.perf_counter(), tolerance(getattr(torch, key.dtype))
        try:
            error, what = 0.0, "update"
            for grads, assign in probes:
                e, w = compare(self.backend.run(grads, assign, key.outputs, params), grads, assign, key.outputs,
                               params)
                error, what = max((error, what), (e, w))
            ok = error <= tol
            detail = (f"{what}: largest relative error {error:.2g} (tolerance {tol:.1g})" if error < float("inf")
                      else f"{what}: NaN or Inf, or not the reference's count")
        except Exception as exc:  # a CUDA error, an assert, a refused launch: the path failed
            broken = self.backend.context_error(key.device)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if broken:
                raise RuntimeError(f"sgs_cuda: the {path} CUDA path raised in its self-check for {key.text()} "
                                   f"({type(exc).__name__}: {first}) and the CUDA context is no longer usable "
                                   f"({broken}); restart with SGS_CUDA_PATH set to another path; {REPORT}") from None
            ok, error, detail = False, float("inf"), f"raised {type(exc).__name__}: {first}"
        verdict = Verdict(ok, error, detail, time.perf_counter() - t0)
        self.verdicts[(key, path)] = verdict
        self._store(key, path, verdict)
        return verdict

    # --- the verdict cache on disk -----------------------------------------------------------------

    def _disk_key(self, key: Key, path: str) -> str:
        ident = self.backend.ident(key.device)
        return f"{ident['gpu']}|driver {ident['driver']}|build {ident['build']}|{key.text()}|{path}"

    def _read(self, file: Path) -> dict:
        try:
            data = json.loads(file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _load(self, key: Key, path: str) -> Verdict | None:
        file = self.backend.cache_file()
        entry = self._read(file).get(self._disk_key(key, path)) if file else None
        try:
            return Verdict(bool(entry["ok"]), float(entry["error"]), str(entry["detail"]), 0.0) if entry else None
        except (KeyError, TypeError, ValueError):
            return None

    def _store(self, key: Key, path: str, verdict: Verdict) -> None:
        """Merge into the file and replace it atomically (a race between two processes can at
        worst lose one entry, which is then checked again)."""
        file = self.backend.cache_file()
        if file is None or not file.parent.is_dir():
            return
        data = self._read(file)
        data[self._disk_key(key, path)] = {"ok": verdict.ok, "error": verdict.error, "detail": verdict.detail,
                                           "seconds": round(verdict.seconds, 4)}
        tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, file)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only cache: the verdict stays in this process

    # --- reporting ---------------------------------------------------------------------------------

    def report(self) -> dict:
        """For ``backend_info``: the mode and every verdict of this process."""
        m = mode()
        return {"mode": {"0": "off (SGS_SELF_CHECK=0)", "1": "once per path and shape class",
                         "always": "every new shape (SGS_SELF_CHECK=always)"}[m],
                "verdicts": {f"{key.text()}: {path}": v.text() for (key, path), v in self.verdicts.items()},
                "torch_fallback": [key.text() for key, r in self.routes.items() if r == "torch"]}


_checker = SelfCheck(CudaPaths())


# Under torch.compile the answer is computed eagerly and traced as a constant, as
# _build.use_extension is (the check runs real kernels, outside the fake tensors of the trace).
@torch._dynamo.assume_constant_result
def _route_traced(meta: tuple, outputs: str, params: tuple) -> str:
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():
        return _checker.route_meta(meta, outputs, params)


def route(grads: torch.Tensor, outputs: str, params) -> str:
    """``ext`` or ``torch`` for a call of the compiled op on a CUDA tensor (see :class:`SelfCheck`)."""
    if torch.compiler.is_compiling():
        return _route_traced(tensor_meta(grads), outputs, tuple(params))
    return _checker.route(grads, outputs, params)


def report() -> dict:
    return _checker.report()


class _Fresh(CudaPaths):
    def cache_file(self):  # every verdict measured now, none read from disk
        return None


def main() -> int:
    """``sgs-dgdd self-check``: every CUDA path's verdict, checked now, on the common
    plane sizes (D = 3; the DM loop's update and sums in float32 and bfloat16, the parts in
    float32), one line each with its cost; exit status 1 when a path that applies fails."""
    from . import _build
    if not torch.cuda.is_available() or not _build.use_extension(torch.device("cuda")):
        print(f"sgs_cuda self-check: no CUDA extension to check ({_build.backend_info('cuda').get('reason')})")
        return 0
    print(f"sgs_cuda self-check on {torch.cuda.get_device_name()} (build {_build._state['build_dir']})")
    failed = False
    for path in LADDER:
        for H, W in ((28, 28), (32, 32), (64, 64), (128, 128)):
            for dtype, outputs in ((torch.float32, "stats"), (torch.bfloat16, "stats"), (torch.float32, PARTS)):
                grads = torch.empty(3, 3, 3, H, W, dtype=dtype, device="cuda")
                checker = SelfCheck(_Fresh())
                _build.set_cuda_path(path)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        checker.route(grads, outputs, PARAMS_CHECKED)
                except RuntimeError as exc:
                    if not checker.verdicts:  # the path does not take this case
                        print(f"{path:9s} {H}x{W} {outputs} {str(dtype)[6:]}: not applicable "
                              f"({str(exc).splitlines()[0][:80]})")
                        continue
                finally:
                    _build.set_cuda_path("auto")
                    torch.ops.sgs.disable_cuda_path(0, 0, 0, 0, torch.float32, "")  # clear the table
                for (key, _), verdict in checker.verdicts.items():
                    failed |= not verdict.ok
                    print(f"{path:9s} {key.text():32s} {verdict.text()} ({verdict.seconds * 1e3:.0f} ms)")
    return int(failed)


PARAMS_CHECKED = (1.0, 0.25, 1.0, 0.5, "hard")
