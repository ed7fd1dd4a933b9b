"""The DM loop: ConvNet, DSA, the matching losses, DM == DM+SGS(alpha=beta=0), checkpoints."""
import math
import warnings

import pytest
import torch

from sgs_cuda import SGSConfig
from sgs_cuda.dm import ConvNet, DSAParams, DistillConfig, augment, augment_pair, build_convnet, distill
from sgs_cuda.dm.dsa import FAMILIES, parse_strategy
from sgs_cuda.dm.checkpoint import CHECKPOINT_NAME
from sgs_cuda.dm.loop import matching_losses


from tiny_domains import CrashingDomains, TinyDomains  # noqa: E402


def tiny_cfg(**kw):
    base = dict(method="dm_sgs", ipc=2, iterations=4, batch_real=6, width=8, depth=2, log_every=2)
    base.update(kw)
    return DistillConfig(**base)


def test_the_loop_module_is_not_shadowed_by_the_function():
    """``sgs_cuda.dm.distill`` is the function; its module, the one to patch, is ``sgs_cuda.dm.loop``."""
    import importlib

    import sgs_cuda.dm.loop as loop

    assert importlib.import_module("sgs_cuda.dm.loop") is loop and loop.distill is distill
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sgs_cuda.dm.distill")


# --- networks -------------------------------------------------------------------------------

@pytest.mark.parametrize("size,depth,expected_hw", [(28, 3, 4), (32, 3, 4), (64, 2, 16), (128, 4, 8)])
def test_convnet_sizes(size, depth, expected_hw):
    net = ConvNet((1 if size == 28 else 3, size, size), num_classes=5, width=4, depth=depth)
    x = torch.randn(2, 1 if size == 28 else 3, size, size)
    assert net.embed(x).shape == (2, 4 * expected_hw * expected_hw) == (2, net.num_features)
    assert net(x).shape == (2, 5)


def test_convnet_norms_and_errors():
    x = torch.randn(4, 3, 16, 16)
    inst = ConvNet((3, 16, 16), 3, width=6, depth=2)
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 6 and m.affine for m in inst.modules()) == 2
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in ConvNet((3, 16, 16), 3, 6, 2, "batchnorm").modules())
    plain = ConvNet((3, 16, 16), 3, 6, 2, "none")
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)) for m in plain.modules())
    assert plain(x).shape == (4, 3)
    # instance norm: an image's features do not depend on the rest of the batch
    torch.testing.assert_close(inst.embed(x)[:1], inst.embed(x[:1]))
    with pytest.raises(ValueError, match="norm"):
        ConvNet((3, 16, 16), 3, norm="layernorm")
    with pytest.raises(ValueError, match="too small"):
        ConvNet((3, 4, 4), 3, depth=3)


def test_reinitialize_uses_generator_and_default_bounds():
    a = build_convnet((3, 8, 8), 3, width=16, depth=2, generator=torch.Generator().manual_seed(1))
    b = build_convnet((3, 8, 8), 3, width=16, depth=2, generator=torch.Generator().manual_seed(1))
    c = build_convnet((3, 8, 8), 3, width=16, depth=2, generator=torch.Generator().manual_seed(2))
    norm_params = {id(p) for m in a.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters()}
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if id(pa) not in norm_params:  # norm weights are deterministic (1 and 0)
            assert not torch.equal(pa, pc), name
    conv = a.features[4]  # second conv: fan_in = 16 * 9
    bound = 1 / math.sqrt(16 * 9)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    assert torch.equal(a.features[1].weight, torch.ones(16)) and torch.equal(a.features[1].bias, torch.zeros(16))


# --- DSA ------------------------------------------------------------------------------------

def _params(family, *u):
    return DSAParams(((family, torch.tensor([list(u)], dtype=torch.float32)),))


def test_dsa_parse_and_sample():
    assert parse_strategy("color_crop_cutout_flip_scale_rotate") == FAMILIES
    assert parse_strategy("none") == ()
    with pytest.raises(ValueError, match="unknown DSA"):
        parse_strategy("color_blur")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        p, q = DSAParams.sample(generator=g1), DSAParams.sample(generator=g2)
        assert len(p.ops) == 1 and p.ops[0][0] == q.ops[0][0] and torch.equal(p.ops[0][1], q.ops[0][1])
        assert p.batch == 1
        seen.add(p.ops[0][0])
    assert seen == set(FAMILIES)  # single mode draws every family
    allp = DSAParams.sample(generator=g1, mode="all", batch=5)
    assert [f for f, _ in allp.ops] == list(FAMILIES) and allp.batch == 5


