"""``sgs::surgery_stats`` (the update and the four diagnostic sums, no parts) and its wiring:
``spectral_gradient_surgery(..., return_diagnostics=True)`` and the fast step of
``SpectralGradientSurgery``, whose parts are computed only when they are read.

The CUDA paths of the op are compared with the reference in tests/test_cuda_paths.py (GPU).
"""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import SGSConfig, SpectralGradientSurgery, _build, sgs_reference, spectral_gradient_surgery
from sgs_cuda.ops import SGSUpdate
from sgs_cuda.surgery import StepParts
from sgs_inputs import separated_grads

ARGS = (1.0, 0.25, 1.0, 0.5)


@pytest.fixture
def ext(monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "ext")
    assert _build.use_extension(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 16, 12), (2, 3, 1, 28, 28), (4, 1, 3, 15, 9)])
def test_stats_op_is_the_parts_op_without_parts(ext, device, dtype, mask, shape):
    grads = torch.randn(shape, dtype=dtype, device=device)
    assign = torch.randint(0, shape[0], (shape[1],), device=device)
    update, stats = torch.ops.sgs.surgery_stats(grads, assign, *ARGS, mask)
    parts = torch.ops.sgs.surgery_parts(grads, assign, *ARGS, mask)
    assert update.dtype == dtype and update.shape == shape[1:] and stats.dtype == torch.float64
    assert stats.shape == (4,) and stats.device == grads.device
    if device.type == "cpu":  # the same kernel: bit for bit
        assert torch.equal(update, parts[0]) and torch.equal(stats, parts[4])
    else:  # the dx kernel where it applies, the portable one for the parts
        torch.testing.assert_close(update, parts[0], rtol=1e-4, atol=1e-5 * parts[0].abs().max().item())
        assert stats[1] == parts[4][1] and abs(stats[0] - parts[4][0]) <= 4 * shape[1] * shape[2]
        torch.testing.assert_close(stats[2:], parts[4][2:], rtol=1e-5, atol=0)


@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_stats_match_the_float64_reference(ext, device, mask):
    grads = separated_grads(3, 4, 2, 32, 32, rho=0.25, seed=4)
    assign = torch.tensor([0, 2, 1, 1])
    ref = sgs_reference(grads, assign, *ARGS, mask, return_parts=True)
    update, stats = torch.ops.sgs.surgery_stats(grads.float().to(device), assign.to(device), *ARGS, mask)
    assert ((update.cpu().double() - ref[0]).abs().max() / ref[0].abs().max()).item() < 1e-5
    assert stats[1].item() == ref[4][1].item()
    assert abs(stats[0].item() - ref[4][0].item()) <= 4 * 4 * 2
    torch.testing.assert_close(stats[2:].cpu(), ref[4][2:], rtol=1e-5, atol=0)


def test_stats_op_empty_batch(ext, device):
    update, stats = torch.ops.sgs.surgery_stats(torch.zeros(3, 0, 2, 8, 8, device=device),
                                                torch.zeros(0, dtype=torch.long, device=device), *ARGS, "hard")
    assert update.shape == (0, 2, 8, 8) and torch.equal(stats.cpu(), torch.zeros(4, dtype=torch.float64))


def test_opcheck(ext, device):
    """Schema, fake kernel, autograd registration and AOT dispatch (an input that requires grad)."""
    grads = separated_grads(3, 2, 2, 8, 10, seed=7).float().to(device)
    assign = torch.tensor([0, 2], device=device)
    torch.library.opcheck(torch.ops.sgs.surgery_stats, (grads, assign, *ARGS, "hard"))
    torch.library.opcheck(torch.ops.sgs.surgery_stats, (grads.clone().requires_grad_(), assign, *ARGS, "hard"))


