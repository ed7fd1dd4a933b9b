"""The SGS operator: every implementation against the float64 reference, the spec's invariants
(section 4), op registration (opcheck, torch.compile) and the input errors.

Implementations: ``ext`` (the compiled ``sgs::surgery``, CPU and, when a GPU is present, CUDA)
and ``torch`` (the pure-torch fallback), selected with ``SGS_BACKEND``.
"""
from __future__ import annotations

import math

import pytest
import torch
try:  # the GPU machines may lack hypothesis: only the fuzz test needs it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    HealthCheck, st = None, None

import sgs_cuda
from sgs_cuda import SGSConfig, SpectralGradientSurgery, domain_gradients, sgs_reference, spectral_gradient_surgery
from sgs_cuda import _build
from sgs_inputs import DEVICES, IMPLS, separated_grads

# The comparisons run at the spec's initial thresholds (tau 1, rho 0.25), where both conditions
# of the hard mask are live; the op's default rho = 0 switches the magnitude one off.
SPEC_RHO = 0.25


def surgery(grads, assign=None, **kw):
    return spectral_gradient_surgery(grads, assign, **{"rho": SPEC_RHO, **kw})


SIZES = [1, 7, 28, 32, 33, 64, 128]


def reference64(grads, assign, **kw):
    """The ground truth: the torch reference in float64 on the (possibly rounded) input."""
    kw = {**dict(tau=1.0, rho=0.25, alpha=1.0, beta=0.25, mask="hard"), **kw}
    return sgs_reference(grads.cpu().double(), assign.cpu(), kw["tau"], kw["rho"], kw["alpha"], kw["beta"],
                         kw["mask"], return_parts=True)


def rel_err(a, b):
    a, b = a.cpu().double(), b.cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def shape_cases():
    # every size in SIZES as H and as W at least once, odd and even, D from 1 to 6
    cases = [(3, 2, 2, s, s) for s in SIZES]
    cases += [(1, 3, 1, 7, 28), (2, 2, 3, 32, 33), (4, 1, 2, 33, 7), (5, 2, 1, 28, 64), (6, 1, 1, 64, 32),
              (2, 1, 1, 128, 1), (3, 1, 2, 1, 128), (4, 2, 3, 32, 28)]
    return cases


# --- implementations against the float64 reference ----------------------------------------------

@pytest.mark.parametrize("shape", shape_cases(), ids=str)
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_float64_matches_reference(impl, device, shape, mask):
    grads = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))
    assign = torch.randint(0, shape[0], (shape[1],))
    out = surgery(grads.to(device), assign.to(device), mask=mask, return_parts=True)
    ref = reference64(grads, assign, mask=mask)
    for got, want in zip(out[:4], ref[:4]):
        assert got.dtype == torch.float64 and got.device.type == device.type
        assert rel_err(got, want) < 1e-12
    stats = ref[4]
    assert out.diagnostics["mask_fraction"].item() == pytest.approx((stats[0] / stats[1]).item(), abs=1e-12)
    assert out.diagnostics["shared_energy"].item() == pytest.approx((stats[2] / stats[3]).item(), rel=1e-9)


@pytest.mark.parametrize("shape", shape_cases(), ids=str)
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_float32_matches_float64_reference(impl, device, shape, mask):
    grads = separated_grads(*shape, seed=len(shape) + shape[-1])
    assign = torch.randint(0, shape[0], (shape[1],), generator=torch.Generator().manual_seed(1))
    out = surgery(grads.float().to(device), assign.to(device), mask=mask, return_parts=True)
    ref = reference64(grads.float(), assign, mask=mask)
    assert out.update.dtype == torch.float32
    for got, want in zip(out[:4], ref[:4]):
        assert rel_err(got, want) < 1e-5
    if mask == "hard":  # the separated input leaves no mask decision to rounding
        stats = ref[4]
        assert out.diagnostics["mask_fraction"].item() == pytest.approx((stats[0] / stats[1]).item(), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 3, 32, 32), (2, 2, 1, 28, 33), (4, 1, 2, 7, 64)], ids=str)
