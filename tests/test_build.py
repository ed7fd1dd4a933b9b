"""The JIT build: cached by content, self-healing, quiet, and safe when several processes start at once."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sgs_cuda import _build

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import torch
    from sgs_cuda import _build, sgs_reference
    _build.build_extension(with_cuda=False)
    g = torch.randn(2, 1, 1, 8, 8, dtype=torch.float64)
    out = torch.ops.sgs.surgery(g, torch.tensor([1]), 1.0, 0.25, 1.0, 0.25, "hard")
    ref = sgs_reference(g, torch.tensor([1]), 1.0, 0.25, 1.0, 0.25)
    assert torch.allclose(out, ref)
    print("OK")
""")

# The cache's behaviour (locking, healing, messages) does not depend on what it compiles: these
# tests build a one-function source in well under a second instead of the whole extension.
STUB_SOURCE = 'extern "C" int sgs_stub_answer() { return 42; }\n'
STUB_CHILD = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    from sgs_cuda import _build
    stub = Path(sys.argv[1])
    _build.source_dir = lambda: stub
    _build.CPP_SOURCES, _build.HEADERS = ("stub.cpp",), ()
    build = _build.build_extension(with_cuda=False)
    (lib,) = build.glob("*.so")
    assert ctypes.CDLL(str(lib)).sgs_stub_answer() == 42
    print("OK")
""")


def _child(cache: Path, script: str = CHILD, *args: str, **env):
    env = {**os.environ, "SGS_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=900)


def _stub_source(tmp_path: Path) -> str:
    stub = tmp_path / "stub_src"
    stub.mkdir()
    (stub / "stub.cpp").write_text(STUB_SOURCE)
    return str(stub)


def _check_one_clean_build(cache: Path, outputs: list[str], source: str) -> Path:
    """One build folder holding one library, compiled from a copy of the sources inside it (no
    checkout path involved); one start and one end line; none of torch's CUDA warning."""
    builds = [d for d in (cache / "extensions").iterdir() if d.is_dir()]
    assert len(builds) == 1
    assert len(list(builds[0].glob("*.so"))) == 1
    assert (builds[0] / "src" / source).is_file() and (builds[0] / _build.MANIFEST).is_file()
    assert not (builds[0] / "scratch").exists()
    joined = "\n".join(outputs)
    assert joined.count("sgs_cuda: compiling") == 1 and joined.count("sgs_cuda: extension built in") == 1, joined
    assert "No CUDA runtime" not in joined
    return builds[0]


