"""Autograd through the op: the same gradient on every backend, the mask held fixed.

Given the mask and the assignment the op is linear in ``grads``; its gradient is that linear
map's adjoint (``sgs::surgery``'s registered backward, the torch reference's autograd). Checked
with ``torch.autograd.gradcheck`` in float64 on inputs away from the mask's decision boundaries
(where the hard mask is locally constant, so the frozen-mask gradient is the true one), against an
independent frozen-mask function for the soft mask, and through ``opcheck`` and ``torch.compile``.
"""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import _build, sgs_reference, spatial_gradient_surgery, spectral_gradient_surgery
from sgs_cuda.reference import agreement_mask, clear_self_conjugate_imag, magnitude_agreement, spectral_mask
from sgs_inputs import separated_grads

KW = dict(tau=1.0, rho=0.25, alpha=0.7, beta=0.4)
SHAPES = [(3, 2, 2, 6, 8), (2, 1, 2, 5, 7), (4, 2, 1, 8, 5)]


def parts_fn(assign, mask="hard", space="spectral", **kw):
    op = spatial_gradient_surgery if space == "spatial" else spectral_gradient_surgery

    def f(g):
        out = op(g, assign, mask=mask, return_parts=True, **{**KW, **kw})
        return out.update, out.mean, out.shared, out.diversity
    return f


def frozen_mask_surgery(grads, assign, mask, tau, rho, alpha, beta):
    """The op as the linear map it is for a fixed mask: the mask is computed once from ``grads``
    (no gradient), everything else is plain differentiable torch (update, mean, shared, diversity)."""
    D, N, C, H, W = grads.shape
    m_re, m_im = spectral_mask(clear_self_conjugate_imag(torch.fft.rfft2(grads.detach()), W), tau, rho, mask)

    def apply(g):
        spec = torch.fft.rfft2(g)
        mean = spec.mean(0)
        dev = spec[assign, torch.arange(N)] - mean
        shared = torch.complex(m_re * mean.real, m_im * mean.imag)
        diversity = torch.complex((1 - m_re) * dev.real, (1 - m_im) * dev.imag)
        inv = lambda x: torch.fft.irfft2(x, s=(H, W))  # noqa: E731
        return inv(mean + alpha * shared + beta * diversity), g.mean(0), inv(shared), inv(diversity)
    return apply


