"""The ladder of CUDA paths on a GPU: every path against the float64 reference on every shape,
and the paths against each other. Skipped without a GPU (they run in benchmarks/gpu_check.sh).

Paths (``sgs_cuda.backend_info("cuda")`` names them): ``dx`` the cuFFTDx kernel (instantiated
sizes, float32/float16/bfloat16, the update and the diagnostic sums, sm_90; 128x128 on a 2-CTA
cluster), ``portable`` the fused shared-memory kernel, ``cufft`` cuFFT plus the bins kernel. A path
that cannot take a case is skipped for it, except that ``dx`` must take every instantiated size
when it was built. Each comparison runs ``sgs::surgery`` and ``sgs::surgery_stats`` (the DM loop's
op: the update and the four sums).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from sgs_cuda import _build, selfcheck, sgs_reference, spectral_gradient_surgery
from sgs_inputs import separated_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PATHS = ("dx", "portable", "cufft")
# [D, N, C, H, W]: the benchmark sizes (small N), the pairs, ragged plane groups, odd sizes.
SHAPES = [(3, 4, 3, 28, 28), (3, 5, 3, 32, 32), (4, 3, 3, 64, 64), (4, 2, 3, 128, 128), (2, 3, 2, 32, 64),
          (3, 3, 1, 64, 32), (2, 3, 1, 64, 128), (3, 2, 1, 128, 64), (5, 3, 1, 32, 32), (1, 3, 2, 32, 32),
          (1, 2, 1, 128, 128), (3, 2, 2, 28, 32), (3, 2, 1, 30, 30), (3, 2, 1, 33, 31)]
DX_SIZES = {(28, 28), (32, 32), (64, 64), (32, 64), (64, 32), (128, 128), (64, 128), (128, 64)}
PARAMS = dict(tau=1.0, rho=0.25, alpha=1.0, beta=0.5)


@pytest.fixture(scope="module")
def ext():
    if not _build.use_extension(torch.device("cuda")):
        pytest.skip(f"CUDA extension unavailable: {_build.backend_info('cuda')}")
    yield
    _build.set_cuda_path("auto")


def run(path, grads, assign, mask="hard", op="surgery"):
    _build.set_cuda_path(path)
    try:
        return getattr(torch.ops.sgs, op)(grads, assign, PARAMS["tau"], PARAMS["rho"], PARAMS["alpha"], PARAMS["beta"],
                                          mask)
    except RuntimeError as exc:
        if f"SGS_CUDA_PATH={path}" in str(exc):
            if path == "dx" and _build._state["dx"] and tuple(grads.shape[3:]) in DX_SIZES and grads.dtype != torch.float64:
                raise  # dx was built and must take its sizes
            pytest.skip(f"{path} does not take this case: {str(exc).splitlines()[0]}")
        raise
    finally:
        _build.set_cuda_path("auto")


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_path_matches_float64_reference(ext, path, shape, mask):
    grads = separated_grads(*shape, rho=PARAMS["rho"], seed=sum(shape))
    assign = torch.arange(shape[1]) % shape[0]
    ref, _, _, _, ref_stats = sgs_reference(grads, assign, **PARAMS, mask=mask, return_parts=True)
    out = run(path, grads.float().cuda(), assign.cuda(), mask)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out.cpu(), ref) <= 1e-5, (path, shape, mask)
    update, stats = run(path, grads.float().cuda(), assign.cuda(), mask, op="surgery_stats")
    assert torch.equal(update, out), (path, shape, mask)  # the same kernel computes the sums on the side
    stats = stats.cpu()
    assert stats.dtype == torch.float64 and stats[1].item() == ref_stats[1].item()
    assert abs(stats[0].item() - ref_stats[0].item()) <= 4 * shape[1] * shape[2], (stats, ref_stats)
    for q in (2, 3):
        assert abs(stats[q].item() - ref_stats[q].item()) <= 1e-5 * ref_stats[3].item(), (q, stats, ref_stats)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (128, 128)])
def test_path_half_inputs_compute_in_float32(ext, path, dtype, hw):
    """Half inputs are loaded exactly into float32, computed in float32, rounded once."""
    grads = separated_grads(3, 4, 2, *hw, seed=5).to(dtype).cuda()
    assign = torch.tensor([0, 1, 2, 1]).cuda()
    out = run(path, grads, assign)
    ref32 = run(path, grads.float(), assign)
    assert out.dtype == dtype and torch.equal(out, ref32.to(dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_paths_agree(ext, shape):
    grads = separated_grads(*shape, seed=11).float().cuda()
    assign = (torch.arange(shape[1]) * 7 % shape[0]).cuda()
    outs = {}
    for path in PATHS:
        try:
            outs[path] = run(path, grads, assign)
        except pytest.skip.Exception:
            continue
    assert "cufft" in outs
    base = outs["cufft"].double()
    for path, out in outs.items():
        assert ((out.double() - base).abs().max() / base.abs().max()).item() <= 2e-6, path


def test_backend_info_names_the_paths(ext):
    info = _build.backend_info("cuda")
    assert info["implementation"] == "extension (cuda)"
    by_size = info["cuda_path_by_size"]
    assert set(by_size.values()) <= set(PATHS)
    if _build._state["dx"] and torch.cuda.get_device_capability() == (9, 0):
        assert all(by_size[f"{n}x{n}"] == "dx" for n in (28, 32, 64, 128)), by_size
        assert "128x128 (512 threads x 2 CTAs" in info["cuda_kernels"], info["cuda_kernels"]


def test_dx_random_inputs_and_graph_capture(ext):
    """dx on plain random inputs (masks may flip within rounding of a threshold, so the check is
    against the float32 portable/cuFFT result up to those flips) and under CUDA graph capture."""
    if not _build._state["dx"]:
        pytest.skip("dx kernel not built")
    g = torch.randn(4, 64, 3, 32, 32, device="cuda")
    a = torch.randint(0, 4, (64,), device="cuda")
    eager = run("dx", g, a)
    other = run("cufft", g, a)
    assert ((eager - other).abs() > 1e-3 * other.abs().max()).float().mean().item() < 0.01
    _build.set_cuda_path("dx")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.5, "hard")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.5, "hard")
    graph.replay()
    torch.cuda.synchronize()
    _build.set_cuda_path("auto")
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("shape", [(4, 500, 3, 32, 32), (3, 150, 3, 128, 128), (2, 40, 3, 28, 28)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dx_persistent_grid_many_planes(ext, shape):
    """More plane groups than resident CTAs (clusters at 128x128): each CTA loops over groups, the
    next group's first domain prefetched; every plane must match the cuFFT path."""
    if not _build._state["dx"]:
        pytest.skip("dx kernel not built")
    grads = separated_grads(*shape, rho=PARAMS["rho"], seed=3).float().cuda()
    assign = (torch.arange(shape[1]) % shape[0]).cuda()
    update, stats = run("dx", grads, assign, op="surgery_stats")
    ref_update, ref_stats = run("cufft", grads, assign, op="surgery_stats")
    assert rel_err(update, ref_update.double()) <= 2e-6
    assert stats[1].item() == ref_stats[1].item()
    assert abs(stats[0].item() - ref_stats[0].item()) <= 4 * shape[1] * shape[2]
    torch.testing.assert_close(stats[2:], ref_stats[2:], rtol=1e-5, atol=0)