def test_half_precision_inputs(impl, device, dtype, shape):
    grads = separated_grads(*shape, seed=3).to(dtype)
    assign = torch.randint(0, shape[0], (shape[1],))
    out = surgery(grads.to(device), assign.to(device))
    assert out.dtype == dtype
    ref = reference64(grads, assign)[0]
    # computed in float32; the only extra error is rounding the result to the output dtype
    tol = 4 * torch.finfo(dtype).eps
    assert rel_err(out, ref) < tol


if st is None:  # pragma: no cover
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_fuzz_shapes_and_dtypes():
        pass
else:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(D=st.integers(1, 6), N=st.integers(0, 3), C=st.integers(1, 3), H=st.integers(1, 40), W=st.integers(1, 40),
           dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
           mask=st.sampled_from(["hard", "soft"]), tau=st.sampled_from([0.0, 0.5, 1.0]),
           rho=st.sampled_from([0.2, 0.25, 0.5]), seed=st.integers(0, 2**16))
    def test_fuzz_shapes_and_dtypes(D, N, C, H, W, dtype, mask, tau, rho, seed):
        grads = separated_grads(D, N, C, H, W, rho=rho, margin=0.08, seed=seed).to(dtype)
        assign = torch.randint(0, D, (N,), generator=torch.Generator().manual_seed(seed))
        kw = dict(tau=tau, rho=rho, alpha=0.7, beta=0.4, mask=mask)
        ref = reference64(grads, assign, **kw)[0]
        tol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        for backend in IMPLS:
            for device in DEVICES:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("SGS_BACKEND", backend)
                    out = surgery(grads.to(device), assign.to(device), **kw)
                assert out.shape == (N, C, H, W) and out.dtype == dtype
                if N:
                    assert rel_err(out, ref) < tol, (backend, device)


def test_non_contiguous_input(impl, device):
    base = torch.randn(2, 5, 3, 16, 20, dtype=torch.float64, device=device)
    grads = base.permute(0, 2, 1, 3, 4)[:, ::2]  # [2, 2, 5, 16, 20], non-contiguous
    assert not grads.is_contiguous()
    assign = torch.tensor([1, 0], device=device)
    out = surgery(grads, assign)
    assert rel_err(out, reference64(grads.contiguous(), assign)[0]) < 1e-12


def test_empty_batch(impl, device):
    grads = torch.randn(3, 0, 2, 8, 8, device=device)
    out = surgery(grads, return_parts=True)
    assert out.update.shape == (0, 2, 8, 8) and out.shared.shape == (0, 2, 8, 8)
    assert out.diagnostics["mask_fraction"].item() == 0


# --- invariants of spec section 4 --------------------------------------------------------------

def test_alpha_beta_zero_is_plain_dm(impl, device):
    grads = torch.randn(4, 6, 3, 32, 32, device=device)
    out = surgery(grads, alpha=0.0, beta=0.0)
    torch.testing.assert_close(out, grads.mean(0), atol=1e-5, rtol=1e-5)


def test_single_domain(impl, device):
    grads = torch.randn(1, 4, 2, 28, 28, dtype=torch.float64, device=device)
    out = surgery(grads, alpha=0.6, return_parts=True)
    torch.testing.assert_close(out.update, 1.6 * grads[0], atol=1e-12, rtol=1e-12)
    assert out.diversity.abs().max().item() < 1e-12
    # every non-zero component kept; the zero ones are the imaginary parts of self-conjugate bins
    kept = out.diagnostics["mask_fraction"].item() * 2 * 28 * 15
    assert kept == pytest.approx(2 * 28 * 15 - 4, abs=1e-6)