@pytest.mark.parametrize("mode", ["single", "all"])
def test_dsa_shared_params_concatenation(mode):
    """Augmenting a concatenation == augmenting each part with the same params; identical images
    in the two batches get identical transforms."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 3, 12, 12, generator=g), torch.randn(3, 3, 12, 12, generator=g)
    for _ in range(40):
        p = DSAParams.sample(generator=g, mode=mode)
        whole = augment(torch.cat([a, b]), p)
        ra, rb = augment_pair(a, b, p)
        torch.testing.assert_close(whole, torch.cat([ra, rb]), rtol=1e-6, atol=1e-6)
        twin_a, twin_b = augment_pair(a[:2], torch.cat([a[1:2], a[:1]]), p)
        torch.testing.assert_close(twin_a[1], twin_b[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(twin_a[0], twin_b[1], rtol=0, atol=1e-6)


def test_dsa_different_draws_differ_and_per_image_params():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 12, 12, generator=g)
    p = DSAParams.sample(generator=g, mode="all", batch=6)
    out = augment(x, p)
    for i in range(6):  # per-image parameters == each image with its own parameter row
        own = DSAParams(tuple((f, u[i:i + 1]) for f, u in p.ops))
        torch.testing.assert_close(out[i:i + 1], augment(x[i:i + 1], own), rtol=1e-6, atol=1e-6)
    q = DSAParams.sample(generator=g, mode="all")
    assert not torch.allclose(augment(x, q), augment(x, DSAParams.sample(generator=g, mode="all")))
    with pytest.raises(ValueError, match="parameter sets"):
        augment(x[:4], p)


def test_dsa_transform_values():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    # crop: shift range +-1 at size 8 (0.125 * 8); u = 0.5 -> shift 0, u ~ 1 -> shift +1
    torch.testing.assert_close(augment(x, _params("crop", 0.5, 0.5)), x)
    shifted = augment(x, _params("crop", 0.99, 0.5))
    torch.testing.assert_close(shifted[:, :, :-1], x[:, :, 1:])
    assert torch.all(shifted[:, :, -1] == 0)
    # flip
    torch.testing.assert_close(augment(x, _params("flip", 0.1)), x.flip(3))
    torch.testing.assert_close(augment(x, _params("flip", 0.9)), x)
    # cutout: a 4x4 hole (0.5 * 8); centre at row/col 4 -> rows/cols 2..5
    cut = augment(x + 1, _params("cutout", 4.5 / 9, 4.5 / 9))
    hole = cut == 0
    assert hole.sum() == 2 * 3 * 16 and hole[:, :, 2:6, 2:6].all()
    # scale by exactly 1 and rotation by 0 are the identity (align_corners=True)
    u1 = (1 - 1 / 1.2) / (1.2 - 1 / 1.2)
    torch.testing.assert_close(augment(x, _params("scale", u1, u1)), x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(augment(x, _params("rotate", 0.5)), x, rtol=1e-5, atol=1e-3)
    # colour with u = (0.5, 0.5, 0.5): brightness +0, saturation x1, contrast x1 -> identity
    torch.testing.assert_close(augment(x, _params("color", 0.5, 0.5, 0.5)), x, rtol=1e-5, atol=1e-3)
    brighter = augment(x, _params("color", 1.0, 0.5, 0.5))
    torch.testing.assert_close(brighter, x + 0.5, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_dsa_is_differentiable(family):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    u = {"color": [0.3, 0.7, 0.2], "crop": [0.9, 0.1], "cutout": [0.4, 0.6], "flip": [0.2],
         "scale": [0.3, 0.8], "rotate": [0.8]}[family]
    p = _params(family, *u)
    assert torch.autograd.gradcheck(lambda t: augment(t, p), (x,), eps=1e-6, atol=1e-5)


# --- the matching losses --------------------------------------------------------------------

def _setup_losses(seed=0, K=3, D=3, n=4, ipc=2, size=8, dsa=True):
    g = torch.Generator().manual_seed(seed)
    net = build_convnet((3, size, size), K, width=8, depth=2, generator=g)
    for p in net.parameters():
        p.requires_grad_(False)
    real = [torch.randn(D, n, 3, size, size, generator=g) for _ in range(K)]
    syn = torch.randn(K * ipc, 3, size, size, generator=g, requires_grad=True)
    params = [DSAParams.sample(generator=g, mode="all") if dsa else None for _ in range(K)]
    return net, real, syn, params


def test_matching_losses_match_direct_autograd():
    net, real, syn, params = _setup_losses()
    K, D, ipc = len(real), real[0].shape[0], syn.shape[0] // len(real)
    losses, pooled = matching_losses(net, real, syn, params)
    # direct: per class and domain, each side through the net on its own
    direct = torch.zeros(D, dtype=torch.float32)
    direct_pooled = torch.zeros(())
    for c in range(K):
        s = net.embed(augment(syn[c * ipc:(c + 1) * ipc], params[c])).mean(0)
        per_domain = [net.embed(augment(real[c][d], params[c])).mean(0) for d in range(D)]
        direct = direct + torch.stack([((r - s) ** 2).sum() for r in per_domain])
        pooled_real = net.embed(augment(real[c].flatten(0, 1), params[c])).mean(0)
        direct_pooled = direct_pooled + ((pooled_real - s) ** 2).sum()
    torch.testing.assert_close(losses, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, direct_pooled, rtol=1e-5, atol=1e-6)
    (g_direct,) = torch.autograd.grad(direct_pooled, syn)
    (g_pooled,) = torch.autograd.grad(pooled, syn, retain_graph=True)
    torch.testing.assert_close(g_pooled, g_direct, rtol=1e-4, atol=1e-7)
    assert g_pooled.abs().sum() > 0
    # equal batch sizes: the mean of the domain gradients is the pooled gradient (spec sec. 2)
    (g_mean,) = torch.autograd.grad(losses.mean(), syn)
    torch.testing.assert_close(g_mean, g_pooled, rtol=1e-4, atol=1e-7)


def test_matching_losses_gradient_finite_differences():
    net, real, syn, params = _setup_losses(seed=1, K=2, D=2, n=3, ipc=1, size=8, dsa=False)
    net.double()
    real = [r.double() for r in real]
    syn = syn.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: matching_losses(net, real, s, params)[0], (syn,), eps=1e-6, atol=1e-5)


def test_batched_domain_gradients_equal_separate_backwards():
    from sgs_cuda.surgery import domain_gradients
    net, real, syn, params = _setup_losses(seed=2, D=4)
    losses, _ = matching_losses(net, real, syn, params)
    (batched,) = torch.autograd.grad(losses, syn, grad_outputs=torch.eye(4), is_grads_batched=True,
                                     retain_graph=True)
    separate = torch.stack([torch.autograd.grad(losses[d], syn, retain_graph=True)[0] for d in range(4)])
    assert batched.shape == (4, *syn.shape)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(separate[0], separate[1])  # the domains really differ
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # domain_gradients warns when it falls back to D backwards
        torch.testing.assert_close(domain_gradients(losses, syn), separate, rtol=1e-5, atol=1e-7)


# --- the loop -------------------------------------------------------------------------------

def test_dm_sgs_without_extra_terms_is_dm():
    data = TinyDomains()
    sgs0 = SGSConfig(alpha=0.0, beta=0.0)
    dm = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm", iterations=6), progress=False)
    sgs = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm_sgs", iterations=6, sgs=sgs0), progress=False)
    torch.testing.assert_close(sgs.images, dm.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(sgs.history["loss"]), torch.tensor(dm.history["loss"]), rtol=1e-4, atol=1e-6)
    init = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm", iterations=0), progress=False).images
    assert (dm.images - init).abs().max() > 1e-3  # the images did move
    full = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm_sgs", iterations=6), progress=False)
    assert (full.images - dm.images).abs().max() > 1e-4  # the surgery terms change the trajectory


def test_agreement_test_off_is_dm_at_a_longer_step():
    """With three domains tau <= 1/3 keeps every component (rho 0): the update is (1 + alpha) times
    DM's gradient, so DM+SGS is DM at (1 + alpha) times the step (what the premise study's grid
    picked: RESULTS says its gain is step size)."""
    data = TinyDomains()
    off = SGSConfig(tau=0.3, rho=0.0, alpha=1.0, beta=0.25)
    sgs = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm_sgs", iterations=6, lr_img=1.0, sgs=off),
                  progress=False)
    dm = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm", iterations=6, lr_img=2.0), progress=False)
    torch.testing.assert_close(sgs.images, dm.images, rtol=1e-4, atol=1e-5)
    # every component is kept but the imaginary parts of the real-valued bins, which are always zero
    assert all(0.9 < f < 1 for f in sgs.history["mask_fraction"])


def test_history_and_reproducibility():
    data = TinyDomains()
    a = distill(data, ["d0", "d1"], tiny_cfg(iterations=5, log_every=2), progress=False)
    b = distill(data, ["d0", "d1"], tiny_cfg(iterations=5, log_every=3), progress=False)
    assert a.history["iteration"] == list(range(5))
    assert set(a.history) == {"iteration", "loss", "domain_loss", "mask_fraction", "shared_energy", "bands"}
    per_step = {k: v for k, v in a.history.items() if k != "bands"}  # bands: every log_every iterations
    assert all(len(v) == 5 for v in per_step.values())
    assert all(0 <= m <= 1 for m in a.history["mask_fraction"] + a.history["shared_energy"])
    assert torch.equal(a.images, b.images) and per_step == {k: v for k, v in b.history.items() if k != "bands"}
    assert a.history["bands"]["iteration"] == [1, 3] and b.history["bands"]["iteration"] == [2]
    c = distill(data, ["d0", "d1"], tiny_cfg(iterations=5, seed=1), progress=False)
    assert not torch.equal(a.images, c.images)
    assert a.labels.tolist() == [0, 0, 1, 1, 2, 2]
    before = torch.get_rng_state()
    distill(data, ["d0", "d1"], tiny_cfg(iterations=1), progress=False)
    assert torch.equal(before, torch.get_rng_state())  # the caller's global RNG is untouched


def test_dm_reduces_the_loss_from_noise():
    data = TinyDomains(noise=0.2)
    res = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm", init="noise", iterations=40, lr_img=5.0,
                                                      dsa=False, ipc=3, batch_real=36), progress=False)
    first, last = sum(res.history["loss"][:5]) / 5, sum(res.history["loss"][-10:]) / 10
    assert last < 0.7 * first  # a fresh random net every step makes the loss noisy; the trend is clear


def test_real_init_and_source_domains_only():
    data = TinyDomains()
    res = distill(data, ["d1", "d2"], tiny_cfg(iterations=0, ipc=3), progress=False)
    for img, label in zip(res.images, res.labels):  # each initial image is a real image of its class
        pool = torch.cat([data._x[d, "train"][int(label)] for d in ("d1", "d2")])
        assert ((pool - img).abs().flatten(1).max(1).values < 1e-6).any()
    data.calls.clear()
    distill(data, ["d1", "d2"], tiny_cfg(iterations=2), progress=False)
    assert data.calls and {c[0] for c in data.calls} == {"d1", "d2"} and {c[3] for c in data.calls} == {"train"}
    assert {c[2] for c in data.calls if c[2] != 1} == {3}  # batch_real 6 over 2 domains (init draws 1 per domain)
    with pytest.raises(ValueError, match="unknown source domain"):
        distill(data, ["d1", "x"], tiny_cfg(), progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="dc")
    with pytest.raises(ValueError, match="init"):
        DistillConfig(init="zeros")
    with pytest.raises(ValueError, match="ipc"):
        DistillConfig(ipc=0)
    with pytest.raises(ValueError, match="unknown distillation option"):
        DistillConfig.from_dict({"ipcs": 3})
    cfg = DistillConfig.from_dict({**tiny_cfg().to_dict()})
    assert cfg == tiny_cfg() and isinstance(cfg.sgs, SGSConfig)


class Crash(Exception):
    pass




@pytest.mark.parametrize("method,assignment", [("dm_sgs", "random"), ("dm", "random"), ("dm_sgs", "fixed")])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, method, assignment):
    cfg = tiny_cfg(method=method, iterations=7, checkpoint_every=2, sgs=SGSConfig(assignment=assignment))
    full = distill(TinyDomains(), ["d0", "d1", "d2"], cfg, run_dir=tmp_path / "full", progress=False)
    # killed during iteration 6 (init: 3 classes x 2 images over 3 domains = 6 calls; then 9 per iteration)
    with pytest.raises(Crash):
        distill(CrashingDomains(6 + 9 * 5 + 4, Crash), ["d0", "d1", "d2"], cfg, run_dir=tmp_path / "cut", progress=False)
    saved = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=False)
    assert saved["iteration"] == 4 and len(saved["history"]["loss"]) == 4
    assert [p.name for p in (tmp_path / "cut").iterdir()] == [CHECKPOINT_NAME]  # no temporary files left
    resumed = distill(TinyDomains(), ["d0", "d1", "d2"], cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    assert torch.equal(resumed.images, full.images)
    assert resumed.history == full.history
    # a finished checkpoint resumes to the same result without more work
    again = distill(TinyDomains(), ["d0", "d1", "d2"], cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    assert torch.equal(again.images, full.images)


def test_resume_extends_a_run_and_rejects_other_settings(tmp_path):
    short = tiny_cfg(iterations=3, checkpoint_every=3)
    long = tiny_cfg(iterations=6, checkpoint_every=3)
    full = distill(TinyDomains(), ["d0", "d1"], long, progress=False)
    distill(TinyDomains(), ["d0", "d1"], short, run_dir=tmp_path, progress=False)
    extended = distill(TinyDomains(), ["d0", "d1"], long, run_dir=tmp_path, resume=True, progress=False)
    assert torch.equal(extended.images, full.images)
    with pytest.raises(ValueError, match="lr_img"):
        distill(TinyDomains(), ["d0", "d1"], tiny_cfg(iterations=6, lr_img=0.5), run_dir=tmp_path, resume=True,
                progress=False)
    with pytest.raises(ValueError, match="source domains"):
        distill(TinyDomains(), ["d0", "d2"], long, run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="beyond"):
        distill(TinyDomains(), ["d0", "d1"], tiny_cfg(iterations=2, checkpoint_every=3), run_dir=tmp_path,
                resume=True, progress=False)


def test_damaged_checkpoint_is_one_line_and_resume_is_announced(tmp_path):
    from sgs_cuda._io import RunFolderError

    cfg = tiny_cfg(iterations=3, checkpoint_every=3)
    distill(TinyDomains(), ["d0", "d1"], cfg, run_dir=tmp_path, progress=False)
    lines = []
    longer = tiny_cfg(iterations=4, checkpoint_every=3)
    distill(TinyDomains(), ["d0", "d1"], longer, run_dir=tmp_path, resume=True, progress=False, log=lines.append)
    assert lines[0].startswith("memory estimate per process:")
    assert lines[1:] == [f"resuming from iteration 3 of 4 ({tmp_path / CHECKPOINT_NAME})"]
    ckpt = tmp_path / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RunFolderError, match="damaged.*delete it") as info:
        distill(TinyDomains(), ["d0", "d1"], longer, run_dir=tmp_path, resume=True, progress=False)
    assert str(ckpt) in str(info.value) and "\n" not in str(info.value)
    torch.save({"images": 1}, ckpt)  # a valid file, but not a checkpoint
    with pytest.raises(RunFolderError, match="not a checkpoint"):
        distill(TinyDomains(), ["d0", "d1"], longer, run_dir=tmp_path, resume=True, progress=False)


class GappyDomains(TinyDomains):
    """Domain d1 has no images of class 0 (as a pseudo-domain may)."""

    def count(self, domain, label, split="train"):
        return 0 if (domain, label) == ("d1", 0) else super().count(domain, label, split)

    def real_batch(self, domain, label, n, generator=None, split="train"):
        if (domain, label) == ("d1", 0):
            raise ValueError("d1 has no images of c0")
        return super().real_batch(domain, label, n, generator, split)


def test_domains_lacking_a_class():
    data = GappyDomains()
    with pytest.warns(RuntimeWarning, match="lack classes"):
        dm = distill(data, ["d0", "d1", "d2"], tiny_cfg(method="dm", iterations=4), progress=False)
    with pytest.warns(RuntimeWarning, match="lack classes"):
        sgs = distill(data, ["d0", "d1", "d2"], tiny_cfg(iterations=4, sgs=SGSConfig(alpha=0, beta=0)), progress=False)
    torch.testing.assert_close(sgs.images, dm.images, rtol=1e-5, atol=1e-5)
    assert not any((d, 0) == ("d1", c) for d, c, *_ in data.calls)
    # the missing domain's class term uses the mean of the domains that have the class
    net, real, syn, params = _setup_losses(seed=6, D=3)
    real[0] = real[0][[0, 2]]
    present = [[0, 2], [0, 1, 2], [0, 1, 2]]
    losses, pooled = matching_losses(net, real, syn, params, present=present, num_domains=3)
    ipc = 2
    s0 = net.embed(augment(syn[:ipc], params[0])).mean(0)
    r0 = [net.embed(augment(real[0][i], params[0])).mean(0) for i in range(2)]
    rest = [sum(((net.embed(augment(real[c][d], params[c])).mean(0)
                  - net.embed(augment(syn[c * ipc:(c + 1) * ipc], params[c])).mean(0)) ** 2).sum() for c in (1, 2))
            for d in range(3)]
    expected_d1 = (((r0[0] + r0[1]) / 2 - s0) ** 2).sum() + rest[1]
    torch.testing.assert_close(losses[1], expected_d1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0], ((r0[0] - s0) ** 2).sum() + rest[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no source domain"):
        distill(data, ["d1"], tiny_cfg(), progress=False)


def test_progress_bar_shows_loss_and_mask(capsys):
    distill(TinyDomains(), ["d0", "d1"], tiny_cfg(iterations=2, log_every=1), progress=True)
    err = capsys.readouterr().err
    assert "dm_sgs" in err and "loss=" in err and "mask=" in err
