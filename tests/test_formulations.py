"""The surgery's options beyond the spec (issue 18): SGSConfig as their one carrier, each
formulation against the float64 reference, its invariants, and the DM-loop helper's state."""
import argparse
import math

import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda import SGSConfig, SpectralGradientSurgery, sgs_reference, spectral_gradient_surgery
from sgs_cuda import options as opts
from sgs_cuda.dm import DistillConfig, distill
from sgs_cuda.dm.loop import _spectral_init
from sgs_cuda.reference import pcgrad_spectrum


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def fresh(D=3, N=4, C=2, H=8, W=8, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(D, N, C, H, W, dtype=torch.float64, generator=g)


# --- SGSConfig: validation, kernel arguments, flags ----------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(tau=1.5), "tau must lie in"), (dict(ema=1.0), "ema must be < 1"), (dict(decay=-1), "decay must be >= 0"),
    (dict(pool="domain"), "pool must be one of"), (dict(combine="sum"), "combine must be one of"),
    (dict(equalize="yes"), "equalize must be true or false"), (dict(alpha=math.inf), "alpha must be finite"),
    (dict(sign_test=2.0), "sign_test must lie in"), (dict(space="spatial", decay=0.1), "spatial ablation"),
    (dict(space="spatial", ema=0.5), "spatial ablation"), (dict(space="spatial", spread=0.1), "spatial ablation"),
])
def test_config_refuses_bad_values_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        SGSConfig(**bad)


def test_op_refuses_unknown_options_and_bad_values():
    grads = fresh()
    with pytest.raises(TypeError, match=r"unknown surgery option\(s\) \['gamma'\]"):
        spectral_gradient_surgery(grads, gamma=1.0)
    with pytest.raises(ValueError, match="mean_weight must be a number"):
        spectral_gradient_surgery(grads, mean_weight="x")
    with pytest.raises(ValueError, match="decay=0.1 .* needs the synthetic images"):
        spectral_gradient_surgery(grads, decay=0.1)
    with pytest.raises(ValueError, match=r"agree_on must have shape \[3, 4, 2, 8, 8\]"):
        spectral_gradient_surgery(grads, agree_on=grads[:, :2])


def test_sign_test_threshold_is_the_binomial_one():
    # D = 6: |2k - 6| in {0, 2, 4, 6}; P(>= 6) = 2/64, P(>= 4) = 14/64, P(>= 2) = 44/64
    assert opts.sign_test_threshold(6, 0.05) == 1.0
    assert opts.sign_test_threshold(6, 0.25) == pytest.approx(4 / 6)
    assert opts.sign_test_threshold(2, 0.5) == 1.0  # both signs equal: p = 1/2
    with pytest.raises(ValueError, match="D = 3 domains even unanimous signs have p = 0.25"):
        opts.sign_test_threshold(3, 0.05)
    assert SGSConfig(sign_test=0.25).kernel_args(6).tau == pytest.approx(4 / 6)
    assert SGSConfig(tau=0.5).kernel_args(6).tau == 0.5


def test_sign_test_equals_the_matching_tau():
    grads, assign = fresh(D=6), torch.tensor([0, 5, 2, 3])
    a = spectral_gradient_surgery(grads, assign, sign_test=0.25)
    b = spectral_gradient_surgery(grads, assign, tau=4 / 6)
    assert torch.equal(a, b)


def test_flags_round_trip_through_the_cli_parser():
    cfg = SGSConfig(tau=0.5, ema=0.9, pool="class", equalize=True, decay=1e-3, combine="pcgrad", mean_weight=0)
    parser = argparse.ArgumentParser()
    opts.add_arguments(parser)
    ns = parser.parse_args(cfg.flags())
    assert SGSConfig(**{name: getattr(ns, name) for name, _ in opts.flag_paths()}) == cfg
    assert all(path == f"sgs.{name}" for name, path in opts.flag_paths())
    assert set(n for n, _ in opts.flag_paths()) == set(SGSConfig.__dataclass_fields__)


