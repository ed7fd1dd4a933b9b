"""The premise benchmark (sgs_cuda.data.fmnist_cues) on small generated Fashion-MNIST IDX files,
and the mask-against-truth diagnostic (sgs_cuda.dm.bands) it feeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgs_cuda.data import FashionMNISTStyles
from sgs_cuda.data.fmnist_cues import (CUE_FAMILIES, GRATINGS, N_CUES, FashionMNISTCues, cue_shifts, cue_truth_bins,
                                       render_cues)
from sgs_cuda.dm.bands import chance_keep_rate, truth_mask_sums
from sgs_cuda.reference import agreement_mask, magnitude_agreement

from test_data import make_fashion_idx


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGS_CACHE_DIR", str(tmp_path / "sgs-cache"))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return make_fashion_idx(tmp_path_factory.mktemp("fmnist"), per_class_train=40, per_class_test=16)


def cues(idx_dir, tmp_path, **kw):
    return FashionMNISTCues(root=idx_dir, cache_dir=tmp_path / "cache", per_class_train=10, per_class_test=4, **kw)


def test_grating_truth_is_exactly_the_grating_bins():
    truth = cue_truth_bins("grating")
    expected = torch.zeros(32, 17, dtype=torch.bool)
    for ky, kx in GRATINGS:
        expected[ky % 32, kx] = True
        if kx == 0:  # the conjugate of a kx = 0 bin is in the half-spectrum too
            expected[-ky % 32, 0] = True
    assert torch.equal(truth, expected)


def test_patch_truth_is_spread_over_many_bins():
    truth = cue_truth_bins("patch")
    assert int(truth.sum()) > 5 * int(cue_truth_bins("grating").sum())
    assert not truth[0, 0]  # the mean brightness offset is not the cue's content


def test_render_cues_unit_grating_and_patch_colour():
    rng = np.random.default_rng(0)
    g = render_cues("grating", np.arange(N_CUES), rng)
    assert g.shape == (N_CUES, 3, 32, 32) and abs(g).max() <= 1 + 1e-6 and (g[:, 0] == g[:, 1]).all()
    p = render_cues("patch", np.arange(N_CUES), rng)
    area = (p.max(axis=1) > 0).sum(axis=(1, 2))
    assert (area == 36).all()
    positions = {tuple(np.argwhere(p[i, 0] > 0)[0]) for i in range(N_CUES)}
    assert len(positions) == N_CUES  # ten distinct places


def test_shifts_differ_between_source_domains():
    shifts = cue_shifts(["a", "b", "c", "d"], "a")
    assert shifts["a"] is None
    assert len({shifts[d] for d in "bcd"}) == 3


@pytest.mark.parametrize("family", CUE_FAMILIES)
def test_cue_is_class_correlated_in_sources_and_not_on_the_target(idx_dir, tmp_path, family):
    data = cues(idx_dir, tmp_path, cue=family, cue_strength=0.5)
    maps = {}
    for domain in data.domains:
        _, labels = data.raw(domain, "train")
        cue = data.cue_index[(domain, "train")]
        pairs = {(int(y), int(c)) for y, c in zip(labels, cue)}
        if domain == data.cue_free:
            per_class = [{c for y, c in pairs if y == k} for k in range(10)]
            assert sum(len(s) for s in per_class) > 20  # each class sees several cues
        else:
            assert len(pairs) == 10  # one cue per class: the cue predicts the class in this domain
            maps[domain] = dict(pairs)
    for a in maps:  # ... through a map that differs from every other source domain's, class by class
        for b in maps:
            if a < b:
                assert all(maps[a][k] != maps[b][k] for k in range(10))


def test_strength_zero_is_the_plain_styles_and_build_is_deterministic(idx_dir, tmp_path):
    plain = FashionMNISTStyles(root=idx_dir, cache_dir=tmp_path / "cache", per_class_train=10, per_class_test=4)
    zero = cues(idx_dir, tmp_path, cue_strength=0.0)
    a, b = cues(idx_dir, tmp_path, cue_strength=0.7), cues(idx_dir, tmp_path, cue_strength=0.7)
    for d in plain.domains:
        for split in ("train", "test"):
            assert torch.equal(zero.raw(d, split)[0], plain.raw(d, split)[0])
            assert torch.equal(a.raw(d, split)[0], b.raw(d, split)[0])
            assert not torch.equal(a.raw(d, split)[0], plain.raw(d, split)[0])


def test_planted_grating_energy_sits_in_the_truth_bins(idx_dir, tmp_path):
    plain = cues(idx_dir, tmp_path, cue_strength=0.0)
    strong = cues(idx_dir, tmp_path, cue_strength=1.0)
    x0 = plain.raw("cartoon", "train")[0].double()
    x1 = strong.raw("cartoon", "train")[0].double()
    added = torch.fft.rfft2(x1 - x0).abs().square().sum(dim=(0, 1))  # clipping spreads a little energy
    assert added[strong.cue_bins].sum() / added.sum() > 0.8


def test_bad_options_are_refused(idx_dir, tmp_path):
    with pytest.raises(ValueError, match="cue must be one of"):
        cues(idx_dir, tmp_path, cue="stripes")
    with pytest.raises(ValueError, match="cue_strength"):
        cues(idx_dir, tmp_path, cue_strength=1.5)
    with pytest.raises(ValueError, match="cue_free"):
        cues(idx_dir, tmp_path, cue_free="mars")


def test_the_shortcut_is_real(idx_dir, tmp_path):
    """A ConvNet trained on the pooled sources' real images keeps its in-domain accuracy as the
    cue grows, and loses accuracy on the cue-free target."""
    from sgs_cuda.evaluate import EvalConfig, evaluate_synthetic

    cfg = EvalConfig(epochs=40, num_eval=1, width=16, dsa=False, batch=64)
    scores = {}
    for s in (0.0, 1.0):
        data = cues(idx_dir, tmp_path, cue="patch", cue_strength=s)
        x, y = data.split_tensors(["cartoon", "sketch", "painting"], "train")
        r = evaluate_synthetic(x, y, data, ["cartoon", "sketch", "painting"], "photo", cfg, seed=0)
        scores[s] = (r["ood_acc_mean"], r["in_domain_acc_mean"])
    assert scores[1.0][1] > 0.8
    assert scores[0.0][0] - scores[1.0][0] > 0.15, scores


# -- the mask against the truth ---------------------------------------------------------------------

@pytest.mark.parametrize("D", [1, 2, 3, 6])
@pytest.mark.parametrize("tau", [1.0, 0.5, 0.3])
def test_chance_rate_matches_independent_fair_signs(D, tau):
    g = torch.Generator().manual_seed(D)
    signs = torch.randint(0, 2, (D, 200_000), generator=g).double() * 2 - 1
    observed = float(((signs.sum(0).abs() / D) >= tau).double().mean())
    assert abs(chance_keep_rate(D, tau) - observed) < 0.005
    assert chance_keep_rate(3, 1.0) == pytest.approx(0.25)
    assert chance_keep_rate(D, tau, rho=0.5) is None


def test_chance_rate_of_random_gradients_is_what_the_diagnostic_sees():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    truth = cue_truth_bins("patch")
    sums = truth_mask_sums(grads, 1.0, 0.0, "hard", truth)
    kept = sums[0, :2] / sums[1, :2]
    assert torch.allclose(kept, torch.full((2,), 0.25, dtype=torch.float64), atol=0.02)


def test_truth_mask_sums_against_a_direct_count():
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 4, 2, 16, 16, generator=g, dtype=torch.float64)
    truth = torch.zeros(16, 9, dtype=torch.bool)
    truth[1:4, 2:5] = True
    # plant agreement on the truth bins: every domain gets the same strong component there
    spec = torch.fft.rfft2(grads)
    spec[..., truth] = spec[:1, ..., truth].expand_as(spec[..., truth]) * 10
    grads = torch.fft.irfft2(spec, s=(16, 16))
    sums = truth_mask_sums(grads, 1.0, 0.0, "hard", truth)
    s = torch.fft.rfft2(grads)
    m = magnitude_agreement(s.abs())
    mask = agreement_mask(s.real, m, 1.0, 0.0, "hard") + agreement_mask(s.imag, m, 1.0, 0.0, "hard")
    assert sums[0, 0] == mask[..., truth].sum() and sums[0, 1] == mask[..., ~truth].sum()
    assert sums[1, 0] == 2 * 4 * 2 * int(truth.sum()) and sums[1, 1] == 2 * 4 * 2 * int((~truth).sum())
    assert sums[0, 0] / sums[1, 0] > 0.95  # the planted agreement is found ...
    assert sums[0, 1] / sums[1, 1] < 0.35  # ... and the rest is at chance
    assert sums[0, 2] == 0 and sums[1, 2] == 0  # no per-image truth given
    with pytest.raises(ValueError, match="cue_bins must be"):
        truth_mask_sums(grads, 1.0, 0.0, "hard", torch.zeros(16, 16, dtype=torch.bool))
    # each image's own bins: image i's own group is truth bin i's row (a direct count per image)
    own = torch.zeros(4, 16, 9, dtype=torch.bool)
    for i in range(4):
        own[i, 1 + i % 3, 2:5] = True
    sums = truth_mask_sums(grads, 1.0, 0.0, "hard", truth, own)
    direct = sum(mask[i][..., own[i]].sum() for i in range(4))
    assert sums[0, 2] == direct and sums[1, 2] == 2 * 2 * int(own.sum())


def test_class_cue_bins_are_each_class_s_own_cues(idx_dir, tmp_path):
    data = cues(idx_dir, tmp_path, cue="grating", cue_strength=0.5)
    sources = ["cartoon", "sketch", "painting"]
    own = data.class_cue_bins(sources)
    assert own.shape == (N_CUES, 32, 17)
    for c in range(N_CUES):
        expected = torch.zeros(32, 17, dtype=torch.bool)
        for d in sources:
            ky, kx = GRATINGS[(c + data.cue_shift[d]) % N_CUES]
            expected[ky % 32, kx] = True
            if kx == 0:
                expected[-ky % 32, 0] = True
        assert torch.equal(own[c], expected)
        assert not (own[c] & ~data.cue_bins).any()  # a part of the truth
    assert own.sum(0).max() == 3 and torch.equal(own.any(0), data.cue_bins)  # every cue bin is someone's own
    assert not data.class_cue_bins(["photo"]).any()  # the cue-free domain plants no class cue


def test_distill_records_the_mask_against_the_truth(idx_dir, tmp_path):
    from sgs_cuda.dm.loop import DistillConfig, distill

    data = cues(idx_dir, tmp_path, cue="grating", cue_strength=0.5)
    cfg = DistillConfig(method="dm_sgs", ipc=1, iterations=4, batch_real=6, width=8, log_every=2, seed=0)
    result = distill(data, ["cartoon", "sketch", "painting"], cfg, progress=False, log=lambda m: None)
    truth = result.history["truth"]
    assert truth["iteration"] == [1, 3] and truth["chance"] == pytest.approx(0.25)
    assert truth["cue_bins"] == 12
    assert all(0 <= v <= 1 for v in truth["cue"] + truth["other"] + truth["own"])
    dm = distill(data, ["cartoon", "sketch", "painting"], DistillConfig(**{**cfg.to_dict(), "method": "dm"}),
                 progress=False, log=lambda m: None)
    assert "truth" not in dm.history
    assert not math.isnan(truth["cue"][0])


def test_a_target_that_carries_a_class_cue_is_refused(idx_dir, tmp_path):
    from sgs_cuda.config import resolve_config
    from sgs_cuda.experiment import prepare_data

    data = cues(idx_dir, tmp_path, cue_strength=0.5)
    with pytest.raises(ValueError, match=r"target 'sketch' carries a class-correlated cue .* "
                                         r"--data-option cue_free=sketch"):
        prepare_data(resolve_config({"target": "sketch", "dataset": "fmnist-cues"}), data=data)
    prepared = prepare_data(resolve_config({"target": "photo", "dataset": "fmnist-cues"}), data=data)
    assert prepared.targets == ["photo"] and prepared.sources == ["cartoon", "sketch", "painting"]
