"""``sgs::surgery_general`` (CPU): the general formulations of the surgery (the mask read from
``agree_on``'s spectra, ``equalize``, ``mean_weight``, the removal ``decay * (1 - M) * images``)
against the float64 reference ``sgs_reference(..., return_parts=True, combine="mask")``.

float64 input is computed in double: it must match the reference to ~1e-10 on any random input.
float32 input is computed in float: the inputs are built away from the mask's decision boundaries
(``separated_grads``; with ``equalize``, the equalized magnitude agreements are checked to be away
from ``rho`` first), so the masks must be identical and the values match to float32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import _build
from sgs_cuda.reference import clear_self_conjugate_imag, magnitude_agreement, sgs_reference
from sgs_inputs import separated_grads

TAU, RHO, ALPHA, BETA = 1.0, 0.25, 0.5, 0.25
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

OPTIONS = {  # every option alone, then combined
    "spec": {},
    "agree_on": dict(agree_on=True),
    "equalize": dict(equalize=True),
    "mean_weight_0": dict(mean_weight=0.0),
    "mean_weight_half": dict(mean_weight=0.5),
    "decay": dict(decay=0.3),
    "agree_on_equalize": dict(agree_on=True, equalize=True),
    "all": dict(agree_on=True, equalize=True, mean_weight=0.5, decay=-0.7),
}
SHAPES = [(1, 2, 2, 8, 8), (2, 3, 1, 9, 7), (3, 2, 2, 16, 12), (3, 2, 1, 15, 10), (2, 1, 2, 1, 6)]


@pytest.fixture
def ext(monkeypatch):
    monkeypatch.setenv("SGS_BACKEND", "ext")
    assert _build.use_extension(torch.device("cpu"))


def general(grads, assign, agree_on=None, images=None, tau=TAU, rho=RHO, alpha=ALPHA, beta=BETA, mean_weight=1.0,
            decay=0.0, mask="hard", equalize=False):
    return torch.ops.sgs.surgery_general(grads, assign, agree_on, images, tau, rho, alpha, beta, mean_weight, decay,
                                         mask, equalize)


def reference(grads, assign, agree_on=None, images=None, tau=TAU, rho=RHO, alpha=ALPHA, beta=BETA,
              mean_weight=1.0, decay=0.0, mask="hard", equalize=False):
    """The float64 reference on the (rounded) inputs."""
    def f64(t):
        return None if t is None else t.double()

    return sgs_reference(grads.double(), assign, tau, rho, alpha, beta, mask, return_parts=True,
                         agree_on=f64(agree_on), equalize=equalize, mean_weight=mean_weight, images=f64(images),
                         decay=decay, combine="mask")


def equalized_agreement(test: torch.Tensor) -> torch.Tensor:
    """The magnitude agreement ``spectral_mask(..., equalize=True)`` thresholds, in float64."""
    spec = clear_self_conjugate_imag(torch.fft.rfft2(test.double()), test.shape[-1])
    mag = spec.abs()
    energy = mag.square().sum((-2, -1), keepdim=True).sqrt()
    return magnitude_agreement(mag / torch.where(energy > 0, energy, 1))


def assert_parts_close(got, want, dtype, mask):
    """update, mean, shared, diversity per (image, channel) plane relative to that plane; stats:
    the component count exactly, the hard mask's sum exactly (identical masks), the rest relative."""
    rtol = RTOL[dtype]
    for name, g, w in zip(("update", "mean", "shared", "diversity"), got[:4], want[:4]):
        assert g.dtype == dtype and g.shape == w.shape, name
        g = g.double()
        assert torch.isfinite(g).all(), name
        floor = rtol * 1e-6 * max(w.abs().max().item(), 1e-300)
        for n in range(w.shape[0]):
            for c in range(w.shape[1]):
                err, size = (g[n, c] - w[n, c]).norm().item(), w[n, c].norm().item()
                assert err <= rtol * size + floor, (name, n, c, err / max(size, 1e-300))
    stats, ref = got[4], want[4]
    assert stats.dtype == torch.float64 and stats.shape == (4,)
    assert stats[1].item() == ref[1].item()
    if mask == "hard":
        assert stats[0].item() == ref[0].item()
    else:
        assert stats[0].item() == pytest.approx(ref[0].item(), rel=rtol, abs=1e-300)
    torch.testing.assert_close(stats[2:], ref[2:], rtol=rtol, atol=0)


def make_inputs(shape, dtype, opts, seed, mask):
    """(grads, assign, kwargs of the op) for one case; float32 inputs away from the mask's boundaries."""
    D, N, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float64:
        grads = torch.randn(shape, generator=g, dtype=dtype)
        agree_on = torch.randn(shape, generator=g, dtype=dtype) if opts.get("agree_on") else None
    else:
        grads = separated_grads(*shape, rho=RHO, seed=seed).to(dtype)
        agree_on = separated_grads(*shape, rho=RHO, seed=seed + 1000).to(dtype) if opts.get("agree_on") else None
        if opts.get("equalize") and mask == "hard":  # the margin the test needs, checked, not hoped for
            test = grads if agree_on is None else agree_on
            assert (equalized_agreement(test) - RHO).abs().min() > 1e-4, "pick another seed"
    assign = torch.randint(0, D, (N,), generator=g)
    kw = dict(mask=mask, equalize=opts.get("equalize", False), mean_weight=opts.get("mean_weight", 1.0),
              decay=opts.get("decay", 0.0), agree_on=agree_on)
    if kw["decay"]:
        kw["images"] = torch.randn(shape[1:], generator=g, dtype=torch.float64).to(dtype)
    return grads, assign, kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_float64_reference(ext, dtype, mask, option, shape):
    seed = 7 * SHAPES.index(shape) + list(OPTIONS).index(option)
    grads, assign, kw = make_inputs(shape, dtype, OPTIONS[option], seed, mask)
    out = general(grads, assign, **kw)
    assert_parts_close(out, reference(grads, assign, **kw), dtype, mask)