def test_saved_configs_without_the_new_options_read_with_defaults():
    old = {"tau": 1.0, "rho": 0.0, "alpha": 1.0, "beta": 0.25, "mask": "hard", "assignment": "random",
           "space": "spectral", "normalize": "none"}
    assert SGSConfig.from_dict(old) == SGSConfig()
    with pytest.raises(ValueError, match=r"unknown surgery option\(s\) \['bogus'\]"):
        SGSConfig.from_dict({**old, "bogus": 1})
    from sgs_cuda.dm.checkpoint import relevant_settings
    assert relevant_settings({"method": "dm_sgs", "sgs": old}) == relevant_settings(
        {"method": "dm_sgs", "sgs": SGSConfig().to_dict()})


# --- the op's general path against the float64 reference ------------------------------------------

CASES = {
    "agree_on": dict(),
    "equalize": dict(rho=0.4, equalize=True),
    "equalize_soft": dict(mask="soft", equalize=True),
    "replace": dict(mean_weight=0.0),
    "removal": dict(decay=0.3),
    "pcgrad": dict(combine="pcgrad", mean_weight=0.0, beta=0.0),
    "all": dict(rho=0.3, equalize=True, mean_weight=0.5, decay=0.2, alpha=0.7, beta=0.4),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(3, 4, 2, 8, 8), (2, 3, 1, 7, 5), (1, 2, 1, 6, 9)])
def test_general_options_match_the_float64_reference(name, shape):
    options = CASES[name]
    grads = fresh(*shape)
    D, N = shape[:2]
    assign = torch.randint(0, D, (N,))
    agree = fresh(*shape) if name in ("agree_on", "all") else None
    images = fresh(*shape)[0]
    parts = spectral_gradient_surgery(grads, assign, agree_on=agree, images=images, return_parts=True, **options)
    args = SGSConfig(**options).kernel_args(D)
    want = sgs_reference(grads, assign, *args.spec, return_parts=True, agree_on=agree, equalize=args.equalize,
                         mean_weight=args.mean_weight, images=images, decay=args.decay, combine=args.combine)
    for got, ref in zip(parts[:4], want[:4]):
        assert rel(got, ref) < 1e-10
    assert torch.allclose(parts.diagnostics["mask_fraction"], want[4][0] / want[4][1])
    update = spectral_gradient_surgery(grads, assign, agree_on=agree, images=images, **options)
    assert rel(update, want[0]) < 1e-10


def test_the_spec_options_through_the_general_path_give_the_fused_result():
    grads, assign = fresh(), torch.tensor([0, 1, 2, 1])
    fused = spectral_gradient_surgery(grads, assign, return_parts=True)
    general = spectral_gradient_surgery(grads, assign, agree_on=grads, return_parts=True)
    for a, b in zip(fused[:4], general[:4]):
        assert rel(a, b) < 1e-12


def test_float32_general_path_matches_the_reference():
    from sgs_cuda.reference import separated_grads
    grads64 = separated_grads(3, 3, 2, 8, 8, rho=0.25, seed=int(torch.randint(0, 10**6, ())))
    assign = torch.tensor([2, 0, 1])
    images = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    got = spectral_gradient_surgery(grads64.float(), assign, images=images.float(), mean_weight=0.5, decay=0.1)
    want = sgs_reference(grads64, assign, 1.0, 0.0, 1.0, 0.25, mean_weight=0.5, images=images, decay=0.1)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5


def test_general_path_computes_wide_for_extreme_planes():
    grads, assign = fresh() * 2.0 ** 100, torch.tensor([0, 1, 2, 1])
    got = spectral_gradient_surgery(grads.float(), assign, mean_weight=0.0, equalize=True)
    want = sgs_reference(grads, assign, 1.0, 0.0, 1.0, 0.25, mean_weight=0.0, equalize=True)
    assert torch.isfinite(got).all() and rel(got, want) < 1e-5