def test_scale_invariance(impl, device):
    grads = torch.randn(3, 4, 2, 32, 32, dtype=torch.float64, device=device)
    assign = torch.randint(0, 3, (4,), device=device)
    base = surgery(grads, assign, return_parts=True)
    scaled = surgery(grads * 7.5, assign, return_parts=True)
    assert scaled.diagnostics["mask_fraction"].item() == base.diagnostics["mask_fraction"].item()
    torch.testing.assert_close(scaled.update, 7.5 * base.update, atol=1e-10, rtol=1e-10)


def test_domain_permutation(impl, device):
    grads = torch.randn(4, 5, 2, 16, 16, dtype=torch.float64, device=device)
    assign = torch.randint(0, 4, (5,), device=device)
    perm = torch.tensor([2, 0, 3, 1], device=device)  # new domain i is old domain perm[i]
    relabel = torch.argsort(perm)  # old domain d is new domain relabel[d]
    out = surgery(grads, assign)
    out_perm = surgery(grads[perm], relabel[assign])
    torch.testing.assert_close(out_perm, out, atol=1e-12, rtol=1e-12)


def test_random_assignment_is_seeded_and_diversity_averages_out(impl, device):
    grads = torch.randn(3, 2, 1, 16, 16, dtype=torch.float64, device=device)
    torch.manual_seed(123)
    a = surgery(grads)
    torch.manual_seed(123)
    b = surgery(grads)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    draws = torch.stack([surgery(grads, return_parts=True).diversity for _ in range(1500)])
    single = draws[0].norm()
    assert draws.mean(0).norm() < 0.1 * single  # expectation is exactly zero; 1/sqrt(1500) ~ 0.026
    assert draws.std(0).norm() > 0.5 * single  # and each draw really is a random domain's deviation


def test_parts_add_up(impl, device):
    grads = torch.randn(3, 4, 3, 28, 33, device=device)
    out = surgery(grads, alpha=0.8, beta=0.3, return_parts=True)
    torch.testing.assert_close(out.update, out.mean + 0.8 * out.shared + 0.3 * out.diversity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean, grads.mean(0), atol=1e-6, rtol=1e-6)


def full_spectrum_surgery(grads, assign, tau=1.0, rho=0.25, alpha=1.0, beta=0.25):
    """The same surgery on the full fft2 (not the half spectrum), float64."""
    F = torch.fft.fft2(grads.double())
    D = F.shape[0]
    a_re, a_im = torch.sign(F.real).sum(0).abs() / D, torch.sign(F.imag).sum(0).abs() / D
    mag = F.abs()
    m = torch.where(mag.amax(0) > 0, mag.amin(0) / mag.amax(0).clamp_min(1e-300), 0)
    M_re, M_im = ((a_re >= tau) & (m >= rho)).double(), ((a_im >= tau) & (m >= rho)).double()
    mean = F.mean(0)
    dev = F[assign, torch.arange(F.shape[1])] - mean
    upd = mean + alpha * torch.complex(M_re * mean.real, M_im * mean.imag) + \
        beta * torch.complex((1 - M_re) * dev.real, (1 - M_im) * dev.imag)
    return torch.fft.ifft2(upd)


@pytest.mark.parametrize("H,W", [(16, 16), (15, 17), (28, 33)])
def test_half_spectrum_equals_full_spectrum(impl, device, H, W):
    grads = separated_grads(3, 2, 2, H, W, seed=5)
    assign = torch.tensor([2, 0])
    full = full_spectrum_surgery(grads, assign)
    assert full.imag.abs().max() < 1e-12  # the masked full spectrum stays Hermitian
    out = surgery(grads.to(device), assign.to(device))
    assert rel_err(out, full.real) < 1e-12


def test_identical_domains_fully_agree(impl, device):
    one = torch.randn(1, 3, 2, 32, 32, dtype=torch.float64, device=device)
    out = surgery(one.expand(4, -1, -1, -1, -1), return_parts=True)
    H, Wr = 32, 17
    # all components except the 4 always-zero imaginary parts of self-conjugate bins per plane
    assert out.diagnostics["mask_fraction"].item() == pytest.approx(1 - 4 / (2 * H * Wr))
    torch.testing.assert_close(out.diversity, torch.zeros_like(out.diversity), atol=1e-12, rtol=0)


