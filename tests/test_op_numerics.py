"""The op's numeric range: every finite input gives the float64 reference's answer, the
planes outside the kernels' safe range being rescaled by exact powers of two, or a clear error
when the true result does not fit the output dtype. Both backends, the spectral and the spatial op;
the inputs are built away from the mask's decision boundaries (``sgs_inputs``), so the masks must
match exactly and the values to the output dtype's rounding (including its subnormal spacing).
"""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import ops, sgs_reference, spatial_gradient_surgery, spectral_gradient_surgery
from sgs_cuda.reference import spatial_reference
from sgs_inputs import separated_grads

KW = dict(tau=1.0, rho=0.25, alpha=0.5, beta=0.25, mask="hard")
SHAPE = (3, 2, 2, 16, 12)
F32_MAX = torch.finfo(torch.float32).max


def scaled_planes(scales, shape=SHAPE, seed=0) -> torch.Tensor:
    """float64 separated gradients whose plane (n, c) has largest |value| ``scales[n][c]``."""
    g = separated_grads(*shape, seed=seed)
    peak = g.abs().amax(dim=(0, 3, 4), keepdim=True)
    return g / peak * torch.tensor(scales, dtype=torch.float64)[None, :, :, None, None]


def reference(grads, assign, space="spectral", **kw):
    """(update, mean, shared, diversity, stats) of the float64 reference on the (rounded) input."""
    kw = {**KW, **kw}
    args = (grads.cpu().double(), assign.cpu(), kw["tau"], kw["rho"], kw["alpha"], kw["beta"], kw["mask"])
    return spatial_reference(*args) if space == "spatial" else sgs_reference(*args, return_parts=True)


def assert_planes_close(got, want, dtype):
    """Per (image, channel) plane, relative to that plane (planes may differ by 1e68), with an
    absolute floor of the output dtype's subnormal spacing (what it cannot resolve)."""
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 4 * torch.finfo(dtype).eps)
    got, want = got.cpu().double(), want.cpu().double()
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for n in range(got.shape[0]):
        for c in range(got.shape[1]):
            err, size = (got[n, c] - want[n, c]).norm(), want[n, c].norm()
            assert err <= rtol * size + 2 * spacing * got[n, c].numel() ** 0.5, (n, c, float(err / size))


def assert_matches_reference(out, grads, assign, space="spectral", **kw):
    ref = reference(grads, assign, space, **kw)
    for got, want in zip(out[:4], ref[:4]):
        assert got.dtype == grads.dtype
        assert_planes_close(got, want, grads.dtype)
    stats = ref[4]
    assert out.diagnostics["mask_fraction"].item() == pytest.approx((stats[0] / stats[1]).item(), abs=1e-12)
    assert out.diagnostics["shared_energy"].item() == pytest.approx((stats[2] / stats[3]).item(), rel=1e-5)


def run(grads, assign, space="spectral", **kw):
    op = spatial_gradient_surgery if space == "spatial" else spectral_gradient_surgery
    return op(grads, assign, return_parts=True, **{**KW, **kw})


ASSIGN = torch.tensor([2, 0])


@pytest.mark.parametrize("scale", [1e38, 1e30, 1e20, 1e-20, 1e-30, 1e-38, 1e-40, 1e-43])
@pytest.mark.parametrize("space", ["spectral", "spatial"])
def test_float32_extremes_match_float64_reference(impl, device, space, scale):
    grads = scaled_planes([[scale, scale / 3], [scale / 2, scale]]).float()
    out = run(grads.to(device), ASSIGN.to(device), space)
    assert_matches_reference(out, grads, ASSIGN, space)


@pytest.mark.parametrize("space", ["spectral", "spatial"])
def test_mixed_planes_in_one_tensor(impl, device, space):
    """One plane near the float32 maximum, one at 1e-30, one subnormal, one ordinary."""
    grads = scaled_planes([[1e38, 1e-30], [3e-42, 1.0]]).float()
    out = run(grads.to(device), ASSIGN.to(device), space)
    assert_matches_reference(out, grads, ASSIGN, space)
    op = spatial_gradient_surgery if space == "spatial" else spectral_gradient_surgery
    assert torch.equal(op(grads.to(device), ASSIGN.to(device), **KW), out.update)  # the update alone


@pytest.mark.parametrize("scale", [1e300, 1e200, 1e-200, 1e-300, 1e-310])
def test_float64_extremes(impl, device, scale):
    """The float64 reference itself overflows at 1e300, so the ground truth is the reference on the
    input scaled by an exact power of two (the op is positively homogeneous), scaled back."""
    grads = scaled_planes([[scale, scale], [scale, scale]])
    out = run(grads.to(device), ASSIGN.to(device))
    shift = -int(torch.frexp(torch.tensor(scale, dtype=torch.float64)).exponent)
    half = shift // 2
    unit = grads * 2.0 ** half * 2.0 ** (shift - half)
    ref = reference(unit, ASSIGN)
    for got, want in zip(out[:4], ref[:4]):
        back = want * 2.0 ** -half * 2.0 ** -(shift - half)
        assert_planes_close(got, back, torch.float64)
    assert out.diagnostics["mask_fraction"].item() == pytest.approx((ref[4][0] / ref[4][1]).item(), abs=1e-12)
    assert out.diagnostics["shared_energy"].item() == pytest.approx((ref[4][2] / ref[4][3]).item(), rel=1e-9)


@pytest.mark.parametrize("dtype,scale", [
    (torch.float16, 6e4), (torch.float16, 1e-4), (torch.float16, 3e-5), (torch.float16, 1e-6),
    (torch.bfloat16, 3e38), (torch.bfloat16, 2e-37), (torch.bfloat16, 1e-38)])