@pytest.mark.parametrize("mean_weight", [0.0, 0.5, -1.5, 3.0])
@pytest.mark.parametrize("normalize", ["none", "dm_norm", "kept_fraction"])
def test_mean_weight_runs_the_fused_kernels_and_matches_the_reference(monkeypatch, mean_weight, normalize):
    """The replace formulation is linear in the kernels' mean part: the fused kernels run it (the
    general path is never taken) and every output matches the float64 reference."""
    from sgs_cuda import ops

    def no_general(*args, **kwargs):
        raise AssertionError("mean_weight alone took the general path")
    monkeypatch.setattr(ops, "_general", no_general)
    grads, assign = fresh(D=3, N=5, C=2, H=8, W=6), torch.randint(0, 3, (5,))
    options = dict(mean_weight=mean_weight, normalize=normalize, alpha=0.7, beta=0.4)
    args = SGSConfig(**options).kernel_args(3)
    assert args.fused and not args.is_spec
    want = sgs_reference(grads, assign, *args.spec, return_parts=True, mean_weight=mean_weight)
    ref = ops._normalize(ops._parts(*want), args.alpha, normalize)
    parts = spectral_gradient_surgery(grads, assign, return_parts=True, **options)
    for got, expected in zip(parts[:4], ref[:4]):
        assert rel(got, expected) < 1e-10
    step = spectral_gradient_surgery(grads, assign, return_diagnostics=True, **options)
    assert rel(step.update, ref.update) < 1e-10
    assert torch.allclose(step.diagnostics["mask_fraction"], ref.diagnostics["mask_fraction"])
    assert rel(spectral_gradient_surgery(grads, assign, **options), ref.update) < 1e-10
    # float32 and float16, also with planes the op must rescale into the kernels' range
    for dtype, scale, tol in [(torch.float32, 1.0, 1e-5), (torch.float32, 2.0 ** 110, 1e-5),
                              (torch.float16, 1.0, 2e-3), (torch.float16, 2.0 ** 10, 2e-3)]:
        low = (grads * scale).to(dtype)
        want = ops._normalize(ops._parts(*sgs_reference(low.double(), assign, *args.spec, return_parts=True,
                                                        mean_weight=mean_weight)), args.alpha, normalize).update
        got = spectral_gradient_surgery(low, assign, **options)
        assert got.dtype == dtype and torch.isfinite(got).all() and rel(got, want) < tol, (dtype, scale)


def test_mean_weight_on_the_fused_path_is_differentiable():
    grads = fresh(D=2, N=3, C=1, H=6, W=6).requires_grad_()
    assign, weights = torch.tensor([1, 0, 1]), torch.randn(3, 1, 6, 6, dtype=torch.float64)
    for normalize in ("none", "dm_norm"):
        (g_op,) = torch.autograd.grad((spectral_gradient_surgery(grads, assign, mean_weight=0.25,
                                                                 normalize=normalize) * weights).sum(), grads)
        ref = ops_reference_update(grads, assign, 0.25, normalize)
        (g_ref,) = torch.autograd.grad((ref * weights).sum(), grads)
        assert rel(g_op, g_ref) < 1e-10, normalize


def ops_reference_update(grads, assign, mean_weight, normalize):
    """The reference's update with the mask fixed, normalised as the op does (differentiable)."""
    from sgs_cuda import ops
    parts = sgs_reference(grads, assign, 1.0, 0.0, 1.0, 0.25, return_parts=True, mean_weight=mean_weight)
    return ops._normalize(ops._parts(*parts), 1.0, normalize).update


def test_general_path_is_differentiable_with_the_mask_fixed():
    grads = fresh(D=2, N=2, C=1, H=6, W=6).requires_grad_()
    assign, images = torch.tensor([1, 0]), fresh(D=1, N=2, C=1, H=6, W=6)[0]
    weights = torch.randn(2, 1, 6, 6, dtype=torch.float64)

    def f(g):
        return (spectral_gradient_surgery(g, assign, images=images, mean_weight=0.3, decay=0.2, check_finite=False)
                * weights).sum()
    f(grads).backward()
    # the map is linear in grads once the mask is fixed: a finite difference along a direction that
    # keeps every sign and magnitude ratio (a positive scale) is exact
    eps = 1e-3
    assert abs((f(grads.detach() * (1 + eps)) - f(grads.detach())).item() / eps
               - (grads.grad * grads.detach()).sum().item()) < 1e-6 * max(1.0, abs(f(grads).item()))