@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("tau, rho", [(0.5, 0.6), (0.0, 0.0), (1.0, 1.0), (0.7, 0.1)])
def test_thresholds_float64(ext, mask, tau, rho):
    shape = (3, 2, 2, 10, 9)
    grads, assign, kw = make_inputs(shape, torch.float64, OPTIONS["all"], 11, mask)
    kw.update(tau=tau, rho=rho)
    assert_parts_close(general(grads, assign, **kw), reference(grads, assign, **kw), torch.float64, mask)


def test_the_options_change_the_result(ext):
    """Guard against an option being silently ignored: each one moves the update."""
    grads, assign, kw = make_inputs((3, 2, 2, 12, 12), torch.float64, OPTIONS["all"], 3, "hard")
    base = general(grads, assign)[0]
    for change in (dict(agree_on=kw["agree_on"]), dict(equalize=True, rho=0.5), dict(mean_weight=0.0),
                   dict(decay=0.5, images=kw["images"])):
        assert not torch.allclose(general(grads, assign, **change)[0], base), change


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 16, 12), (2, 3, 1, 15, 9), (1, 2, 1, 8, 8)])
def test_spec_formulation_is_surgery_parts(ext, dtype, mask, shape):
    """agree_on None, no equalize, mean_weight 1, decay 0: the op is sgs::surgery_parts."""
    g = torch.Generator().manual_seed(5)
    grads = torch.randn(shape, generator=g, dtype=dtype)
    assign = torch.randint(0, shape[0], (shape[1],), generator=g)
    got = general(grads, assign, mask=mask)
    want = torch.ops.sgs.surgery_parts(grads, assign, TAU, RHO, ALPHA, BETA, mask)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("update", "mean", "shared", "diversity"), got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * eps * b.abs().max().item(), msg=name)
    assert torch.equal(got[4][:2], want[4][:2])  # the same mask
    torch.testing.assert_close(got[4][2:], want[4][2:], rtol=1e-12, atol=0)


def test_agree_on_grads_and_unused_images_change_nothing(ext):
    grads, assign, kw = make_inputs((3, 2, 2, 9, 8), torch.float64, OPTIONS["all"], 9, "soft")
    plain = general(grads, assign, mask="soft", equalize=True, mean_weight=0.5)
    same = general(grads, assign, agree_on=grads.clone(), images=kw["images"], mask="soft", equalize=True,
                   mean_weight=0.5, decay=0.0)
    for a, b in zip(plain, same):
        assert torch.equal(a, b)


def test_zero_planes_stay_unscaled(ext):
    """equalize leaves an all-zero domain plane at zero (no division by its zero energy)."""
    grads, assign, kw = make_inputs((3, 2, 2, 8, 10), torch.float64, OPTIONS["all"], 4, "hard")
    grads[1, 0, 1] = 0
    kw["agree_on"][2, 1, 0] = 0
    for agree_on in (None, kw["agree_on"]):
        for mask in ("hard", "soft"):
            args = dict(agree_on=agree_on, equalize=True, mask=mask)
            out = general(grads, assign, **args)
            assert_parts_close(out, reference(grads, assign, **args), torch.float64, mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_batch(ext, dtype):
    grads = torch.zeros(3, 0, 2, 8, 8, dtype=dtype)
    assign = torch.zeros(0, dtype=torch.long)
    out = general(grads, assign, agree_on=torch.zeros_like(grads), images=torch.zeros(0, 2, 8, 8, dtype=dtype),
                  decay=0.5, equalize=True, mean_weight=0.5)
    for t in out[:4]:
        assert t.shape == (0, 2, 8, 8) and t.dtype == dtype
    assert torch.equal(out[4], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("change, message", [
    (dict(agree_on=torch.zeros(3, 2, 2, 8, 7, dtype=torch.float64)), "agree_on must have the shape"),
    (dict(agree_on=torch.zeros(2, 2, 2, 8, 8, dtype=torch.float64)), "agree_on must have the shape"),
    (dict(agree_on=torch.zeros(3, 2, 2, 8, 8, dtype=torch.float32)), "agree_on must have grads' dtype"),
    (dict(images=torch.zeros(3, 2, 2, 8, 8, dtype=torch.float64), decay=0.1), "images must have the shape"),
    (dict(images=torch.zeros(2, 2, 8, 8, dtype=torch.float32), decay=0.1), "images must have grads' dtype"),
    (dict(decay=0.1), "needs images"),
    (dict(tau=1.5), "tau must lie in"),
    (dict(rho=-0.1), "rho must lie in"),
    (dict(mask="medium"), "mask must be 'hard' or 'soft'"),
])
def test_bad_inputs_raise(ext, change, message):
    grads = torch.randn(3, 2, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        general(grads, torch.tensor([0, 2]), **change)


def test_assign_out_of_range_raises(ext):
    with pytest.raises(ValueError, match="assign values must lie in"):
        general(torch.randn(3, 2, 2, 8, 8), torch.tensor([0, 3]))
