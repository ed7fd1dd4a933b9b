"""pytest-benchmark timings of sgs::surgery on CUDA: every CUDA path (dx, portable, cufft), the
op with the diagnostic sums (sgs::surgery_stats), the op as a DM loop calls it, the eager torch reference and torch.compile of the reference, at the
project's benchmark shapes (float32, hard mask).

    python -m pytest benchmarks/test_bench_cuda.py --benchmark-only --benchmark-json=out.json

Skipped without pytest-benchmark, a CUDA device or the CUDA build of the extension.
``benchmarks/bench_cuda.py`` is the stand-alone version (CUDA events, copy bandwidth, targets).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPES = [(3, 100, 3, 32, 32), (4, 100, 3, 64, 64), (4, 100, 3, 128, 128), (4, 1000, 3, 32, 32),
          (5, 500, 3, 128, 128), (4, 100, 3, 28, 28)]
OP_ARGS = (1.0, 0.25, 1.0, 0.25, "hard")


@pytest.fixture(scope="module")
def extension():
    from sgs_cuda import _build

    if not _build.use_extension(torch.device("cuda")):
        pytest.skip(f"CUDA extension unavailable: {_build.backend_info('cuda')}")
    return _build


@pytest.fixture(scope="module")
def compiled_reference():
    from sgs_cuda.reference import sgs_reference

    return torch.compile(sgs_reference, dynamic=False)


def _inputs(shape):
    torch.manual_seed(0)
    grads = torch.randn(shape, device="cuda")
    assign = torch.randint(0, shape[0], (shape[1],), device="cuda")
    return grads, assign


def _bench(benchmark, fn, shape):
    D, N, C, H, W = shape

    def run():
        fn()
        torch.cuda.synchronize()

    for _ in range(3):  # warm-up (and compilation for torch.compile)
        run()
    benchmark.extra_info["shape"] = list(shape)
    benchmark.extra_info["floor_bytes"] = (D + 1) * N * C * H * W * 4
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("path", ["dx", "portable", "cufft"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_path(benchmark, extension, shape, path):
    grads, assign = _inputs(shape)
    benchmark.group = "x".join(map(str, shape))
    extension.set_cuda_path(path)
    try:
        torch.ops.sgs.surgery(grads, assign, *OP_ARGS)
    except RuntimeError as exc:
        extension.set_cuda_path("auto")
        pytest.skip(str(exc).splitlines()[0])
    try:
        _bench(benchmark, lambda: torch.ops.sgs.surgery(grads, assign, *OP_ARGS), shape)
    finally:
        extension.set_cuda_path("auto")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stats_op(benchmark, extension, shape):
    """sgs::surgery_stats (the update and the diagnostic sums) on the auto path: the DM loop's op."""
    grads, assign = _inputs(shape)
    benchmark.group = "x".join(map(str, shape))
    _bench(benchmark, lambda: torch.ops.sgs.surgery_stats(grads, assign, *OP_ARGS), shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dm_loop_call(benchmark, extension, shape):
    """SpectralGradientSurgery with its defaults, as the distillation loop calls it."""
    from sgs_cuda import SpectralGradientSurgery

    grads, _ = _inputs(shape)
    benchmark.group = "x".join(map(str, shape))
    dm = SpectralGradientSurgery()
    _bench(benchmark, lambda: dm(grads), shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager_reference(benchmark, shape):
    from sgs_cuda.reference import sgs_reference

    grads, assign = _inputs(shape)
    benchmark.group = "x".join(map(str, shape))
    _bench(benchmark, lambda: sgs_reference(grads, assign, *OP_ARGS), shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_reference(benchmark, compiled_reference, shape):
    grads, assign = _inputs(shape)
    benchmark.group = "x".join(map(str, shape))
    _bench(benchmark, lambda: compiled_reference(grads, assign, *OP_ARGS), shape)