# rho = 0.25: the spec's figures; rho = 0 (sign agreement only): all D signs equal, 2 / 2**D
@pytest.mark.parametrize("D,rho,expected", [(3, 0.25, 0.19), (4, 0.25, 0.08), (3, 0.0, 0.25), (4, 0.0, 0.125)])
def test_agreement_statistics(impl, device, D, rho, expected):
    gen = torch.Generator().manual_seed(D)
    noise = torch.randn(D, 32, 3, 32, 32, generator=gen).to(device)
    frac = surgery(noise, rho=rho, return_parts=True).diagnostics["mask_fraction"].item()
    assert frac == pytest.approx(expected, abs=0.015)  # independent noise: few agree
    shared = torch.randn(1, 32, 3, 32, 32, generator=gen).to(device)
    frac = surgery(shared + 0.1 * noise, rho=rho, return_parts=True).diagnostics["mask_fraction"].item()
    assert frac > 0.85  # shared signal plus small per-domain noise: most agree


# --- registration, compile, backends -----------------------------------------------------------

@pytest.mark.parametrize("op", ["surgery", "surgery_parts"])
def test_opcheck(device, op, monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "ext")
    assert _build.use_extension(device)
    grads = torch.randn(3, 2, 2, 8, 10, device=device)
    assign = torch.tensor([0, 2], device=device)
    torch.library.opcheck(getattr(torch.ops.sgs, op), (grads, assign, 1.0, 0.25, 1.0, 0.25, "hard"))


@pytest.mark.parametrize("return_parts", [False, True])
def test_torch_compile_without_graph_break(impl, device, return_parts):
    torch._dynamo.reset()
    grads = torch.randn(3, 4, 2, 16, 16, device=device)
    assign = torch.randint(0, 3, (4,), device=device)

    def step(g, a):
        out = surgery(g, a, return_parts=return_parts)
        return out.update * 2 if return_parts else out * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(grads, assign), step(grads, assign), atol=1e-5, rtol=1e-5)


def test_torch_compile_inductor(device, monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "ext")
    torch._dynamo.reset()
    grads, assign = torch.randn(2, 3, 1, 8, 8, device=device), torch.tensor([0, 1, 1], device=device)
    fn = torch.compile(lambda g, a: surgery(g, a) + 1, fullgraph=True)
    torch.testing.assert_close(fn(grads, assign), surgery(grads, assign) + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("shape", [(3, 4, 3, 32, 32), (4, 2, 3, 128, 128), (3, 2, 2, 30, 31)])
def test_cuda_graph_capture(impl, shape):
    """No host synchronisation inside the op: it can be captured in a CUDA graph and replayed."""
    grads = torch.randn(shape, device="cuda")
    assign = torch.randint(0, shape[0], shape[1:2], device="cuda")
    eager = surgery(grads, assign)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        surgery(grads, assign)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = surgery(grads, assign)
    grads.copy_(torch.randn_like(grads))
    graph.replay()
    torch.testing.assert_close(captured, surgery(grads, assign))
    assert not torch.equal(captured, eager)


def test_backend_info_and_forcing(monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "torch")
    assert sgs_cuda.backend_info()["implementation"] == "torch reference"
    monkeypatch.setenv("SGS_BACKEND", "ext")
    info = sgs_cuda.backend_info()
    assert info["implementation"] == "extension (cpu)", info
    monkeypatch.setenv("SGS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SGS_BACKEND must be one of"):
        sgs_cuda.backend_info()


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "auto")
    monkeypatch.setitem(_build._state, "loaded", False)
    monkeypatch.setitem(_build._state, "reason", "extension unavailable: no compiler (simulated)")
    monkeypatch.setitem(_build._state, "warned", False)
    grads = torch.randn(2, 2, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="pure-torch fallback.*no compiler"):
        out = surgery(grads, torch.tensor([0, 1]))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        surgery(grads, torch.tensor([0, 1]))
    torch.testing.assert_close(out, reference64(grads, torch.tensor([0, 1]))[0].float())
    assert "no compiler" in sgs_cuda.backend_info()["reason"]