def test_half_precision_limits(impl, device, dtype, scale):
    """float16 near its largest value and in its subnormals (6e-8 .. 6e-5); bfloat16 at float32's
    limits. alpha = beta = 0.1 keeps the update of the largest ones representable. (Not bfloat16
    subnormals: with 1 to 7 significant bits, the rounded input no longer avoids the mask's
    decision boundaries, see sgs-spec.md section 4.)"""
    grads = scaled_planes([[scale, scale / 2], [scale / 3, scale]]).to(dtype)
    out = run(grads.to(device), ASSIGN.to(device), alpha=0.1, beta=0.1)
    assert_matches_reference(out, grads, ASSIGN, alpha=0.1, beta=0.1)


def identical_domains(dtype, value, shape=(3, 2, 2, 8, 8)):
    """Every domain the same plane: the mask keeps everything, update = (1 + alpha) * g[0]."""
    g = torch.rand(shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    return (g / g.amax() * value).expand(shape).to(dtype)


@pytest.mark.parametrize("dtype,value", [(torch.float16, 6e4), (torch.bfloat16, 3e38), (torch.float32, 3e38),
                                         (torch.float64, 1.7e308)])
@pytest.mark.parametrize("space", ["spectral", "spatial"])
def test_result_that_does_not_fit_raises(impl, device, space, dtype, value):
    grads = identical_domains(dtype, value).to(device)
    with pytest.raises(ValueError, match=rf"update of image \d, channel \d is not representable in {dtype}"):
        run(grads, ASSIGN.to(device), space, alpha=1.0)
    # the same input with a result that fits: (1 + alpha) * g[0] with alpha = -0.5
    out = run(grads, ASSIGN.to(device), space, alpha=-0.5)
    torch.testing.assert_close(out.update.double().cpu(), 0.5 * grads[0].double().cpu(), rtol=4e-3, atol=0)


def test_parts_that_do_not_fit_raise_only_when_returned(impl):
    """float16 domains x, -x, -x with x near 6e4: no sign agrees, so the diversity part of domain 0
    is x - (-x / 3) = 4x / 3 (overflows), while the update (alpha = beta = 0) is the mean -x / 3."""
    x = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e4 + 5e4
    grads = torch.stack([x, -x, -x]).half()
    assign = torch.tensor([0, 0])
    kw = {**KW, "alpha": 0.0, "beta": 0.0}
    update = spectral_gradient_surgery(grads, assign, **kw)
    assert_planes_close(update, -grads[0].double() / 3, torch.float16)
    with pytest.raises(ValueError, match="diversity of image 0, channel 0 is not representable in torch.float16"):
        spectral_gradient_surgery(grads, assign, return_parts=True, **kw)


@pytest.mark.parametrize("k", [100, 120, -100])
def test_rescaling_is_exact(impl, device, k):
    """Powers of two commute with rounding: the op of 2**k * g is exactly 2**k times the op of g,
    whether or not 2**k * g lies outside the safe range (up to the rounding of results that are
    float32 subnormals)."""
    grads = scaled_planes([[1.0, 0.7], [0.3, 2.0]]).float().to(device)
    shifted = grads * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)
    assert torch.equal(shifted.double().cpu(), grads.double().cpu() * 2.0 ** k)  # an exact shift
    out, out_shifted = run(grads, ASSIGN.to(device)), run(shifted, ASSIGN.to(device))
    fi = torch.finfo(torch.float32)
    for a, b in zip(out[:4], out_shifted[:4]):
        want, got = a.double().cpu() * 2.0 ** k, b.double().cpu()
        normal = want.abs() >= fi.smallest_normal
        assert torch.equal(want[normal], got[normal])
        assert ((want - got)[~normal].abs() <= fi.smallest_normal * fi.eps / 2).all()
    assert torch.equal(out.diagnostics["mask_fraction"], out_shifted.diagnostics["mask_fraction"])


def test_common_case_takes_no_extra_step(impl, device, monkeypatch):
    """Ordinary gradients (float32 and float16, DM sizes) go straight to the kernel: no rescaling,
    no output check; the range test is the finite check's one reduction."""
    def forbidden(*args, **kwargs):
        raise AssertionError("rescaled path taken")

    monkeypatch.setattr(ops, "_run_rescaled", forbidden)
    monkeypatch.setattr(ops, "_check_representable", forbidden)
    for dtype, scale in [(torch.float32, 1e-6), (torch.float32, 1e6), (torch.float16, 1e-2), (torch.float16, 50.0)]:
        grads = (torch.randn(3, 4, 3, 32, 32) * scale).to(dtype).to(device)
        for normalize in ops.NORMALIZE_MODES[:2]:
            spectral_gradient_surgery(grads, return_parts=True, normalize=normalize)
            spatial_gradient_surgery(grads, return_parts=True, normalize=normalize)


def test_nan_and_inf_still_rejected(impl):
    for bad in (float("nan"), float("inf"), float("-inf")):
        grads = scaled_planes([[1e38, 1.0], [1.0, 1e-40]]).float()
        grads[1, 1, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            spectral_gradient_surgery(grads, ASSIGN)


def test_all_zero_and_empty_inputs(impl):
    zero = torch.zeros(3, 2, 2, 8, 8)
    out = spectral_gradient_surgery(zero, ASSIGN, return_parts=True)
    assert torch.equal(out.update, torch.zeros(2, 2, 8, 8)) and out.diagnostics["shared_energy"].item() == 0
    mixed = scaled_planes([[0.0, 1e-40], [1e38, 0.0]]).float()
    out = run(mixed, ASSIGN)
    assert_matches_reference(out, mixed, ASSIGN)
    assert spectral_gradient_surgery(torch.zeros(3, 0, 2, 8, 8)).shape == (0, 2, 8, 8)