def test_full_extension_builds_in_a_fresh_cache(tmp_path):
    """The one test that compiles the whole extension from scratch (the others build a stub)."""
    proc = _child(tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    _check_one_clean_build(tmp_path, [proc.stdout, proc.stderr], "bindings.cpp")


def test_concurrent_first_use_builds_once(tmp_path):
    env = {**os.environ, "SGS_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    stub = _stub_source(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", STUB_CHILD, stub], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and out.strip().endswith("OK"), out
    _check_one_clean_build(tmp_path, outputs, "stub.cpp")  # both processes used the same cached build


def test_damaged_library_is_rebuilt(tmp_path):
    """A truncated library used to kill every later process with SIGBUS (exit 135), an empty or
    garbage one to fall back to the torch reference for good: both are now rebuilt, once."""
    stub = _stub_source(tmp_path)
    first = _child(tmp_path, STUB_CHILD, stub)
    assert first.returncode == 0, first.stderr
    (build,) = [d for d in (tmp_path / "extensions").iterdir() if d.is_dir()]
    (lib,) = build.glob("*.so")
    data = lib.read_bytes()
    for damage in (data[: len(data) // 2], b"", b"\x7fELF garbage" * 100):
        lib.write_bytes(damage)
        proc = _child(tmp_path, STUB_CHILD, stub, SGS_BACKEND="ext")
        assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (proc.returncode, proc.stderr[-3000:])
        assert proc.stderr.count("rebuilding") == 1, proc.stderr[-3000:]
        assert _build.library_state(build, lib.stem) == "ok"
    again = _child(tmp_path, STUB_CHILD, stub)  # healthy now: loaded, not rebuilt
    assert again.returncode == 0 and "compiling" not in again.stderr


def test_library_state_detects_damage(tmp_path):
    lib = tmp_path / "x.so"
    assert _build.library_state(tmp_path, "x") == "missing"
    lib.write_bytes(b"abc")
    assert _build.library_state(tmp_path, "x").startswith("unverified")
    (tmp_path / _build.MANIFEST).write_text(json.dumps({"size": 3, "sha256": _build._sha256(lib)}))
    assert _build.library_state(tmp_path, "x") == "ok"
    lib.write_bytes(b"abd")
    assert _build.library_state(tmp_path, "x") == "damaged (checksum mismatch)"
    lib.write_bytes(b"ab")
    assert _build.library_state(tmp_path, "x").startswith("damaged (size")
    (tmp_path / _build.MANIFEST).write_text("[1, 2")  # truncated manifest
    assert _build.library_state(tmp_path, "x").startswith("unverified")


def test_build_key_tracks_content_not_checkout_path(monkeypatch, tmp_path):
    key = _build.build_key(with_cuda=False)
    assert key == _build.build_key(with_cuda=False)
    if (_build.source_dir() / "sgs_cuda.cu").exists():
        assert key != _build.build_key(with_cuda=True)
        assert _build.build_key(with_cuda=True) != _build.build_key(with_cuda=True, with_dx=True)
    other = tmp_path / "other_checkout" / "csrc"
    shutil.copytree(_build.source_dir(), other)
    monkeypatch.setattr(_build, "source_dir", lambda: other)
    assert _build.build_key(with_cuda=False) == key  # a second checkout shares the build
    (other / "sgs_cpu.cpp").write_text((other / "sgs_cpu.cpp").read_text() + "\n// edited\n")
    assert _build.build_key(with_cuda=False) != key
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _build.build_key(with_cuda=False) != key


def test_build_key_is_the_architecture_the_build_uses(monkeypatch):
    """Without a GPU and TORCH_CUDA_ARCH_LIST the build compiles for sm_90 and sets the variable
    for torch; a child process that inherits it must find the same build, not compile another."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    unset = _build.build_key(with_cuda=True, with_dx=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.build_key(with_cuda=True, with_dx=True) == unset
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _build.build_key(with_cuda=True, with_dx=True) != unset


def test_cuda_sources_only_where_a_gpu_is_present_unless_forced(monkeypatch):
    monkeypatch.setattr(_build, "cuda_build_possible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SGS_BUILD_CUDA", raising=False)
    assert _build.cuda_build_wanted()[0] is False
    monkeypatch.setenv("SGS_BUILD_CUDA", "1")
    assert _build.cuda_build_wanted()[0] is True
    monkeypatch.setenv("SGS_BUILD_CUDA", "0")
    assert _build.cuda_build_wanted()[0] is False
    monkeypatch.delenv("SGS_BUILD_CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _build.cuda_build_wanted()[0] is True
    monkeypatch.setattr(_build, "cuda_build_possible", lambda: False)
    monkeypatch.setenv("SGS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="SGS_BUILD_CUDA=1"):
        _build.cuda_build_wanted()


def test_dx_needs_mathdx(monkeypatch):
    monkeypatch.setattr(_build, "mathdx_include", lambda: None)
    wanted, why = _build.dx_build_wanted(True)
    assert not wanted and "nvidia-mathdx" in why
    assert _build.dx_build_wanted(False)[0] is False


def test_extension_compiles_cuda_sources_when_asked(monkeypatch):
    """CI sets SGS_BUILD_CUDA=1 (torch with CUDA and nvcc, no GPU): the extension it loads must
    have compiled the CUDA kernels, so that a kernel that does not build never lands."""
    monkeypatch.setenv("SGS_BACKEND", "ext")
    info = _build.backend_info("cpu")
    assert info["implementation"] == "extension (cpu)"
    expected = _build.cuda_build_wanted()[0]
    assert info["cuda_kernel_built"] == expected
    assert bool(torch.ops.sgs.cuda_enabled()) == expected
    if expected:
        kernels = info["cuda_kernels"]
        assert kernels.startswith("dx: ") and "portable" in kernels and "cufft" in kernels
        if _build.mathdx_include() is not None and os.environ.get("SGS_BUILD_DX", "auto") != "0":
            assert "32x32" in kernels and "not built" not in kernels
        else:
            assert "not built" in kernels and "nvidia-mathdx" in info["dx_reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_backend_info_cuda_without_gpu_does_not_claim_the_extension(monkeypatch):
    monkeypatch.setitem(_build._state, "cuda", True)  # even a CUDA build cannot run without a GPU
    info = _build.backend_info("cuda")
    assert info["implementation"] == "none" and "no CUDA device" in info["reason"]


def test_no_cuda_runtime_warning_on_import():
    """torch's "No CUDA runtime is found" (logged when cpp_extension is imported on a machine
    without a GPU) must not break a run's progress bars."""
    child = textwrap.dedent("""
        import torch, sgs_cuda
        from sgs_cuda import _build
        _build._cpp_extension()
        print(sgs_cuda.backend_info("cpu")["implementation"])
    """)
    proc = _child(Path(os.environ.get("SGS_CACHE_DIR", "/tmp")), child, CUDA_HOME="/usr/local/cuda")
    assert proc.returncode == 0, proc.stderr
    assert "No CUDA runtime" not in proc.stderr + proc.stdout


def test_first_call_inside_torch_compile():
    """A fresh process whose first use of the op is inside ``torch.compile(fullgraph=True)``: the
    extension is loaded (or built) eagerly at trace time instead of breaking the graph."""
    child = textwrap.dedent("""
        import torch, sgs_cuda
        f = torch.compile(lambda g, a: sgs_cuda.spectral_gradient_surgery(g, a) * 2, fullgraph=True,
                          backend="aot_eager")
        g, a = torch.randn(3, 2, 1, 8, 8, dtype=torch.float64), torch.tensor([2, 0])
        torch.testing.assert_close(f(g, a), 2 * sgs_cuda.sgs_reference(g, a, 1.0, 0.0, 1.0, 0.25))
        print(sgs_cuda.backend_info("cpu")["implementation"])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SGS_BACKEND": "ext"}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("extension (cpu)"), proc.stdout + proc.stderr