# --- input errors ------------------------------------------------------------------------------

GOOD = torch.randn(3, 2, 1, 8, 8)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(grads=torch.randn(2, 1, 8, 8)), ValueError, r"shape \[D, N, C, H, W\].*4 dims"),
    (dict(grads=torch.randn(0, 2, 1, 8, 8)), ValueError, "D = 0"),
    (dict(grads=torch.ones(3, 2, 1, 8, 8, dtype=torch.int32)), TypeError, "floating-point.*int32"),
    (dict(grads=torch.ones(3, 2, 1, 8, 8, dtype=torch.complex64)), TypeError, "floating-point.*complex64"),
    (dict(grads=[[1.0]]), TypeError, "must be a torch.Tensor"),
    (dict(assign=torch.tensor([0, 1, 2])), ValueError, r"assign must have shape \[N\] = \[2\]"),
    (dict(assign=torch.tensor([0, 3])), ValueError, r"assign values must lie in \[0, D\) = \[0, 3\)"),
    (dict(assign=torch.tensor([-1, 0])), ValueError, r"assign values must lie in \[0, D\)"),
    (dict(assign=torch.tensor([0.0, 1.0])), TypeError, "assign must be an integer tensor"),
    (dict(assign=torch.tensor([0, 1], device="meta")), ValueError, "same device"),
    (dict(tau=1.5), ValueError, r"tau must lie in \[0, 1\], got 1.5"),
    (dict(rho=-0.1), ValueError, r"rho must lie in \[0, 1\], got -0.1"),
    (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
    (dict(mask="medium"), ValueError, "mask must be one of"),
    (dict(grads=GOOD.clone().index_put_((torch.tensor(1),), torch.tensor(float("nan")))), ValueError, "NaN or Inf"),
    (dict(grads=GOOD.clone().index_put_((torch.tensor(0),), torch.tensor(float("inf")))), ValueError, "NaN or Inf"),
])
def test_bad_input_errors(impl, kwargs, exc, match):
    args = {"grads": GOOD, "assign": torch.tensor([0, 1]), **kwargs}
    grads, assign = args.pop("grads"), args.pop("assign")
    with pytest.raises(exc, match=match):
        surgery(grads, assign, **args)


def test_nan_check_can_be_skipped(impl):
    grads = GOOD.clone()
    grads[0, 0, 0, 0, 0] = float("nan")
    out = surgery(grads, torch.tensor([0, 1]), check_finite=False)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()  # NaN stays in its image


def test_op_rejects_bad_input_directly(monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "ext")
    assert _build.use_extension(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="mask must be 'hard' or 'soft'"):
        torch.ops.sgs.surgery(GOOD, torch.tensor([0, 1]), 1.0, 0.25, 1.0, 0.25, "medium")
    with pytest.raises(RuntimeError, match=r"assign must have shape \[N\]"):
        torch.ops.sgs.surgery(GOOD, torch.tensor([0]), 1.0, 0.25, 1.0, 0.25, "hard")


@pytest.mark.parametrize("op", ["surgery", "surgery_stats", "surgery_parts"])
def test_op_rejects_out_of_range_assign_directly(monkeypatch, device, op):
    """Direct callers of torch.ops.sgs.*: one clear error on every device and CUDA path (the dx
    kernel used to clamp such a domain, the other paths to assert on the device)."""
    monkeypatch.setenv("SGS_BACKEND", "ext")
    if not _build.use_extension(torch.device(device)):
        pytest.skip("extension unavailable on this device")
    grads = torch.randn(3, 2, 1, 32, 32, device=device)
    try:
        for path in ["auto"] if device == "cpu" else ["dx", "portable", "cufft"]:
            if device == "cuda":
                _build.set_cuda_path(path)
            for bad in ([0, 3], [-1, 0]):
                with pytest.raises(ValueError, match=r"assign values must lie in \[0, D\) = \[0, 3\), got range"):
                    getattr(torch.ops.sgs, op)(grads, torch.tensor(bad, device=device), 1.0, 0.25, 1.0, 0.25, "hard")
    finally:
        if device == "cuda":
            _build.set_cuda_path("auto")