# --- invariants of each formulation ---------------------------------------------------------------

def test_replace_at_the_dm_step_has_the_dm_norm():
    grads, assign = fresh(), torch.tensor([0, 1, 2, 0])
    out = spectral_gradient_surgery(grads, assign, mean_weight=0.0, normalize="dm_norm")
    dm = grads.mean(0)
    assert torch.allclose(out.flatten(1).norm(dim=1), dm.flatten(1).norm(dim=1), rtol=1e-10)
    plain = spectral_gradient_surgery(grads, assign, mean_weight=0.0, return_parts=True)
    assert rel(plain.update, plain.shared + 0.25 * plain.diversity) < 1e-12  # no DM gradient in it


def test_removal_shrinks_only_the_disagreeing_components():
    grads, assign, images = fresh(), torch.tensor([0, 1, 2, 0]), fresh()[0]
    base = spectral_gradient_surgery(grads, assign)
    removal = spectral_gradient_surgery(grads, assign, images=images, decay=0.5) - base
    spec_g = torch.fft.rfft2(grads)
    agree_re = torch.sign(spec_g.real).sum(0).abs() == 3
    agree_im = torch.sign(spec_g.imag).sum(0).abs() == 3
    spec_r, spec_i = torch.fft.rfft2(removal), torch.fft.rfft2(images)
    assert torch.allclose(spec_r.real[agree_re], torch.zeros(()).double(), atol=1e-10)  # kept: untouched
    assert torch.allclose(spec_r.real[~agree_re], 0.5 * spec_i.real[~agree_re], atol=1e-10)
    assert torch.allclose(spec_r.imag[~agree_im & (spec_i.imag.abs() > 1e-9)],
                          0.5 * spec_i.imag[~agree_im & (spec_i.imag.abs() > 1e-9)], atol=1e-10)
    # a single domain agrees with itself everywhere: nothing is removed
    one = spectral_gradient_surgery(grads[:1], assign * 0, images=images, decay=0.5)
    assert rel(one, spectral_gradient_surgery(grads[:1], assign * 0)) < 1e-12


def test_equalize_makes_the_mask_blind_to_a_louder_domain():
    grads, assign = fresh(), torch.tensor([0, 1, 2, 0])
    louder = grads.clone()
    louder[1] *= 7.0  # one domain's planes scaled: its shape is the same
    for equalize, same in ((True, True), (False, False)):
        a = spectral_gradient_surgery(grads, assign, rho=0.3, equalize=equalize, return_parts=True)
        b = spectral_gradient_surgery(louder, assign, rho=0.3, equalize=equalize, return_parts=True)
        assert (a.diagnostics["mask_fraction"].item() == b.diagnostics["mask_fraction"].item()) is same


def test_pcgrad_projects_out_conflicts_and_leaves_agreement_alone():
    x = torch.tensor([[1.0 + 0.0j], [-1.0 + 1.0j]], dtype=torch.complex128)  # D = 2, one bin: conflict
    projected, conflicted = pcgrad_spectrum(x)
    # d0 minus its projection on d1: (1, 0) - (-1/2)(-1, 1) = (0.5, 0.5); d1: (-1, 1) - (-1)(1, 0) = (0, 1)
    assert torch.allclose(projected, torch.tensor([(0.5 + 0.5j + 1j) / 2], dtype=torch.complex128))
    assert conflicted.tolist() == [1.0]
    same = torch.tensor([[1.0 + 2.0j], [2.0 + 4.0j]], dtype=torch.complex128)
    projected, conflicted = pcgrad_spectrum(same)
    assert torch.allclose(projected, same.mean(0)) and conflicted.tolist() == [0.0]
    grads = fresh()
    identical = grads[:1].expand(3, -1, -1, -1, -1)
    out = spectral_gradient_surgery(identical, combine="pcgrad", mean_weight=0.0, beta=0.0)
    assert rel(out, grads[0]) < 1e-12  # no conflict: PCGrad is the mean