@pytest.mark.parametrize("hw", [(32, 32), (128, 128)])
def test_dx_stats_under_graph_capture(ext, hw):
    """The DM loop's op on the dx path (a cluster launch at 128x128) captured and replayed: the same
    update bit for bit, the same sums up to the order of the per-CTA atomic additions."""
    if not _build._state["dx"]:
        pytest.skip("dx kernel not built")
    g = separated_grads(3, 6, 3, *hw, seed=6).float().cuda()
    a = torch.tensor([0, 1, 2, 2, 1, 0], device="cuda")
    eager = run("dx", g, a, op="surgery_stats")
    _build.set_cuda_path("dx")
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.ops.sgs.surgery_stats(g, a, 1.0, 0.25, 1.0, 0.5, "hard")
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = torch.ops.sgs.surgery_stats(g, a, 1.0, 0.25, 1.0, 0.5, "hard")
        graph.replay()
        torch.cuda.synchronize()
    finally:
        _build.set_cuda_path("auto")
    assert torch.equal(captured[0], eager[0])
    torch.testing.assert_close(captured[1], eager[1], rtol=1e-12, atol=0)


# --- the first-use self-check on the real paths (tests/test_selfcheck.py: its logic on the CPU) ---

CHECK_PARAMS = (PARAMS["tau"], PARAMS["rho"], PARAMS["alpha"], PARAMS["beta"], "hard")


def clear_disabled():
    torch.ops.sgs.disable_cuda_path(0, 0, 0, 0, torch.float32, "")


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (128, 128), (30, 30)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype, outputs", [(torch.float32, "stats"), (torch.bfloat16, "update"),
                                            (torch.float32, "parts"), (torch.float64, "update")])