def frozen_mask_spatial(grads, assign, mask, tau, rho, alpha, beta):
    N = grads.shape[1]
    m = agreement_mask(grads, magnitude_agreement(grads.abs()), tau, rho, mask).detach()

    def apply(g):
        mean = g.mean(0)
        shared, diversity = m * mean, (1 - m) * (g[assign, torch.arange(N)] - mean)
        return mean + alpha * shared + beta * diversity, mean, shared, diversity
    return apply


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradcheck_hard_mask(impl, device, shape):
    grads = separated_grads(*shape, seed=sum(shape)).to(device).requires_grad_()
    assign = torch.randint(0, shape[0], (shape[1],), generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.autograd.gradcheck(parts_fn(assign), (grads,))
    update_only = lambda g: spectral_gradient_surgery(g, assign, **KW)  # noqa: E731  (sgs::surgery)
    assert torch.autograd.gradcheck(update_only, (grads,))


def test_gradcheck_spatial_hard_mask():
    grads = torch.randn(3, 2, 2, 5, 4, dtype=torch.float64, requires_grad=True,
                        generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(parts_fn(torch.tensor([2, 0]), space="spatial"), (grads,))


@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("space", ["spectral", "spatial"])
def test_gradient_is_the_frozen_mask_adjoint(impl, device, mask, space):
    """For both masks (the soft one's magnitude ratio included), the gradient of every output is
    that of the map with the mask computed once and held fixed."""
    shape = (3, 2, 2, 8, 6)
    grads = separated_grads(*shape, seed=2)
    assign = torch.tensor([1, 2])
    frozen = (frozen_mask_spatial if space == "spatial" else frozen_mask_surgery)(grads, assign, mask, **KW)
    g = grads.clone().requires_grad_()
    outs_want = frozen(g)
    weights = [torch.randn(shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    for subset in ([0], [0, 1, 2, 3], [2], [3], [1]):  # each output alone, and all together
        (want,) = torch.autograd.grad(sum((outs_want[i] * weights[i]).sum() for i in subset), g, retain_graph=True)
        gd = grads.to(device).requires_grad_()
        outs = parts_fn(assign.to(device), mask=mask, space=space)(gd)
        (got,) = torch.autograd.grad(sum((outs[i] * weights[i].to(device)).sum() for i in subset), gd)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)


def test_backends_give_the_same_gradient(device, monkeypatch):
    grads = separated_grads(3, 2, 2, 16, 12, seed=4).to(device)
    weights = torch.randn(2, 2, 16, 12, dtype=torch.float64).to(device)
    result = {}
    for backend in ("ext", "torch"):
        monkeypatch.setenv("SGS_BACKEND", backend)
        for mask in ("hard", "soft"):
            g = grads.clone().requires_grad_()
            out = spectral_gradient_surgery(g, torch.tensor([0, 2], device=device), mask=mask, **KW)
            assert out.requires_grad
            (out * weights).sum().backward()
            assert g.grad is not None
            result[backend, mask] = g.grad
    for mask in ("hard", "soft"):
        torch.testing.assert_close(result["ext", mask], result["torch", mask], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_gradients(impl, device, dtype):
    """The gradient comes back in the input dtype, computed in float32, close to the float64 one."""
    grads = separated_grads(3, 2, 2, 8, 8, seed=5)
    assign = torch.tensor([0, 1])
    weights = torch.randn(2, 2, 8, 8, dtype=torch.float64)

    def grad_of(x):
        x = x.to(device).requires_grad_()
        (spectral_gradient_surgery(x, assign.to(device), **KW).double() * weights.to(device)).sum().backward()
        return x.grad

    got, want = grad_of(grads.to(dtype)), grad_of(grads.to(dtype).double())
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert ((got.double() - want).norm() / want.norm()).item() < tol


def test_gradient_at_the_range_limits(impl):
    """The planes rescaled for range (1e37, 1e-40) differentiate like ordinary ones: the mask is
    scale-invariant and the map linear, so the gradient does not depend on the scale."""
    grads = separated_grads(3, 2, 2, 8, 8, seed=6).float()
    assign, weights = torch.tensor([2, 1]), torch.randn(2, 2, 8, 8)
    grad = {}
    for scale in (1.0, 1e37, 1e-40):
        g = (grads * scale).requires_grad_()
        (spectral_gradient_surgery(g, assign, **KW) * weights).sum().backward()
        grad[scale] = g.grad
    torch.testing.assert_close(grad[1e37], grad[1.0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[1e-40], grad[1.0], rtol=1e-5, atol=1e-6)


def test_no_gradient_claimed_without_a_backward(impl):
    grads = torch.randn(3, 2, 1, 8, 8)
    out = spectral_gradient_surgery(grads, torch.tensor([0, 1]), return_parts=True)
    assert not any(t.requires_grad for t in out[:4])
    out = spectral_gradient_surgery(grads.requires_grad_(), torch.tensor([0, 1]), return_parts=True)
    assert all(t.requires_grad for t in out[:4])
    assert not any(v.requires_grad for v in out.diagnostics.values())  # the diagnostics carry none


@pytest.mark.parametrize("op", ["surgery", "surgery_parts"])
def test_opcheck_with_gradients(device, op, monkeypatch):
    """opcheck's autograd-registration and AOT-dispatch tests (the registered backward traced and
    compared with eager), with an input that requires grad."""
    monkeypatch.setenv("SGS_BACKEND", "ext")
    assert _build.use_extension(device)
    grads = separated_grads(3, 2, 2, 8, 10, seed=7).float().to(device).requires_grad_()
    assign = torch.tensor([0, 2], device=device)
    torch.library.opcheck(getattr(torch.ops.sgs, op), (grads, assign, 1.0, 0.25, 1.0, 0.25, "hard"))


@pytest.mark.parametrize("return_parts", [False, True])
def test_torch_compile_backward(impl, device, return_parts):
    torch._dynamo.reset()
    grads = separated_grads(3, 2, 2, 8, 8, seed=8).float().to(device)
    assign = torch.tensor([1, 0], device=device)
    weights = torch.randn(2, 2, 8, 8, device=device)

    def loss(g):
        out = spectral_gradient_surgery(g, assign, return_parts=return_parts, **KW)
        update = out.update + out.shared if return_parts else out
        return (update * weights).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    g1, g2 = grads.clone().requires_grad_(), grads.clone().requires_grad_()
    compiled(g1).backward()
    loss(g2).backward()
    assert g1.grad is not None and g1.grad.abs().sum() > 0
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-5, atol=1e-6)


def test_reference_gradient_matches_the_op():
    """``sgs_reference`` itself (the ground truth) follows the same rule."""
    grads = separated_grads(3, 2, 1, 6, 6, seed=9).requires_grad_()
    assign = torch.tensor([0, 1])
    out = sgs_reference(grads, assign, 1.0, 0.25, 0.7, 0.4, "soft", return_parts=True)
    assert not out[4].requires_grad
    frozen = frozen_mask_surgery(grads, assign, "soft", **KW)(grads)
    w = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    (a,) = torch.autograd.grad((out[0] * w).sum(), grads)
    (b,) = torch.autograd.grad((frozen[0] * w).sum(), grads)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
