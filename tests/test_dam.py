"""DM+DAM (``dm_dam``): the domain views, their matching loss against a direct computation, the
loop (weight 0 is DM, chunked and resumed runs are the uninterrupted one), config and CLI."""
import pytest
import torch

from sgs_cuda import cli
from sgs_cuda.config import distill_config
from sgs_cuda.dm import DistillConfig, augment, build_convnet, distill
from sgs_cuda.dm.checkpoint import CHECKPOINT_NAME
from sgs_cuda.dm.dam import INITIAL_LOGIT, domain_views, initial_logits
from sgs_cuda.dm.matching import matching_losses
from sgs_cuda.dm.dsa import DSAParams
from tiny_domains import TinyDomains

SOURCES = ["d0", "d1", "d2"]


def tiny_cfg(**kw):
    base = dict(method="dm_dam", ipc=2, iterations=4, batch_real=6, width=8, depth=2, log_every=2)
    base.update(kw)
    return DistillConfig(**base)


def test_views_split_the_image_and_start_equal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g)
    z = initial_logits(5, 3, (3, 4, 4), "cpu")
    assert z.shape == (5, 3, 3, 4, 4) and torch.all(z == INITIAL_LOGIT)
    views = domain_views(x, z, 0.1)
    assert views.shape == (3, 5, 3, 4, 4)
    torch.testing.assert_close(views, (x / 3).expand(3, -1, -1, -1, -1))
    z = torch.randn(5, 3, 3, 4, 4, generator=g, dtype=torch.float64)
    views = domain_views(x.double(), z, 0.5)
    torch.testing.assert_close(views.sum(0), x.double())  # the views sum back to the image
    alpha = torch.exp(z[:, 1] / 0.5) / torch.exp(z / 0.5).sum(1)
    torch.testing.assert_close(views[1], x.double() * alpha)


@pytest.mark.parametrize("matching", ["dm", "m3d"])
def test_view_loss_matches_direct_definition_and_its_gradients(matching):
    g = torch.Generator().manual_seed(1)
    K, D, n, ipc, size = 3, 3, 4, 2, 8
    net = build_convnet((3, size, size), K, width=8, depth=2, generator=g).double()
    for p in net.parameters():
        p.requires_grad_(False)
    real = [torch.randn(D, n, 3, size, size, generator=g, dtype=torch.float64) for _ in range(K)]
    syn = torch.randn(K * ipc, 3, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(K * ipc, D, 3, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    params = [DSAParams.sample(generator=g, mode="all") for _ in range(K)]
    views = domain_views(syn, z, 0.3)
    losses, pooled, view_loss = matching_losses(net, real, syn, params, matching=matching, views=views)
    plain = matching_losses(net, real, syn, params, matching=matching)
    torch.testing.assert_close(losses, plain[0])
    torch.testing.assert_close(pooled, plain[1])
    direct = torch.zeros((), dtype=torch.float64)
    for d in range(D):  # view d of class c against domain d's real images of class c, on its own
        one_domain = [r[d:d + 1] for r in real]
        direct = direct + matching_losses(net, one_domain, views[d], params, matching=matching)[1]
    if matching == "dm":  # (M3D's bandwidth comes from the pooled real batch: the direct form differs there)
        torch.testing.assert_close(view_loss, direct)
    else:
        direct = torch.zeros((), dtype=torch.float64)
        for c in range(K):
            from sgs_cuda.dm.matching import m3d_class_losses
            feats = net.embed(augment(real[c].flatten(0, 1), params[c])).view(D, n, -1)
            for d in range(D):
                vf = net.embed(augment(views[d][c * ipc:(c + 1) * ipc], params[c]))
                direct = direct + m3d_class_losses(feats, vf)[0][d]
        torch.testing.assert_close(view_loss, direct)
    g_syn, g_z = torch.autograd.grad(view_loss, (syn, z), retain_graph=True)
    assert g_syn.abs().sum() > 0 and g_z.abs().sum() > 0
    d_syn, d_z = torch.autograd.grad(direct, (syn, z))  # the direct form's gradients, through other forwards
    torch.testing.assert_close(g_syn, d_syn)
    torch.testing.assert_close(g_z, d_z)
    # and against a central difference along a random direction (the logits' gradient included)
    v_syn = torch.randn(syn.shape, generator=g, dtype=torch.float64)
    v_z = torch.randn(z.shape, generator=g, dtype=torch.float64)

    def f(t):
        with torch.no_grad():
            s, l = syn + t * v_syn, z + t * v_z
            return matching_losses(net, real, s, params, matching=matching, views=domain_views(s, l, 0.3))[2]
    eps = 1e-5
    numeric = (f(eps) - f(-eps)) / (2 * eps)
    torch.testing.assert_close(numeric, (g_syn * v_syn).sum() + (g_z * v_z).sum(), rtol=1e-5, atol=1e-8)


def test_weight_zero_is_dm_and_a_weight_changes_the_set():
    data = TinyDomains()
    dm = distill(data, SOURCES, tiny_cfg(method="dm", iterations=5), progress=False)
    zero = distill(data, SOURCES, tiny_cfg(iterations=5, dam_weight=0.0), progress=False)
    torch.testing.assert_close(zero.images, dm.images, rtol=1e-5, atol=1e-6)
    dam = distill(data, SOURCES, tiny_cfg(iterations=5), progress=False)
    assert (dam.images - dm.images).abs().max() > 1e-4
    assert torch.isfinite(dam.images).all() and len(dam.history["loss"]) == 5


def test_chunked_and_resumed_runs_equal_the_uninterrupted_one(tmp_path):
    data = TinyDomains()
    full = distill(data, SOURCES, tiny_cfg(iterations=6), progress=False)
    chunked = distill(data, SOURCES, tiny_cfg(iterations=6, class_chunk=1), progress=False)
    torch.testing.assert_close(chunked.images, full.images, rtol=1e-5, atol=1e-6)
    distill(data, SOURCES, tiny_cfg(iterations=3, checkpoint_every=3), run_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert saved["dam"].shape == (6, 3, 3, 8, 8) and not torch.all(saved["dam"] == INITIAL_LOGIT)  # the masks learn
    resumed = distill(data, SOURCES, tiny_cfg(iterations=6, checkpoint_every=3), run_dir=tmp_path, resume=True,
                      progress=False)
    assert torch.equal(resumed.images, full.images)
    with pytest.raises(ValueError, match="dam_temperature"):
        distill(data, SOURCES, tiny_cfg(iterations=6, dam_temperature=1.0), run_dir=tmp_path, resume=True,
                progress=False)


def test_config_and_cli():
    for bad in (dict(dam_weight=-1.0), dict(dam_temperature=0.0)):
        with pytest.raises(ValueError, match="dam_weight >= 0 and dam_temperature > 0"):
            tiny_cfg(**bad)
    cfg = cli.resolve_config(cli.build_parser().parse_args(
        ["run", "--method", "dm", "dm_dam", "--dam-weight", "2", "--dam-temperature", "0.5"]))
    dcfg = distill_config(cfg, "dm_dam", 0)
    assert dcfg.method == "dm_dam" and dcfg.dam_weight == 2.0 and dcfg.dam_temperature == 0.5