def test_self_check_passes_on_every_path(ext, hw, dtype, outputs):
    for path in PATHS:
        checker = selfcheck.SelfCheck(selfcheck._Fresh())
        _build.set_cuda_path(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                checker.route(torch.empty(3, 3, 3, *hw, dtype=dtype, device="cuda"), outputs, CHECK_PARAMS)
        except RuntimeError as exc:
            if "SGS_CUDA_PATH" in str(exc) and "self-check" not in str(exc):
                continue  # the path does not take this case
            raise
        finally:
            _build.set_cuda_path("auto")
        assert all(v.ok for v in checker.verdicts.values()), (path, checker.report())


def test_self_check_disables_a_wrong_path_in_the_dispatch(ext):
    """A fault injected into the first path's result on the GPU: it is disabled in the C++
    dispatch for that class only, and the op then takes the next path, which agrees."""
    g = separated_grads(3, 3, 3, 32, 32, seed=2).float().cuda()
    a = torch.tensor([0, 2, 1], device="cuda")
    first = str(torch.ops.sgs.cuda_path(g, False))

    class WrongFirst(selfcheck._Fresh):
        def run(self, grads, assign, outputs, params):
            out = super().run(grads, assign, outputs, params)
            return (out[0] * 1.01, out[1]) if self.choose(grads, outputs) == first else out

    try:
        checker = selfcheck.SelfCheck(WrongFirst())
        with pytest.warns(RuntimeWarning, match=f"the {first} CUDA path failed its self-check for 32x32 D=3"):
            assert checker.route(g, "stats", CHECK_PARAMS) == "ext"
        after = str(torch.ops.sgs.cuda_path(g, False))
        assert after != first and after == selfcheck.LADDER[selfcheck.LADDER.index(first) + 1]
        assert str(torch.ops.sgs.cuda_path(g[:2], False)) == first  # another D: not disabled
        ref = sgs_reference(g.double(), a, *CHECK_PARAMS)
        assert rel_err(torch.ops.sgs.surgery(g, a, *CHECK_PARAMS), ref) <= 1e-5
    finally:
        clear_disabled()


def test_public_op_is_checked_on_first_use(ext, monkeypatch):
    monkeypatch.setenv("SGS_SELF_CHECK", "1")
    g = separated_grads(3, 4, 3, 64, 64, seed=4).float().cuda()
    spectral_gradient_surgery(g, torch.tensor([0, 1, 2, 0], device="cuda"), return_diagnostics=True)
    verdicts = selfcheck.report()["verdicts"]
    path = str(torch.ops.sgs.cuda_path(g, False))
    assert verdicts[f"64x64 D=3 float32 stats hard: {path}"].startswith("pass"), verdicts
    assert "self_check" in _build.backend_info("cuda")


def test_more_than_127_domains_take_cufft_on_every_path(ext):
    """The dx kernel's packed sign counts hold 32767, the portable kernel's 127: one limit, 127."""
    g = separated_grads(128, 2, 1, 32, 32, seed=8).float().cuda()
    a = torch.tensor([5, 127], device="cuda")
    assert str(torch.ops.sgs.cuda_path(g, False)) == "cufft"
    for path in ("dx", "portable"):
        _build.set_cuda_path(path)
        try:
            with pytest.raises(RuntimeError, match=rf"SGS_CUDA_PATH={path} but .*D ?= ?128"):
                torch.ops.sgs.surgery(g, a, *CHECK_PARAMS)
        finally:
            _build.set_cuda_path("auto")
    ref = sgs_reference(g.double(), a, *CHECK_PARAMS)
    assert rel_err(torch.ops.sgs.surgery(g, a, *CHECK_PARAMS).cpu(), ref.cpu()) <= 1e-5


CAPTURE = textwrap.dedent("""
    import sys, torch
    from sgs_cuda import _build, spectral_gradient_surgery
    path, H = sys.argv[1], int(sys.argv[2])
    assert _build.use_extension(torch.device("cuda"))  # the library loads; no kernel has run yet
    _build.set_cuda_path(path)
    g = torch.randn(3, 4, 2, H, H, device="cuda")
    a = torch.arange(4, device="cuda") % 3
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the first call of this size, inside the capture
        out = torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")), "replay differs"
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            spectral_gradient_surgery(torch.randn(3, 4, 2, 16, 16, device="cuda"), a)
    except RuntimeError as exc:
        assert "cannot run inside CUDA graph capture" in str(exc), exc
        print("refused:", exc)
    print("captured without warm-up:", path, H)
""")


@pytest.mark.parametrize("path, hw", [("dx", 32), ("dx", 128), ("portable", 32), ("portable", 128)])
def test_first_call_inside_graph_capture(ext, path, hw):
    """No warm-up: the kernel attributes and occupancy queries of a new size are set up inside the
    capture (a fresh process, so nothing is cached), and the public op refuses its self-check there."""
    if path == "dx" and not _build._state["dx"]:
        pytest.skip("dx kernel not built")
    env = {**os.environ, "SGS_SELF_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPTURE, path, str(hw)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "captured without warm-up" in proc.stdout, proc.stderr[-3000:]


def test_dx_answer_is_per_device(ext):
    """Whether dx runs is asked of the device itself, whichever device is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    g = torch.empty(3, 1, 1, 32, 32, device="cuda:1")
    with torch.cuda.device(0):
        from_other = str(torch.ops.sgs.cuda_path(g, False))
    with torch.cuda.device(1):
        assert str(torch.ops.sgs.cuda_path(g, False)) == from_other