# --- the helper: agreement over time and over a class, state across steps ------------------------

def test_ema_agreement_reads_the_moving_average_and_checkpoints_it():
    g1, g2, assign = fresh(seed=1), fresh(seed=2), torch.tensor([0, 1, 2, 0])
    sgs = SpectralGradientSurgery(SGSConfig(ema=0.75))
    sgs(g1, assign)
    assert torch.allclose(sgs.last_agree_on.double(), g1, atol=1e-6)  # the first step starts at it
    state = sgs.state_dict()
    out = sgs(g2, assign)
    average = 0.75 * g1.float() + 0.25 * g2.float()
    want = spectral_gradient_surgery(g2, assign, agree_on=average.double())
    assert rel(out, want) < 1e-6
    resumed = SpectralGradientSurgery(SGSConfig(ema=0.75))
    resumed.load_state_dict(state)
    assert torch.equal(resumed(g2, assign), out)


def test_ema_rows_keep_one_average_per_image_of_the_whole_set():
    g, assign = fresh(N=4), torch.tensor([0, 1, 2, 0])
    whole = SpectralGradientSurgery(SGSConfig(ema=0.5))
    chunked = SpectralGradientSurgery(SGSConfig(ema=0.5))
    for _ in range(2):
        a = whole(g, assign)
        b = torch.cat([chunked(g[:, :2], assign[:2], rows=slice(0, 2), num_images=4),
                       chunked(g[:, 2:], assign[2:], rows=slice(2, 4), num_images=4)])
        assert torch.equal(a, b)


def test_class_pooling_gives_one_mask_per_class():
    g, assign = fresh(N=4), torch.tensor([0, 1, 2, 0])
    sgs = SpectralGradientSurgery(SGSConfig(pool="class"), images_per_class=2)
    sgs(g, assign)
    agree = sgs.last_agree_on
    assert torch.allclose(agree[:, 0], g[:, :2].mean(1)) and torch.equal(agree[:, 0], agree[:, 1])
    with pytest.raises(ValueError, match="pool='class' and spread need images_per_class"):
        SpectralGradientSurgery(SGSConfig(pool="class"))


def _cfg(**kw):
    return DistillConfig(**{**dict(method="dm_sgs", ipc=2, iterations=4, batch_real=6, width=8, depth=2,
                                   log_every=2), **kw})


@pytest.mark.parametrize("sgs", [SGSConfig(ema=0.9), SGSConfig(pool="class", decay=1e-3, spread=1e-2),
                                 SGSConfig(combine="pcgrad", mean_weight=0.0, beta=0.0)])
def test_loop_with_state_resumes_to_the_same_images(tmp_path, sgs):
    domains = ["d0", "d1", "d2"]
    whole = distill(TinyDomains(), domains, _cfg(sgs=sgs), progress=False, log=lambda m: None)
    distill(TinyDomains(), domains, _cfg(sgs=sgs, iterations=2, checkpoint_every=2), run_dir=tmp_path,
            progress=False, log=lambda m: None)
    resumed = distill(TinyDomains(), domains, _cfg(sgs=sgs, checkpoint_every=2), run_dir=tmp_path, resume=True,
                      progress=False, log=lambda m: None)
    assert torch.equal(whole.images, resumed.images)
    assert whole.history["mask_fraction"] == resumed.history["mask_fraction"]


# --- spectral initialisation ----------------------------------------------------------------------

class TwoDomainClasses(TinyDomains):
    """TinyDomains whose domain d1 carries a strong grating on one bin for every image."""

    def real_batch(self, domain, label, n, generator=None, split="train"):
        x = super().real_batch(domain, label, n, generator=generator, split=split)
        if domain == "d1":
            h, w = x.shape[-2:]
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            x = x + 5 * torch.cos(2 * math.pi * (2 * xx / w + yy / h))
        return x


