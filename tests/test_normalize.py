"""The matched-step option ``normalize``: ``"dm_norm"`` rescales each image's update to the
norm of its plain DM gradient, ``"kept_fraction"`` divides the shared part by the fraction of
components kept (per call, as the AND-mask does per parameter tensor). Every backend and both ops
against a float64 definition, the parts identity for each mode, validation, and the setting in reuse checks.
"""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import (NORMALIZE_MODES, SGSConfig, SpectralGradientSurgery, sgs_reference, spatial_gradient_surgery,
                      spectral_gradient_surgery)
from sgs_cuda.dm import DistillConfig
from sgs_cuda.dm.checkpoint import relevant_settings
from sgs_cuda.reference import spatial_reference
from sgs_inputs import separated_grads

KW = dict(tau=1.0, rho=0.25, alpha=0.8, beta=0.3)
MODES = ["dm_norm", "kept_fraction"]


def op_of(space):
    return spatial_gradient_surgery if space == "spatial" else spectral_gradient_surgery


def definition64(grads, assign, normalize, space="spectral", mask="hard", tau=1.0, rho=0.25, alpha=0.8, beta=0.3):
    """The normalised update in float64, written from the definition; and the factor applied."""
    args = (grads.cpu().double(), assign.cpu(), tau, rho, alpha, beta, mask)
    update, mean, shared, diversity, stats = (
        spatial_reference(*args) if space == "spatial" else sgs_reference(*args, return_parts=True))
    if normalize == "dm_norm":  # per image n, over C, H, W
        scale = mean.flatten(1).norm(dim=1) / update.flatten(1).norm(dim=1)
        return update * scale.view(-1, 1, 1, 1), scale
    fraction = stats[0] / stats[1]  # over the whole call
    return mean + alpha / fraction * shared + beta * diversity, 1 / fraction


def rel_err(a, b):
    a, b = a.cpu().double(), b.cpu().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("space", ["spectral", "spatial"])
@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_matches_float64_definition(impl, device, normalize, space, mask, dtype):
    grads = separated_grads(3, 4, 2, 16, 12, seed=1).to(dtype)
    assign = torch.tensor([2, 0, 1, 1])
    out = op_of(space)(grads.to(device), assign.to(device), mask=mask, normalize=normalize, return_parts=True, **KW)
    want, factor = definition64(grads, assign, normalize, space, mask)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 4 * torch.finfo(dtype).eps)
    assert out.update.dtype == dtype and rel_err(out.update, want) < tol
    key = "update_scale" if normalize == "dm_norm" else "shared_scale"
    assert out.diagnostics[key].dtype == torch.float64
    torch.testing.assert_close(out.diagnostics[key].cpu(), factor, rtol=max(tol, 1e-9), atol=0)
    # the update alone (return_parts=False) is the same computation; dm_norm's fast path (no parts)
    # takes the DM gradient's norm from the inputs instead of the kernel's mean: rounding apart
    alone = op_of(space)(grads.to(device), assign.to(device), mask=mask, normalize=normalize, **KW)
    if normalize == "dm_norm":
        assert alone.dtype == dtype and rel_err(alone, want) < tol and rel_err(alone, out.update) < tol
    else:
        assert torch.equal(alone, out.update)


@pytest.mark.parametrize("normalize", ["none"] + MODES)
@pytest.mark.parametrize("space", ["spectral", "spatial"])
def test_parts_identity_for_each_mode(impl, device, normalize, space):
    """The parts are never normalised; the diagnostics say what was applied to the update."""
    grads = torch.randn(3, 4, 3, 16, 16, dtype=torch.float64, device=device)
    out = op_of(space)(grads, normalize=normalize, return_parts=True, alpha=0.8, beta=0.3)
    update_scale = out.diagnostics.get("update_scale", torch.ones(4, dtype=torch.float64)).to(device)
    shared_scale = out.diagnostics.get("shared_scale", 1.0)
    recombined = update_scale.view(-1, 1, 1, 1) * (out.mean + 0.8 * shared_scale * out.shared + 0.3 * out.diversity)
    torch.testing.assert_close(out.update, recombined, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, grads.mean(0), rtol=1e-12, atol=1e-12)
    extra = {"none": set(), "dm_norm": {"update_scale"}, "kept_fraction": {"shared_scale"}}[normalize]
    assert set(out.diagnostics) == {"mask_fraction", "shared_energy"} | extra