# --- the DM-loop helper ------------------------------------------------------------------------

def test_config_validation():
    args = SGSConfig().kernel_args(3)
    assert args.spec == (1.0, 0.0, 1.0, 0.25, "hard") and args.is_spec and SGSConfig().normalize == "none"
    with pytest.raises(ValueError, match="tau must lie in"):
        SGSConfig(tau=2.0)
    with pytest.raises(ValueError, match="assignment must be one of"):
        SGSConfig(assignment="sometimes")
    with pytest.raises(ValueError, match="mask must be one of"):
        SGSConfig(mask="x")


def _toy_domain_losses(syn):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(8, 8, affine=True),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    real = torch.randn(3, 5, 3, 12, 12)  # 3 domains, 5 real images each
    emb_syn = net(syn).mean(0)
    return torch.stack([((net(real[d]).mean(0) - emb_syn) ** 2).sum() for d in range(3)])


@pytest.mark.parametrize("mode", ["batched", "loop", "auto"])
def test_domain_gradients_match_separate_backward_passes(mode):
    syn = torch.randn(4, 3, 12, 12, requires_grad=True)
    losses = _toy_domain_losses(syn)
    batched = domain_gradients(losses, syn, mode)
    separate = torch.stack([torch.autograd.grad(losses[d], syn, retain_graph=True)[0] for d in range(3)])
    assert batched.shape == (3, 4, 3, 12, 12)
    torch.testing.assert_close(batched, separate, atol=1e-6, rtol=1e-5)


def test_surgery_backward_sets_grad_and_reduces_to_dm():
    syn = torch.randn(4, 3, 12, 12, requires_grad=True)
    losses = _toy_domain_losses(syn)
    dm_grad = torch.autograd.grad(losses.mean(), syn, retain_graph=True)[0]
    sgs = SpectralGradientSurgery(SGSConfig(alpha=0.0, beta=0.0))
    update = sgs.backward(losses, syn)
    torch.testing.assert_close(syn.grad, update)
    torch.testing.assert_close(update, dm_grad, atol=1e-5, rtol=1e-4)
    assert 0 <= sgs.last.diagnostics["mask_fraction"].item() <= 1


def test_fixed_assignment_is_round_robin():
    sgs = SpectralGradientSurgery(SGSConfig(assignment="fixed", beta=1.0, alpha=0.0, rho=SPEC_RHO))
    assert sgs.assignment(3, 7, "cpu").tolist() == [0, 1, 2, 0, 1, 2, 0]
    grads = torch.randn(3, 7, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(sgs(grads), surgery(grads, torch.arange(7) % 3, alpha=0.0, beta=1.0))


def test_defaults_are_the_documented_ones(impl, device):
    """The op's defaults (the sweep's choice, docs/RESULTS.md): tau 1, rho 0, alpha 1, beta 0.25, hard,
    no normalisation."""
    grads = torch.randn(3, 2, 2, 16, 16, dtype=torch.float64)
    assign = torch.tensor([2, 0])
    out = spectral_gradient_surgery(grads.to(device), assign.to(device))
    assert rel_err(out, reference64(grads, assign, rho=0.0)[0]) < 1e-12
    assert rel_err(out, reference64(grads, assign, rho=0.25)[0]) > 1e-6  # the default really differs
    assert SGSConfig().kernel_args(3).spec == (1.0, 0.0, 1.0, 0.25, "hard") and SGSConfig().normalize == "none"
