"""The spatial-domain ablation (spec section 6): the SGS mask measured per pixel instead of per
frequency. Checked against a direct per-pixel loop, the invariants it shares with the spectral
op, and its wiring into SGSConfig, the DM loop and the CLI."""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import SGSConfig, SpectralGradientSurgery, spatial_gradient_surgery
from sgs_cuda.dm.checkpoint import relevant_settings


def loop_spatial(grads, assign, tau, rho, alpha, beta, mask):
    """The per-pixel definition, one pixel at a time (float64, tiny inputs only)."""
    D, N, C, H, W = grads.shape
    out = torch.empty(grads.shape[1:], dtype=torch.float64)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    x = [float(grads[d, n, c, h, w]) for d in range(D)]
                    agree = abs(sum((v > 0) - (v < 0) for v in x)) / D
                    big = max(abs(v) for v in x)
                    ratio = min(abs(v) for v in x) / big if big > 0 else 0.0
                    m = float(agree >= tau and ratio >= rho) if mask == "hard" else agree * ratio
                    mean = sum(x) / D
                    out[n, c, h, w] = mean + alpha * m * mean + beta * (1 - m) * (x[int(assign[n])] - mean)
    return out


@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("D", [1, 3, 4])
def test_matches_the_per_pixel_definition(D, mask):
    g = torch.Generator().manual_seed(D)
    grads = torch.randn(D, 3, 2, 5, 4, dtype=torch.float64, generator=g)
    grads[:, 0, 0, 0, 0] = 0.0  # an all-zero pixel: magnitude agreement 0 by definition
    grads[0, 1, 1, 2, 2] = 0.0  # one zero among the domains: sign 0 for that domain
    assign = torch.randint(0, D, (3,), generator=g)
    kw = dict(tau=2 / 3 if D == 3 else 1.0, rho=0.3, alpha=0.7, beta=0.4, mask=mask)
    got = spatial_gradient_surgery(grads, assign, **kw)
    torch.testing.assert_close(got, loop_spatial(grads, assign, **kw), rtol=1e-12, atol=1e-12)


def test_invariants():
    grads = torch.randn(4, 6, 3, 8, 8, dtype=torch.float64)
    assign = torch.randint(0, 4, (6,))
    mean = grads.mean(0)
    torch.testing.assert_close(spatial_gradient_surgery(grads, assign, alpha=0, beta=0), mean)
    parts = spatial_gradient_surgery(grads, assign, alpha=0.6, beta=0.3, return_parts=True)
    torch.testing.assert_close(parts.update, parts.mean + 0.6 * parts.shared + 0.3 * parts.diversity)
    assert 0 < float(parts.diagnostics["mask_fraction"]) < 1
    assert 0 <= float(parts.diagnostics["shared_energy"]) <= 1
    perm = torch.tensor([2, 0, 3, 1])  # domain d moves to position inv[d]
    inv = torch.argsort(perm)
    torch.testing.assert_close(spatial_gradient_surgery(grads[perm], inv[assign], alpha=0.6, beta=0.3),
                               parts.update)
    torch.testing.assert_close(spatial_gradient_surgery(3.0 * grads, assign, alpha=0.6, beta=0.3),
                               3.0 * parts.update)
    one = grads[:1]
    torch.testing.assert_close(spatial_gradient_surgery(one, torch.zeros(6, dtype=torch.long), alpha=0.5),
                               1.5 * one[0])


def test_dtypes_and_random_assignment():
    grads = torch.randn(3, 4, 3, 8, 8)
    torch.manual_seed(5)
    a = spatial_gradient_surgery(grads)
    torch.manual_seed(5)
    assert torch.equal(a, spatial_gradient_surgery(grads))
    half = spatial_gradient_surgery(grads.half(), torch.zeros(4, dtype=torch.long))
    assert half.dtype == torch.float16 and half.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("bad,message", [
    (dict(grads=torch.randn(3, 4, 8, 8)), "5 dims"),
    (dict(grads=torch.full((2, 1, 1, 4, 4), float("nan"))), "NaN or Inf"),
    (dict(rho=1.5), "rho must lie in"),
    (dict(assign=torch.tensor([0, 5])), r"\[0, D\)"),
])
def test_errors(bad, message):
    kw = dict(grads=torch.randn(2, 2, 1, 4, 4))
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        spatial_gradient_surgery(kw.pop("grads"), kw.pop("assign", None), **kw)


def test_config_selects_the_space():
    with pytest.raises(ValueError, match="space must be one of"):
        SGSConfig(space="wavelet")
    grads = torch.randn(3, 6, 3, 8, 8)
    cfg = SGSConfig(space="spatial", assignment="fixed", beta=0.5)
    got = SpectralGradientSurgery(cfg)(grads)
    want = spatial_gradient_surgery(grads, torch.arange(6) % 3, beta=0.5, normalize=cfg.normalize)
    torch.testing.assert_close(got, want)


def test_the_space_is_a_setting_of_the_trajectory():
    now = {"method": "dm_sgs", "ipc": 2, "sgs": {"tau": 1.0, "rho": 0.25, "alpha": 1.0, "beta": 0.25,
                                                 "mask": "hard", "assignment": "random", "space": "spectral"}}
    assert relevant_settings(now) != relevant_settings({**now, "sgs": {**now["sgs"], "space": "spatial"}})