def test_dm_norm_matches_the_dm_gradient_norm_per_image(impl):
    grads = torch.randn(3, 5, 3, 16, 16)
    out = spectral_gradient_surgery(grads, normalize="dm_norm", alpha=2.0, beta=0.5)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), grads.mean(0).flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    plain = spectral_gradient_surgery(grads, torch.zeros(5, dtype=torch.long), alpha=2.0, beta=0.5)
    assert rel_err(plain.flatten(1).norm(dim=1), grads.mean(0).flatten(1).norm(dim=1)) > 0.1  # it did rescale


def test_default_is_off_and_unchanged(impl):
    grads, assign = torch.randn(3, 2, 2, 16, 16), torch.tensor([1, 0])
    base = spectral_gradient_surgery(grads, assign, return_parts=True)
    off = spectral_gradient_surgery(grads, assign, return_parts=True, normalize="none")
    assert all(torch.equal(a, b) for a, b in zip(base[:4], off[:4]))
    assert SGSConfig().normalize == "none" and SGSConfig(normalize="dm_norm").normalize == "dm_norm"


def test_degenerate_images(impl):
    """An image whose update is zero keeps a zero update (factor 0); a call that keeps no component
    leaves the shared part (zero) alone (factor 1). No NaN either way."""
    one = torch.randn(1, 2, 2, 8, 8, dtype=torch.float64)
    same = one.expand(3, -1, -1, -1, -1)  # every component agrees: update = (1 + alpha) * g
    out = spectral_gradient_surgery(same, alpha=-1.0, normalize="dm_norm", return_parts=True)
    assert torch.equal(out.update, torch.zeros_like(out.update)) and out.diagnostics["update_scale"].tolist() == [0, 0]
    opposed = torch.cat([one, -one])  # no sign agrees anywhere: nothing kept
    out = spectral_gradient_surgery(opposed, normalize="kept_fraction", return_parts=True)
    assert out.diagnostics["mask_fraction"].item() == 0 and out.diagnostics["shared_scale"].item() == 1
    assert torch.isfinite(out.update).all()


@pytest.mark.parametrize("normalize", MODES)
def test_at_the_range_limits(impl, normalize):
    """Normalisation on planes near the float32 limits (rescaled for range): norms do not overflow."""
    grads = separated_grads(3, 2, 2, 16, 12, seed=3)
    grads = (grads / grads.abs().amax() * torch.tensor([[1e37], [1e-36]], dtype=torch.float64).view(1, 2, 1, 1, 1))
    grads = grads.float()
    assign = torch.tensor([1, 2])
    out = spectral_gradient_surgery(grads, assign, normalize=normalize, **KW)
    want, _ = definition64(grads, assign, normalize)
    for n in range(2):  # per image: they differ by 1e77
        assert rel_err(out[n], want[n]) < 1e-5


@pytest.mark.parametrize("normalize", MODES)
def test_torch_compile(impl, normalize):
    torch._dynamo.reset()
    grads, assign = torch.randn(3, 2, 2, 8, 8), torch.tensor([0, 2])
    fn = lambda g: spectral_gradient_surgery(g, assign, normalize=normalize) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(grads), fn(grads), rtol=1e-5, atol=1e-6)


def test_validation_names_the_allowed_values():
    message = r"normalize must be one of \('none', 'dm_norm', 'kept_fraction'\), got 'matched'"
    grads = torch.randn(2, 1, 1, 4, 4)
    for op in (spectral_gradient_surgery, spatial_gradient_surgery):
        with pytest.raises(ValueError, match=message):
            op(grads, normalize="matched")
    with pytest.raises(ValueError, match=message):
        SGSConfig(normalize="matched")
    with pytest.raises(ValueError, match="got None"):
        spectral_gradient_surgery(grads, normalize=None)
    assert NORMALIZE_MODES == ("none", "dm_norm", "kept_fraction")


@pytest.mark.parametrize("space", ["spectral", "spatial"])
def test_config_reaches_the_op(space):
    grads = torch.randn(3, 6, 3, 8, 8)
    cfg = SGSConfig(space=space, assignment="fixed", normalize="dm_norm")
    got = SpectralGradientSurgery(cfg)(grads)
    want = op_of(space)(grads, torch.arange(6) % 3, normalize="dm_norm")
    torch.testing.assert_close(got, want)


def test_the_option_is_a_setting_of_the_trajectory():
    """A run with the option set is not mistaken for one without it (reuse and resume check it)."""
    cfg = DistillConfig(method="dm_sgs", ipc=2, iterations=4, batch_real=6, width=8, depth=2, log_every=2)
    other = {**cfg.to_dict(), "sgs": {**cfg.to_dict()["sgs"], "normalize": "dm_norm"}}
    assert relevant_settings(other) != relevant_settings(cfg.to_dict())
