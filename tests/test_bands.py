"""Where do the domains agree? The surgery's diagnostics per radial frequency band."""
import math

import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda import SGSConfig
from sgs_cuda.dm import DistillConfig, distill
from sgs_cuda.dm.bands import BAND_EDGES, BAND_KEYS, band_amplitude, band_diagnostics, band_index, band_labels
from sgs_cuda.dm.checkpoint import CHECKPOINT_NAME
from sgs_cuda.dm.plots import save_band_curves
from sgs_cuda.ops import spectral_gradient_surgery


def test_band_index_by_hand():
    idx = band_index(32, 32)
    assert idx.shape == (32, 17)
    assert idx[0, 0] == 0  # DC
    assert idx[8, 0] == 2 and idx[24, 0] == 2  # fy = +-1/4: radius 0.5 -> [0.5, 0.75)
    assert idx[0, 16] == 3 and idx[16, 16] == 3  # Nyquist and the corner: the last band
    assert idx[0, 3] == 0 and idx[0, 4] == 1  # radius 0.1875 and 0.25 (edges belong to the upper band)
    assert idx[5, 5] == 1  # radius sqrt(50)/16 = 0.44
    assert set(band_index(7, 9).unique().tolist()) == {0, 1, 2, 3}
    assert band_labels() == ["0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.41"]