@pytest.mark.parametrize("init", ["spectral", "spectral_min"])
def test_spectral_init_keeps_phase_and_takes_the_class_amplitude(init):
    data = TwoDomainClasses()
    images = data.real_batch("d1", 0, 3, generator=torch.Generator().manual_seed(0))
    out = _spectral_init(data, ["d0", "d1", "d2"], 0, images, init, torch.Generator().manual_seed(1))
    spec_in, spec_out = torch.fft.rfft2(images.double()), torch.fft.rfft2(out.double())
    big = spec_in.abs() > 1e-3
    assert torch.allclose(torch.angle(spec_out)[big], torch.angle(spec_in)[big], atol=1e-4)  # phase kept
    amp = spec_out.abs()
    assert torch.allclose(amp[0], amp[1], rtol=1e-4, atol=1e-4)  # one amplitude for the class
    # the grating bin: d1's cue is averaged down (spectral) or brought to the quiet domains' level (min)
    cue = spec_in.abs()[0, 0, 1, 2]
    assert amp[0, 0, 1, 2] < (0.5 if init == "spectral" else 0.1) * cue


def test_cli_reads_the_options_and_the_inits():
    from sgs_cuda.cli import build_parser, overrides_from_args
    args = build_parser().parse_args(["run", "--ema", "0.9", "--pool", "class", "--equalize", "--decay", "0.001",
                                      "--init", "spectral_min"])
    over = overrides_from_args(args)
    assert over["sgs.ema"] == 0.9 and over["sgs.pool"] == "class" and over["sgs.equalize"] is True
    assert over["sgs.decay"] == 0.001 and over["distill.init"] == "spectral_min"


# --- agreement on class content -------------------------------------------------------------------

def test_contrast_gradient_pulls_to_the_domain_class_mean_and_pushes_from_the_others():
    from sgs_cuda.dm.matching import contrast_losses
    K, D, F = 3, 2, 5
    mu_real = torch.randn(K, D, F, dtype=torch.float64)
    mu_syn = torch.randn(K, F, dtype=torch.float64, requires_grad=True)
    losses = contrast_losses(mu_real, mu_syn)
    for d in range(D):
        (g,) = torch.autograd.grad(losses[d], mu_syn, retain_graph=True)
        for c in range(K):
            others = torch.stack([mu_real[j, d] for j in range(K) if j != c]).mean(0)
            assert torch.allclose(g[c], 2 * (others - mu_real[c, d]))


def test_contrast_agreement_needs_its_source_and_runs_in_the_loop(tmp_path):
    sgs = SpectralGradientSurgery(SGSConfig(agree_on="contrast"))
    with pytest.raises(ValueError, match="agree_on='contrast' needs the class-contrast gradients"):
        sgs(fresh(), torch.tensor([0, 1, 2, 0]))
    g, source = fresh(seed=3), fresh(seed=4)
    out = sgs(g, torch.tensor([0, 1, 2, 0]), agree_source=source)
    assert rel(out, spectral_gradient_surgery(g, torch.tensor([0, 1, 2, 0]), agree_on=source)) < 1e-12
    cfg = SGSConfig(agree_on="contrast", ema=0.5)
    domains = ["d0", "d1", "d2"]
    whole = distill(TinyDomains(), domains, _cfg(sgs=cfg), progress=False, log=lambda m: None)
    plain = distill(TinyDomains(), domains, _cfg(), progress=False, log=lambda m: None)
    assert not torch.equal(whole.images, plain.images)
    distill(TinyDomains(), domains, _cfg(sgs=cfg, iterations=2, checkpoint_every=2), run_dir=tmp_path,
            progress=False, log=lambda m: None)
    resumed = distill(TinyDomains(), domains, _cfg(sgs=cfg, checkpoint_every=2), run_dir=tmp_path, resume=True,
                      progress=False, log=lambda m: None)
    assert torch.equal(whole.images, resumed.images)


# --- amplitude removal ----------------------------------------------------------------------------

