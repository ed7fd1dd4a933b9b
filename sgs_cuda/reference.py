"""Pure-torch Spectral Gradient Surgery: the fallback and, in float64, the ground truth.

Vectorised over domains, images and channels (no Python loops); follows
``shared/docs/sgs-spec.md`` section 3 literally, so each line can be read against it.
Inputs are assumed validated and within the op's numeric range (``sgs_cuda.ops`` rescales planes
that are not); the computation runs in float32 for float16/bfloat16/float32 input and in float64
for float64 input.

Autograd: the mask is held fixed (computed from detached spectra, for the hard and the soft mask
alike), so the gradient is that of the linear map ``grads -> update`` given the mask and the
assignment, the same gradient the compiled op's registered backward gives. The diagnostics
(``stats``) carry no gradient.
"""
from __future__ import annotations

import math

import torch

MASK_MODES = ("hard", "soft")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def magnitude_agreement(mag: torch.Tensor) -> torch.Tensor:
    """``min_d |x_d| / max_d |x_d|`` over the domain axis 0, and 0 where every ``|x_d|`` is 0."""
    mag_max, mag_min = mag.amax(0), mag.amin(0)
    return torch.where(mag_max > 0, mag_min / torch.where(mag_max > 0, mag_max, 1), 0)


def agreement_mask(x: torch.Tensor, mag_agree: torch.Tensor, tau: float, rho: float, mask: str) -> torch.Tensor:
    """The mask of the real components ``x`` ``[D, ...]``: sign agreement ``|sum_d sgn(x_d)| / D``
    thresholded with the magnitude agreement (``hard``), or their product (``soft``)."""
    agree = torch.sign(x).sum(0).abs() / x.shape[0]
    if mask == "hard":
        return ((agree >= tau) & (mag_agree >= rho)).to(x.dtype)
    return agree * mag_agree