def _direct_bands(grads, assign, tau, rho):
    """Float64, bin by bin: hard mask, shared and diversity energies per band."""
    D, N, C, H, W = grads.shape
    spec = torch.fft.rfft2(grads)
    sums = {k: [0.0] * 4 for k in ("mask", "count", "shared", "div", "total")}
    for ky in range(H):
        for kx in range(W // 2 + 1):
            fy = ky / H if ky < (H + 1) // 2 else ky / H - 1
            r = math.hypot(fy, kx / W) / 0.5
            b = sum(r >= e for e in BAND_EDGES)
            for n in range(N):
                for c in range(C):
                    z = spec[:, n, c, ky, kx]
                    mags = z.abs()
                    mag_ok = (mags.min() / mags.max() if mags.max() > 0 else 0.0) >= rho
                    mean = z.mean()
                    keep = []
                    for part in (z.real, z.imag):
                        keep.append(float(abs(torch.sign(part).sum()) / D >= tau and mag_ok))
                    sh = complex(keep[0] * mean.real, keep[1] * mean.imag)
                    dev = z[assign[n]] - mean
                    dv = complex((1 - keep[0]) * dev.real, (1 - keep[1]) * dev.imag)
                    sums["mask"][b] += keep[0] + keep[1]
                    sums["count"][b] += 2
                    sums["shared"][b] += abs(sh) ** 2
                    sums["div"][b] += abs(dv) ** 2
                    sums["total"][b] += abs(complex(mean)) ** 2
    tot = sum(sums["total"])
    return {"mask_fraction": [m / c for m, c in zip(sums["mask"], sums["count"])],
            "shared_energy": [s / t for s, t in zip(sums["shared"], sums["total"])],
            "diversity_energy": [d / t for d, t in zip(sums["div"], sums["total"])],
            "energy": [t / tot for t in sums["total"]]}


def test_band_amplitude_against_a_direct_definition_and_a_cosine():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(5, 2, 12, 10, generator=g)
    amp = torch.fft.rfft2(images.double()).abs()  # [5, 2, 12, 6]
    idx = band_index(12, 10)
    got = band_amplitude(images)
    for b in range(len(BAND_EDGES) + 1):
        chosen = idx == b
        chosen[0, 0] = False  # DC left out
        assert got[b].item() == pytest.approx(amp[..., chosen].mean().item(), rel=1e-12)
    bins = torch.zeros(12, 6, dtype=torch.bool)
    bins[2, 3] = bins[0, 0] = True  # DC is dropped from a chosen set too
    assert band_amplitude(images, bins=bins).item() == pytest.approx(amp[..., 2, 3].mean().item(), rel=1e-12)
    # a constant image has no amplitude off DC; a cosine at (0, 4) cycles lands in its band only
    assert band_amplitude(torch.full((1, 1, 12, 10), 3.0)).abs().max() < 1e-12
    x = torch.cos(2 * math.pi * 4 * torch.arange(10, dtype=torch.float64) / 10).expand(1, 1, 12, 10)
    assert (band_amplitude(x) > 1e-9).nonzero().flatten().tolist() == [idx[0, 4].item()]
    with pytest.raises(ValueError, match=r"bins must be \[12, 6\]"):
        band_amplitude(images, bins=torch.zeros(12, 10, dtype=torch.bool))


def test_band_diagnostics_match_a_direct_definition_and_the_op_totals():
    g = torch.Generator().manual_seed(0)
    D, N, C, H, W = 3, 2, 2, 8, 10
    grads = torch.randn(D, N, C, H, W, generator=g, dtype=torch.float64) + torch.randn(1, N, C, H, W, generator=g,
                                                                                       dtype=torch.float64)
    assign = torch.randint(0, D, (N,), generator=g)
    tau, rho = 1.0, 0.25
    parts = spectral_gradient_surgery(grads, assign, tau=tau, rho=rho, return_parts=True)
    bands = band_diagnostics(grads, parts.diversity, tau, rho, "hard")
    direct = _direct_bands(grads, assign, tau, rho)
    for k in BAND_KEYS:
        torch.testing.assert_close(bands[k], torch.tensor(direct[k], dtype=torch.float64), rtol=1e-8, atol=1e-10)
    # recombined with the band weights, the bands give the op's totals
    counts = torch.bincount(band_index(H, W).flatten(), minlength=4).double()
    total_mask = float((bands["mask_fraction"] * counts).sum() / counts.sum())
    assert total_mask == pytest.approx(float(parts.diagnostics["mask_fraction"]), rel=1e-12)
    assert float((bands["shared_energy"] * bands["energy"]).sum()) == pytest.approx(
        float(parts.diagnostics["shared_energy"]), rel=1e-10)
    assert float(bands["energy"].sum()) == pytest.approx(1.0)


def test_soft_mask_bands_recombine():
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(4, 3, 1, 12, 12, generator=g)
    parts = spectral_gradient_surgery(grads, tau=0.5, rho=0.1, mask="soft", return_parts=True)
    bands = band_diagnostics(grads, parts.diversity, 0.5, 0.1, "soft")
    counts = torch.bincount(band_index(12, 12).flatten(), minlength=4).double()
    assert float((bands["mask_fraction"] * counts).sum() / counts.sum()) == pytest.approx(
        float(parts.diagnostics["mask_fraction"]), rel=1e-5)


def test_agreement_at_low_frequencies_shows_in_the_low_band():
    """Domains sharing a smooth component and differing by white noise: the mask keeps low
    frequencies and drops high ones, and the diversity energy lives at high frequencies."""
    g = torch.Generator().manual_seed(2)
    low = band_index(32, 32) == 0
    spectrum = torch.complex(torch.randn(4, 1, 32, 17, generator=g), torch.randn(4, 1, 32, 17, generator=g))
    smooth = torch.fft.irfft2(spectrum * low, s=(32, 32))  # a random field with only low frequencies
    grads = smooth / smooth.std() + 0.05 * torch.randn(3, 4, 1, 32, 32, generator=g)
    parts = spectral_gradient_surgery(grads, return_parts=True)
    bands = band_diagnostics(grads, parts.diversity, 1.0, 0.0, "hard")
    mf = bands["mask_fraction"].tolist()
    assert mf[0] > 0.9 and all(0.15 < m < 0.35 for m in mf[1:])  # chance: 2 / 2^3 for 3 domains
    assert bands["energy"][0] > 0.9
    assert bands["diversity_energy"][-1] > 10 * bands["diversity_energy"][0]


def _cfg(**kw):
    base = dict(method="dm_sgs", ipc=2, iterations=6, batch_real=6, width=8, depth=2, log_every=2)
    base.update(kw)
    return DistillConfig(**base)


def test_the_loop_records_bands_every_log_every_iterations(tmp_path):
    res = distill(TinyDomains(), ["d0", "d1", "d2"], _cfg(), progress=False)
    bands = res.history["bands"]
    assert bands["iteration"] == [1, 3, 5] and bands["edges"] == list(BAND_EDGES)
    for k in BAND_KEYS:
        assert len(bands[k]) == 3 and all(len(row) == 4 for row in bands[k])
    assert all(0 <= v <= 1 for row in bands["mask_fraction"] + bands["shared_energy"] for v in row)
    assert all(sum(row) == pytest.approx(1.0) for row in bands["energy"])
    assert "bands" not in distill(TinyDomains(), ["d0", "d1"], _cfg(method="dm"), progress=False).history
    spatial = distill(TinyDomains(), ["d0", "d1"], _cfg(sgs=SGSConfig(space="spatial")), progress=False)
    assert "bands" not in spatial.history
    png = save_band_curves({"dm_sgs": res.history, "dm": {"loss": [1.0]}}, tmp_path / "bands.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="band diagnostics"):
        save_band_curves({"dm": {"loss": [1.0]}}, tmp_path / "none.png")


def test_checkpoint_without_bands_resumes(tmp_path):
    """A checkpoint written before the band diagnostics existed resumes to the same images."""
    full = distill(TinyDomains(), ["d0", "d1"], _cfg(checkpoint_every=2), progress=False)
    distill(TinyDomains(), ["d0", "d1"], _cfg(iterations=2, checkpoint_every=2), run_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    del saved["history"]["bands"]
    torch.save(saved, tmp_path / CHECKPOINT_NAME)
    resumed = distill(TinyDomains(), ["d0", "d1"], _cfg(checkpoint_every=2), run_dir=tmp_path, resume=True,
                      progress=False)
    assert torch.equal(resumed.images, full.images)
    assert resumed.history["bands"]["iteration"] == [3, 5]
    assert resumed.history["bands"]["mask_fraction"] == full.history["bands"]["mask_fraction"][1:]
