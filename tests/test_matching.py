"""M3D (Gaussian-kernel MMD) matching next to DM: the loss against a direct float64 definition,
the domain-gradient identity and where it breaks, the loop with --matching m3d."""
import math

import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda import SGSConfig
from sgs_cuda.dm import DistillConfig, DSAParams, augment, build_convnet, distill, matching_losses
from sgs_cuda.dm.checkpoint import relevant_settings
from sgs_cuda.dm.matching import m3d_class_losses, median_bandwidth


def _setup(seed=0, K=3, D=3, n=4, ipc=2, size=8, dsa=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    net = build_convnet((3, size, size), K, width=8, depth=2, generator=g).to(dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    real = [torch.randn(D, n, 3, size, size, generator=g, dtype=dtype) for _ in range(K)]
    syn = torch.randn(K * ipc, 3, size, size, generator=g, dtype=dtype).requires_grad_(True)
    params = [DSAParams.sample(generator=g, mode="all") if dsa else None for _ in range(K)]
    return net, real, syn, params


def direct_mmd2(x, y, h):
    """Biased MMD^2 of the Gaussian kernel exp(-|a-b|^2/h), written out pair by pair."""
    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / h)
    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return kxx + kyy - 2 * kxy


def direct_median_bandwidth(x):
    d2 = sorted(float(((x[i] - x[j]) ** 2).sum()) for i in range(len(x)) for j in range(len(x)) if i != j)
    m = len(d2)
    # torch.median returns the lower of the two middle values
    return 2 * d2[(m - 1) // 2]


def test_m3d_class_losses_match_direct_float64_definition():
    g = torch.Generator().manual_seed(0)
    D, n, m, F = 3, 5, 4, 7
    real = torch.randn(D, n, F, generator=g, dtype=torch.float64) * 0.7
    syn = torch.randn(m, F, generator=g, dtype=torch.float64)
    per_domain, pooled = m3d_class_losses(real, syn)
    h = direct_median_bandwidth(real.reshape(D * n, F))
    assert float(median_bandwidth(real.reshape(D * n, F))) == pytest.approx(h, rel=1e-12)
    expected = [h / 2 * direct_mmd2(real[d], syn, h) for d in range(D)]
    torch.testing.assert_close(per_domain, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert float(pooled) == pytest.approx(h / 2 * direct_mmd2(real.reshape(D * n, F), syn, h), rel=1e-10)
    # an explicit bandwidth is used as given
    per_domain, _ = m3d_class_losses(real, syn, bandwidth=3.0)
    assert float(per_domain[1]) == pytest.approx(1.5 * direct_mmd2(real[1], syn, 3.0), rel=1e-10)


def test_m3d_tends_to_dm_for_a_wide_kernel():
    """h/2 * MMD^2 -> ||mean x - mean y||^2 as h grows: the loss is in DM units."""
    g = torch.Generator().manual_seed(1)
    real = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    syn = torch.randn(3, 5, generator=g, dtype=torch.float64) + 0.5
    per_domain, pooled = m3d_class_losses(real, syn, bandwidth=1e7)
    dm = ((real.mean(1) - syn.mean(0)) ** 2).sum(1)
    torch.testing.assert_close(per_domain, dm, rtol=1e-5, atol=0)
    assert float(pooled) == pytest.approx(float(((real.reshape(12, 5).mean(0) - syn.mean(0)) ** 2).sum()), rel=1e-5)
    # and a bandwidth of the data's scale matches more than the mean: same means, other spread
    x = torch.randn(1, 200, 2, generator=g, dtype=torch.float64)
    y = x[0] * 3  # same mean (about 0), three times the spread
    wide, _ = m3d_class_losses(x - x.mean(1, keepdim=True), y - y.mean(0), bandwidth=1e9)
    narrow, _ = m3d_class_losses(x - x.mean(1, keepdim=True), y - y.mean(0))
    assert float(wide) < 1e-6 < 0.1 < float(narrow)


def test_matching_losses_m3d_match_direct_embedding_definition():
    net, real, syn, params = _setup(dtype=torch.float64)
    K, D, ipc = len(real), real[0].shape[0], syn.shape[0] // len(real)
    losses, pooled = matching_losses(net, real, syn, params, matching="m3d")
    direct, direct_pooled = torch.zeros(D, dtype=torch.float64), 0.0
    for c in range(K):
        s = net.embed(augment(syn[c * ipc:(c + 1) * ipc], params[c])).detach()
        r = [net.embed(augment(real[c][d], params[c])) for d in range(D)]
        h = direct_median_bandwidth(torch.cat(r))
        direct += torch.tensor([h / 2 * direct_mmd2(r[d], s, h) for d in range(D)], dtype=torch.float64)
        direct_pooled += h / 2 * direct_mmd2(torch.cat(r), s, h)
    torch.testing.assert_close(losses.detach(), direct, rtol=1e-9, atol=1e-12)
    assert float(pooled.detach()) == pytest.approx(direct_pooled, rel=1e-9)
    net, real, syn, params = _setup(seed=1, K=2, D=2, n=3, ipc=2, dtype=torch.float64)  # smaller: gradcheck
    assert torch.autograd.gradcheck(lambda t: matching_losses(net, real, t, params, matching="m3d")[0],
                                    (syn.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="matching must be one of"):
        matching_losses(net, real, syn, params, matching="mmd")


@pytest.mark.parametrize("matching", ["dm", "m3d"])
def test_mean_of_domain_gradients_is_the_pooled_gradient(matching):
    net, real, syn, params = _setup(seed=3, D=4, dtype=torch.float64)
    losses, pooled = matching_losses(net, real, syn, params, matching=matching)
    (g_pooled,) = torch.autograd.grad(pooled, syn, retain_graph=True)
    (g_mean,) = torch.autograd.grad(losses.mean(), syn)
    torch.testing.assert_close(g_mean, g_pooled, rtol=1e-10, atol=1e-13)
    assert g_pooled.abs().max() > 0
    # the losses themselves differ by a constant (the real-real terms), not by anything in syn
    other = (syn.detach() + 0.3 * torch.randn_like(syn)).requires_grad_(True)
    losses2, pooled2 = matching_losses(net, real, other, params, matching=matching)
    gap, gap2 = float((losses.mean() - pooled).detach()), float((losses2.mean() - pooled2).detach())
    assert gap == pytest.approx(gap2, rel=1e-9, abs=1e-12)


def test_where_the_identity_breaks_a_bandwidth_per_domain():
    """With one bandwidth per domain batch (a common MMD recipe) the mean of the domain
    gradients is no longer the pooled gradient: the bandwidth must be shared."""
    g = torch.Generator().manual_seed(4)
    real = torch.randn(3, 6, 5, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0],
                                                                                dtype=torch.float64)[:, None, None]
    syn = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    shared, pooled = m3d_class_losses(real, syn)
    own = torch.stack([m3d_class_losses(real[d:d + 1], syn)[0][0] for d in range(3)])  # h of R_d alone
    (g_pooled,) = torch.autograd.grad(pooled, syn, retain_graph=True)
    (g_shared,) = torch.autograd.grad(shared.mean(), syn, retain_graph=True)
    (g_own,) = torch.autograd.grad(own.mean(), syn)
    torch.testing.assert_close(g_shared, g_pooled, rtol=1e-10, atol=1e-13)
    assert (g_own - g_pooled).norm() > 0.05 * g_pooled.norm()


def test_missing_domains_use_the_pooled_class_term():
    net, real, syn, params = _setup(seed=6, D=3, dtype=torch.float64)
    real[0] = real[0][[0, 2]]
    present = [[0, 2], [0, 1, 2], [0, 1, 2]]
    losses, pooled = matching_losses(net, real, syn, params, present=present, num_domains=3, matching="m3d")
    ipc = 2
    s0 = net.embed(augment(syn[:ipc], params[0]))
    r0 = net.embed(augment(real[0].flatten(0, 1), params[0])).view(2, -1, s0.shape[1])
    per_domain0, pooled0 = m3d_class_losses(r0, s0)
    rest, _ = matching_losses(net, real[1:], syn[ipc:], params[1:], matching="m3d")
    torch.testing.assert_close(losses, torch.stack([per_domain0[0], pooled0, per_domain0[1]]) + rest)
    (g_pooled,) = torch.autograd.grad(pooled, syn, retain_graph=True)
    (g_mean,) = torch.autograd.grad(losses.mean(), syn)
    torch.testing.assert_close(g_mean, g_pooled, rtol=1e-10, atol=1e-13)


def _cfg(**kw):
    base = dict(method="dm_sgs", ipc=2, iterations=5, batch_real=6, width=8, depth=2, log_every=2, matching="m3d")
    base.update(kw)
    return DistillConfig(**base)


def test_dm_sgs_without_extra_terms_is_m3d():
    data, sources = TinyDomains(), ["d0", "d1", "d2"]
    m3d = distill(data, sources, _cfg(method="dm"), progress=False)
    sgs0 = distill(data, sources, _cfg(sgs=SGSConfig(alpha=0.0, beta=0.0)), progress=False)
    torch.testing.assert_close(sgs0.images, m3d.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(sgs0.history["loss"]), torch.tensor(m3d.history["loss"]), rtol=1e-4, atol=1e-6)
    dm = distill(data, sources, _cfg(method="dm", matching="dm"), progress=False)
    assert (m3d.images - dm.images).abs().max() > 1e-4  # the matching changes the trajectory
    full = distill(data, sources, _cfg(), progress=False)
    assert (full.images - m3d.images).abs().max() > 1e-4  # and so does the surgery on M3D's gradients


def test_m3d_reduces_its_loss_from_real_init():
    """From real images (M3D's initialisation). From noise far outside the real embeddings the
    median-heuristic kernel is ~0 between the two sides and the gradient vanishes: use init=real."""
    data = TinyDomains(noise=0.2)
    res = distill(data, ["d0", "d1", "d2"], _cfg(method="dm", iterations=40, lr_img=5.0, dsa=False, ipc=3,
                                                 batch_real=36), progress=False)
    first, last = sum(res.history["loss"][:5]) / 5, sum(res.history["loss"][-10:]) / 10
    assert last < 0.6 * first


def test_matching_config_and_checkpoints_resume(tmp_path):
    with pytest.raises(ValueError, match="matching"):
        DistillConfig(matching="mmd")
    assert DistillConfig().matching == "dm"
    assert relevant_settings(DistillConfig().to_dict()) != relevant_settings(DistillConfig(matching="m3d").to_dict())
    cfg = _cfg(matching="dm", iterations=4, checkpoint_every=2)
    full = distill(TinyDomains(), ["d0", "d1"], cfg, progress=False)
    distill(TinyDomains(), ["d0", "d1"], _cfg(matching="dm", iterations=2, checkpoint_every=2), run_dir=tmp_path,
            progress=False)
    resumed = distill(TinyDomains(), ["d0", "d1"], cfg, run_dir=tmp_path, resume=True, progress=False)
    assert torch.equal(resumed.images, full.images)
    with pytest.raises(ValueError, match="matching"):  # an m3d run does not continue a DM checkpoint
        distill(TinyDomains(), ["d0", "d1"], _cfg(iterations=4, checkpoint_every=2), run_dir=tmp_path, resume=True,
                progress=False)