def clear_self_conjugate_imag(spec: torch.Tensor, W: int) -> torch.Tensor:
    """``spec`` (an rfft2 half-spectrum ``[..., H, W//2+1]`` of real planes of width W) with the
    imaginary parts of its self-conjugate bins (rows 0 and H/2, columns 0 and W/2) set to 0: they
    are exactly 0 for real input, and their rounding noise must not count as a sign (sgn(0) = 0),
    as the compiled kernels also ensure."""
    H, Wr = spec.shape[-2:]
    h, k = torch.arange(H, device=spec.device), torch.arange(Wr, device=spec.device)
    row = (h == 0) | ((h == H // 2) & (H % 2 == 0))
    col = (k == 0) | ((k == W // 2) & (W % 2 == 0))
    return torch.complex(spec.real, torch.where(row[:, None] & col[None, :], 0, spec.imag))


def real_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``rfft2`` of real planes ``x`` with the self-conjugate bins' rounding noise cleared
    (:func:`clear_self_conjugate_imag`): the spectrum every statistic of the op reads."""
    return clear_self_conjugate_imag(torch.fft.rfft2(x), x.shape[-1])


def formulation_mask(spec: torch.Tensor, tau: float, rho: float, mask: str, equalize: bool = False,
                     combine: str = "mask") -> tuple[torch.Tensor, torch.Tensor]:
    """The mask (real parts, imaginary parts) that a formulation takes from the test spectra
    ``spec`` ``[D, ...]``: :func:`spectral_mask`, or with ``combine="pcgrad"`` 1 where no conflict
    was projected out (:func:`pcgrad_spectrum`)."""
    if combine == "pcgrad":
        kept = 1 - pcgrad_spectrum(spec.detach())[1]
        return kept, kept
    return spectral_mask(spec, tau, rho, mask, equalize)


def spectral_mask(spec: torch.Tensor, tau: float, rho: float, mask: str,
                  equalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of the real and of the imaginary components (spec steps 1-3) of the domain spectra
    ``spec`` ``[D, ...]`` complex, without gradient (the op holds its mask fixed). ``equalize``:
    each domain's plane (the last two axes) is first divided by its energy's square root, so
    that the magnitude test compares shapes, not a louder domain with a quieter one (the signs
    are unchanged)."""
    spec = spec.detach()
    mag = spec.abs()
    if equalize:
        energy = mag.square().sum((-2, -1), keepdim=True).sqrt()
        mag = mag / torch.where(energy > 0, energy, 1)
    mag_agree = magnitude_agreement(mag)
    return agreement_mask(spec.real, mag_agree, tau, rho, mask), agreement_mask(spec.imag, mag_agree, tau, rho, mask)


def pcgrad_spectrum(spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin projection (PCGrad per frequency): each domain's complex component, read as a
    2-vector, has its conflict with every other domain's removed (in domain order: where
    ``<F_d, F_j> < 0``, ``F_d -= <F_d, F_j> / |F_j|^2 F_j``, with the others' original components),
    then the domains are averaged. Returns ``(projected mean [...], conflicted [...])``:
    ``conflicted`` is 1 where some domain was projected (the "disagreeing" bins), else 0."""
    D = spec.shape[0]
    out = []
    conflicted = torch.zeros(spec.shape[1:], dtype=spec.real.dtype, device=spec.device)
    for d in range(D):
        g = spec[d]
        for j in range(D):
            if j == d:
                continue
            other = spec[j].detach()
            dot = (g.real * other.real + g.imag * other.imag)
            norm2 = other.abs().square()
            clash = (dot < 0) & (norm2 > 0)
            coef = torch.where(clash, dot.detach() / torch.where(norm2 > 0, norm2, 1), 0)
            g = g - coef * other
            conflicted = torch.maximum(conflicted, clash.to(conflicted.dtype))
        out.append(g)
    return torch.stack(out).mean(0), conflicted


def sgs_reference(grads: torch.Tensor, assign: torch.Tensor, tau: float, rho: float, alpha: float,
                  beta: float, mask: str = "hard", return_parts: bool = False, *, agree_on: torch.Tensor | None = None,
                  equalize: bool = False, mean_weight: float = 1.0, images: torch.Tensor | None = None,
                  decay: float = 0.0, combine: str = "mask"):
    """Return ``update`` or, with ``return_parts``, ``(update, mean, shared, diversity, stats)``.

    ``grads`` ``[D, N, C, H, W]``, ``assign`` ``[N]`` int64 in ``[0, D)``. ``stats`` is a float64
    tensor ``[4]``: (sum of mask over real components, number of real components,
    ``sum |Sh|^2``, ``sum |Fbar|^2``) over the half-spectrum, from which the diagnostics follow.

    The formulations of :class:`~sgs_cuda.options.SGSConfig` beyond the spec (all off by default,
    which is the spec's section 3 exactly):

    - ``agree_on`` ``[D, N, C, H, W]``: the tensor whose spectra the agreement test reads (a moving
      average of the gradients over iterations, or their class means); the recombination still
      uses ``grads``. ``equalize``: see :func:`spectral_mask`.
    - ``mean_weight``: the weight of the DM gradient ``mean_d grads[d]`` in the update (1: the
      spec's augment; 0: replace it by the shared and diversity parts).
    - ``images`` ``[N, C, H, W]`` and ``decay``: removal, ``+ decay * irfft2((1 - M) * rfft2(images))``
      (a gradient step then shrinks each image's own spectrum where the domains disagree).
    - ``combine="pcgrad"``: the shared spectrum is the per-bin projection of
      :func:`pcgrad_spectrum` (no sign/magnitude mask; ``1 - M`` marks the bins where a conflict
      was projected out), the diversity part as with the mask.
    """
    D, N, C, H, W = grads.shape
    g = grads.to(compute_dtype(grads.dtype))
    if g.numel() == 0:  # some FFT backends reject empty batches
        empty = grads.new_zeros(grads.shape[1:])
        stats = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=grads.device)
        return (empty, empty.clone(), empty.clone(), empty.clone(), stats) if return_parts else empty
    spec = real_spectrum(g)  # [D, N, C, H, W//2+1] complex
    mean_spec = spec.mean(0)

    # 1.-3. sign agreement per real component, magnitude agreement per complex bin, the mask
    if combine == "pcgrad":
        projected, conflicted = pcgrad_spectrum(spec)
        mask_re = mask_im = 1 - conflicted
        shared = projected
    else:
        test = spec if agree_on is None else real_spectrum(agree_on.detach().to(g.dtype))
        mask_re, mask_im = spectral_mask(test, tau, rho, mask, equalize)
        shared = torch.complex(mask_re * mean_spec.real, mask_im * mean_spec.imag)

    # 4. masked recombination
    assigned = spec[assign, torch.arange(N, device=grads.device)]  # [N, C, H, Wr]
    dev = assigned - mean_spec
    diversity = torch.complex((1 - mask_re) * dev.real, (1 - mask_im) * dev.imag)
    total = mean_weight * mean_spec + alpha * shared + beta * diversity
    if decay:
        own = real_spectrum(images.detach().to(g.dtype))
        total = total + decay * torch.complex((1 - mask_re) * own.real, (1 - mask_im) * own.imag)

    # 5. output: irfft2 is linear, so one inverse transform suffices for the update
    size = (H, W)
    update = torch.fft.irfft2(total, s=size)
    out_dtype = grads.dtype
    if not return_parts:
        return update.to(out_dtype)
    mean = g.mean(0)
    shared_sp = torch.fft.irfft2(shared, s=size)
    diversity_sp = torch.fft.irfft2(diversity, s=size)
    stats = torch.stack([  # energies summed in float64: a float32 sum of many bins could overflow
        (mask_re.sum(dtype=torch.float64) + mask_im.sum(dtype=torch.float64)),
        torch.tensor(2.0 * mask_re.numel(), dtype=torch.float64, device=grads.device),
        shared.abs().square().sum(dtype=torch.float64),
        mean_spec.abs().square().sum(dtype=torch.float64),
    ]).detach()
    return (update.to(out_dtype), mean.to(out_dtype), shared_sp.to(out_dtype),
            diversity_sp.to(out_dtype), stats)


def spatial_reference(grads: torch.Tensor, assign: torch.Tensor, tau: float, rho: float, alpha: float,
                      beta: float, mask: str = "hard"):
    """The spatial-domain ablation of spec section 6: the same agreement mask and recombination,
    computed per pixel of the gradients instead of per frequency. Each pixel is one real
    component, so the sign agreement is ``|sum_d sgn(g_d)| / D`` and the magnitude agreement
    ``min_d |g_d| / max_d |g_d|`` of that pixel. Returns ``(update, mean, shared, diversity,
    stats)`` like :func:`sgs_reference` with ``return_parts=True`` (``stats`` over the pixels).
    """
    N = grads.shape[1]
    g = grads.to(compute_dtype(grads.dtype))
    g_fixed = g.detach()  # the mask is held fixed under autograd, as in the spectral op
    m = agreement_mask(g_fixed, magnitude_agreement(g_fixed.abs()), tau, rho, mask)
    mean = g.mean(0)
    shared = m * mean
    diversity = (1 - m) * (g[assign, torch.arange(N, device=g.device)] - mean)
    update = mean + alpha * shared + beta * diversity
    stats = torch.stack([m.sum(dtype=torch.float64),
                         torch.tensor(float(m.numel()), dtype=torch.float64, device=g.device),
                         shared.square().sum(dtype=torch.float64),
                         mean.square().sum(dtype=torch.float64)]).detach()
    out = grads.dtype
    return update.to(out), mean.to(out), shared.to(out), diversity.to(out), stats


def times_pow2(x: torch.Tensor, exponent: int | torch.Tensor) -> torch.Tensor:
    """``x * 2**exponent``, exact barring underflow (an int, or an integer tensor that broadcasts),
    in two factors so that each is representable for exponents up to twice the dtype's largest
    (a float32 plane between 2**-149 and 2**127 can be brought to 1 and back)."""
    if isinstance(exponent, int):
        half = exponent // 2
        return x * 2.0 ** half * 2.0 ** (exponent - half)
    half = torch.div(exponent, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(x.dtype)) * torch.exp2((exponent - half).to(x.dtype))


def sgs_vjp(grads: torch.Tensor, assign: torch.Tensor, tau: float, rho: float, alpha: float, beta: float,
            mask: str = "hard", g_update=None, g_mean=None, g_shared=None, g_diversity=None) -> torch.Tensor:
    """The gradient with respect to ``grads`` ``[D, N, C, H, W]`` of
    ``<g_update, update> + <g_mean, mean> + <g_shared, shared> + <g_diversity, diversity>`` with
    the mask held fixed (the backward of ``sgs::surgery`` and ``sgs::surgery_parts``).

    Given the mask ``M`` and the assignment, every output is a linear map of the domain spectra
    with real coefficients per component, symmetric under conjugation; its adjoint is the same
    map applied to the output gradients (``irfft2(c * rfft2(g))``). With
    ``S = M * rfft2(alpha * g_update + g_shared)`` and
    ``V = (1 - M) * rfft2(beta * g_update + g_diversity)``:
    ``grad[d] = (g_update + g_mean + irfft2(S - V)) / D + [d == assign] * irfft2(V)``.
    The mask is recomputed here from the saved ``grads``, each plane first scaled by an exact
    power of two (the mask is invariant to it) so that its transform cannot overflow.
    """
    D, N, C, H, W = grads.shape
    dtype = compute_dtype(grads.dtype)
    if grads.numel() == 0:
        return torch.zeros_like(grads)

    def total(*terms):
        terms = [t.to(dtype) * w for t, w in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else grads.new_zeros(grads.shape[1:], dtype=dtype)

    with torch.no_grad():
        g = grads.detach().to(dtype)
        exponent = torch.frexp(g.abs().amax(dim=(0, 3, 4), keepdim=True)).exponent
        spec = clear_self_conjugate_imag(torch.fft.rfft2(times_pow2(g, -exponent)), W)
        mask_re, mask_im = spectral_mask(spec, tau, rho, mask)
    size = (H, W)
    s = torch.fft.rfft2(total((g_update, alpha), (g_shared, 1.0)))
    v = torch.fft.rfft2(total((g_update, beta), (g_diversity, 1.0)))
    s = torch.complex(mask_re * s.real, mask_im * s.imag)
    v = torch.complex((1 - mask_re) * v.real, (1 - mask_im) * v.imag)
    common = (total((g_update, 1.0), (g_mean, 1.0)) + torch.fft.irfft2(s - v, s=size)) / D
    own = (torch.arange(D, device=grads.device).view(D, 1) == assign.view(1, N)).to(dtype).view(D, N, 1, 1, 1)
    return (common + own * torch.fft.irfft2(v, s=size)).to(grads.dtype)


# --- inputs away from the hard mask's decision boundaries (the tests' and the CUDA self-check's) ---
# The hard mask is discontinuous: a component whose sign or magnitude ratio lies within rounding
# of a threshold can flip between float32 and float64 and move the output far more than 1e-5.
# ``separated_grads`` builds the domain spectra directly so that every Re and Im part is bounded
# away from zero and every bin's magnitude ratio ``min_d |F_d| / max_d |F_d|`` is at least
# ``margin`` away from ``rho``; a float32 implementation must then match the float64 reference
# to float32 rounding, with the masks identical.

def _hermitian_columns(W: int) -> list[int]:
    """Half-spectrum columns whose values must be Hermitian along H (k = 0 and k = W/2)."""
    return [0] + ([W // 2] if W % 2 == 0 and W > 1 else [])


def separated_grads(D: int, N: int, C: int, H: int, W: int, *, rho: float = 0.25, margin: float = 0.1,
                    agree_fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """float64 gradients ``[D, N, C, H, W]`` whose spectra avoid the mask's decision boundaries."""
    if N == 0:
        return torch.zeros(D, N, C, H, W, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Wr = W // 2 + 1
    shape, bin_shape = (D, N, C, H, Wr), (1, N, C, H, Wr)

    def rand(s):
        return torch.rand(s, generator=g, dtype=torch.float64)

    # Phase: quadrant + an angle 15..75 degrees inside it, so |Re|, |Im| >= sin(15 deg) |F|.
    unanimous = rand(bin_shape) < agree_fraction
    shared_q = torch.randint(0, 4, bin_shape, generator=g).expand(shape)
    own_q = torch.randint(0, 4, shape, generator=g)
    quadrant = torch.where(unanimous, shared_q, own_q).double()
    angle = quadrant * (math.pi / 2) + math.pi / 12 + rand(shape) * (math.pi / 3)

    # Magnitude: either all domains within a factor 1/(rho + margin) of each other ("close"),
    # or one domain at least 1/(rho - margin) times larger than all others ("dominated").
    base = 0.5 + 1.5 * rand(bin_shape)
    factor = 1 + (1 / (rho + margin) - 1) * rand(shape)
    if D > 1 and rho - margin > 0:
        dominated = rand(bin_shape) < 0.5
        others = 1 + 0.5 * rand(shape)
        winner = torch.randint(0, D, bin_shape, generator=g)
        is_winner = torch.arange(D).view(D, 1, 1, 1, 1) == winner
        boosted = torch.where(is_winner, 1.5 / (rho - margin) * (1 + rand(shape)), others)
        factor = torch.where(dominated, boosted, factor)
    mag = base * factor
    spec = torch.polar(mag, angle)

    # Hermitian symmetry along H in the self-conjugate columns, so that the spectrum is exactly
    # the rfft2 of a real plane: F[H-h] = conj(F[h]); self-conjugate bins are real.
    for k in _hermitian_columns(W):
        for h in range(1, (H + 1) // 2):
            spec[..., H - h, k] = spec[..., h, k].conj()
        for h in [0] + ([H // 2] if H % 2 == 0 and H > 1 else []):
            value = spec[..., h, k]
            spec[..., h, k] = torch.complex(torch.sign(value.real) * value.abs(), torch.zeros_like(value.real))
    return torch.fft.irfft2(spec, s=(H, W))
