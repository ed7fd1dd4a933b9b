"""The JIT build: cached, keyed by its inputs, and safe when several processes start at once."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_concurrent_first_use_builds_once(tmp_path):
    env = {**os.environ, "SGS_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and out.strip().endswith("OK"), out
    builds = [d for d in (tmp_path / "extensions").iterdir() if d.is_dir()]
    assert len(builds) == 1  # both processes used the same cached build
    assert len(list(builds[0].glob("*.so"))) == 1


def test_build_key_tracks_sources_and_settings(monkeypatch):
    key = _build.build_key(with_cuda=False)
    assert key == _build.build_key(with_cuda=False)
    if (_build.source_dir() / "sgs_cuda.cu").exists():
        assert key != _build.build_key(with_cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert key != _build.build_key(with_cuda=False)


def test_extension_compiles_cuda_sources_when_possible(monkeypatch):
    """CI has the CUDA build of torch and nvcc but no GPU: the extension it loads must still have
    compiled the CUDA kernel, so that a kernel that does not build never lands."""
    monkeypatch.setenv("SGS_BACKEND", "ext")
    info = _build.backend_info("cpu")
    assert info["implementation"] == "extension (cpu)"
    expected = _build.cuda_build_possible() and os.environ.get("SGS_BUILD_CUDA", "auto") != "0"
    assert info["cuda_kernel_built"] == expected
    assert bool(torch.ops.sgs.cuda_enabled()) == expected


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
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("extension (cpu)"), proc.stdout + proc.stderr