def test_gradient_is_the_update_ops_gradient(ext, device):
    grads = separated_grads(3, 2, 2, 8, 8, seed=8).float().to(device)
    assign = torch.tensor([1, 0], device=device)
    weights = torch.randn(2, 2, 8, 8, device=device)
    g1, g2 = grads.clone().requires_grad_(), grads.clone().requires_grad_()
    update, stats = torch.ops.sgs.surgery_stats(g1, assign, *ARGS, "hard")
    assert not stats.requires_grad
    (update * weights).sum().backward()
    (torch.ops.sgs.surgery(g2, assign, *ARGS, "hard") * weights).sum().backward()
    torch.testing.assert_close(g1.grad, g2.grad)


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_return_diagnostics(device, backend, monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", backend)
    grads = torch.randn(3, 5, 2, 16, 16, device=device)
    assign = torch.randint(0, 3, (5,), device=device)
    out = spectral_gradient_surgery(grads, assign, return_diagnostics=True)
    parts = spectral_gradient_surgery(grads, assign, return_parts=True)
    assert isinstance(out, SGSUpdate) and set(out.diagnostics) == {"mask_fraction", "shared_energy"}
    torch.testing.assert_close(out.update, parts.update, rtol=1e-4, atol=1e-5)
    for k, v in out.diagnostics.items():
        assert v.dtype == torch.float64 and v.dim() == 0
        torch.testing.assert_close(v, parts.diagnostics[k], rtol=1e-6, atol=0)
    # return_parts wins; normalize needs the parts and still says what it applied
    assert isinstance(spectral_gradient_surgery(grads, assign, return_parts=True, return_diagnostics=True),
                      type(parts))
    norm = spectral_gradient_surgery(grads, assign, normalize="dm_norm", return_diagnostics=True)
    assert isinstance(norm, SGSUpdate) and "update_scale" in norm.diagnostics


def test_return_diagnostics_with_rescaled_planes(ext):
    """Planes far outside float32's safe range take the exact power-of-two rescaling: the sums of
    the rescaled batches combine to the same diagnostics as the parts path."""
    grads = separated_grads(3, 4, 1, 16, 16, seed=2).float()
    grads[:, 1] *= 1e30
    grads[:, 2] *= 1e-30
    assign = torch.tensor([0, 1, 2, 0])
    out = spectral_gradient_surgery(grads, assign, rho=0.25, return_diagnostics=True)
    parts = spectral_gradient_surgery(grads, assign, rho=0.25, return_parts=True)
    assert torch.equal(out.update, parts.update)
    for k in out.diagnostics:
        torch.testing.assert_close(out.diagnostics[k], parts.diagnostics[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("assignment", ["random", "fixed"])
@pytest.mark.parametrize("normalize", ["none", "dm_norm"])
def test_dm_step_uses_the_fast_op_and_recomputes_parts_on_demand(device, backend, assignment, normalize,
                                                                   monkeypatch):
    """The DM loop's step: the same update and diagnostics as with the parts (the same random
    assignment draw), and the parts, when read, those of the same inputs and assignment."""
    monkeypatch.setenv("SGS_BACKEND", backend)
    grads = torch.randn(3, 6, 2, 16, 16, device=device)
    sgs = SpectralGradientSurgery(SGSConfig(assignment=assignment, rho=0.25, normalize=normalize))
    torch.manual_seed(5)
    update = sgs(grads)
    assert isinstance(sgs.last, StepParts) and sgs.last._parts is None
    torch.manual_seed(5)
    assign = sgs.assignment(3, 6, grads.device)
    # draws as the step did
    expected = spectral_gradient_surgery(grads, assign, rho=0.25, normalize=normalize, return_parts=True)
    if device.type == "cpu" and normalize == "none":
        assert torch.equal(update, expected.update)
    else:
        torch.testing.assert_close(update, expected.update, rtol=1e-4, atol=1e-5)
    for k, v in expected.diagnostics.items():
        torch.testing.assert_close(sgs.last.diagnostics[k], v, rtol=1e-6, atol=0)
    for name in ("mean", "shared", "diversity"):
        torch.testing.assert_close(getattr(sgs.last, name), getattr(expected, name))
    assert sgs.last._compute is None  # computed once, the gradients released


@pytest.mark.parametrize("config", [SGSConfig(space="spatial"), SGSConfig(normalize="kept_fraction")])
def test_dm_step_keeps_the_parts_where_they_are_computed_anyway(config):
    grads = torch.randn(3, 4, 1, 8, 8)
    sgs = SpectralGradientSurgery(config)
    sgs(grads)
    assert not isinstance(sgs.last, StepParts) and sgs.last.diversity.shape == (4, 1, 8, 8)


def test_dm_loop_asks_for_the_parts_only_at_band_iterations(monkeypatch):
    """The distillation loop's step runs the op without parts (its fastest path) except at the
    iterations that log the band diagnostics, which need the diversity part."""
    from sgs_cuda import ops
    from sgs_cuda.dm import DistillConfig, distill
    from tiny_domains import TinyDomains

    calls, kernel = [], ops._spectral_kernel

    def spy(grads, assign, outputs, params):
        calls.append(outputs)
        return kernel(grads, assign, outputs, params)

    monkeypatch.setattr(ops, "_spectral_kernel", spy)
    cfg = DistillConfig(method="dm_sgs", ipc=1, iterations=4, batch_real=4, width=8, depth=2, log_every=2)
    distill(TinyDomains(), ["d0", "d1"], cfg, progress=False)
    assert calls == [ops.STATS, ops.PARTS, ops.STATS, ops.PARTS]