def test_amplitude_removal_takes_the_excess_over_the_floor_with_the_phase():
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    spec = torch.fft.rfft2(images)
    sgs = SpectralGradientSurgery(SGSConfig(amp_decay=0.4, alpha=0.0, beta=0.0))
    sgs.amplitude_floor = spec.abs() / 2  # every amplitude twice its floor: the excess is half the image
    assert rel(sgs.amplitude_removal(images), 0.4 * 0.5 * images) < 1e-12
    sgs.amplitude_floor = spec.abs() * 1.5  # below the floor everywhere: nothing to remove
    assert sgs.amplitude_removal(images).abs().max() < 1e-12
    grads, assign = fresh(N=2, C=1), torch.tensor([0, 1])
    sgs.amplitude_floor = spec.abs() / 2
    out = sgs(grads, assign, images=images)
    assert rel(out, grads.mean(0) + 0.2 * images) < 1e-10  # alpha = beta = 0: DM plus the removal
    with pytest.raises(ValueError, match="amp_decay needs the synthetic images and their amplitude floor"):
        SpectralGradientSurgery(SGSConfig(amp_decay=0.1))(grads, assign, images=images)


def test_amplitude_removal_in_the_loop_moves_the_set_and_resumes(tmp_path):
    cfg = SGSConfig(alpha=0.0, beta=0.0, amp_decay=0.05)
    domains = ["d0", "d1", "d2"]
    data = TwoDomainClasses  # d1 carries a strong grating: its bin is above the class floor
    whole = distill(data(), domains, _cfg(sgs=cfg), progress=False, log=lambda m: None)
    plain = distill(data(), domains, _cfg(sgs=SGSConfig(alpha=0.0, beta=0.0)), progress=False, log=lambda m: None)
    assert not torch.equal(whole.images, plain.images)
    distill(data(), domains, _cfg(sgs=cfg, iterations=2, checkpoint_every=2), run_dir=tmp_path, progress=False,
            log=lambda m: None)
    resumed = distill(data(), domains, _cfg(sgs=cfg, checkpoint_every=2), run_dir=tmp_path, resume=True,
                      progress=False, log=lambda m: None)
    assert torch.equal(whole.images, resumed.images)


# --- diversity within the set ---------------------------------------------------------------------

def test_spread_pushes_a_class_apart_where_the_domains_disagree():
    grads, assign = fresh(N=4, C=1), torch.tensor([0, 1, 2, 0])
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sgs = SpectralGradientSurgery(SGSConfig(spread=0.5), images_per_class=2)
    term = sgs(grads, assign, images=images) - spectral_gradient_surgery(grads, assign)
    spec = torch.fft.rfft2(grads)
    agree_re = (torch.sign(spec.real).sum(0).abs() == 3).double()
    own = torch.fft.rfft2(images).reshape(2, 2, 1, 8, 5)
    dev = (own - own.mean(1, keepdim=True)).reshape(4, 1, 8, 5)
    got = torch.fft.rfft2(term)
    assert torch.allclose(got.real, -0.5 * (1 - agree_re) * dev.real, atol=1e-10)
    # images equal within each class: nothing to spread
    same = images[::2].repeat_interleave(2, 0)
    assert rel(sgs(grads, assign, images=same), spectral_gradient_surgery(grads, assign)) < 1e-12
    with pytest.raises(ValueError, match="spread need images_per_class"):
        SpectralGradientSurgery(SGSConfig(spread=0.5))


def test_general_op_passes_opcheck():
    """``sgs::surgery_general``'s schema, fake kernel and reference backward (the AOT and autograd
    registration tests of ``torch.library.opcheck``)."""
    from sgs_cuda import _build
    if not (_build.use_extension(torch.device("cpu")) and hasattr(torch.ops.sgs, "surgery_general")):
        pytest.skip("the C++ extension is not built here")
    grads = fresh(N=2, C=1, H=6, W=6).requires_grad_()
    assign, agree, images = torch.tensor([2, 0]), fresh(N=2, C=1, H=6, W=6), fresh(N=2, C=1, H=6, W=6)[0]
    torch.library.opcheck(torch.ops.sgs.surgery_general,
                          (grads, assign, agree, images, 1.0, 0.2, 0.7, 0.3, 0.5, 0.1, "hard", True))
