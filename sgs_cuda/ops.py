"""The public operator: validation, dispatch to the compiled ``sgs::surgery`` op or the torch
reference, and the fake (meta) kernels that let ``torch.compile`` trace through the op."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _build
from .reference import MASK_MODES, compute_dtype, sgs_reference, spatial_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SGSParts(NamedTuple):
    """What ``spectral_gradient_surgery(..., return_parts=True)`` returns.

    ``update == mean + alpha * shared + beta * diversity`` (to rounding). ``diagnostics`` holds
    ``mask_fraction`` (fraction of the half-spectrum's real and imaginary components kept by the
    hard mask, or the mean of the soft mask) and ``shared_energy`` (share of ``|mean_d F_d|^2``
    kept in the shared spectrum), as 0-d float64 tensors (no host synchronisation).
    """
    update: torch.Tensor
    mean: torch.Tensor
    shared: torch.Tensor
    diversity: torch.Tensor
    diagnostics: dict[str, torch.Tensor]


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _tracing_or_capturing(grads: torch.Tensor) -> bool:
    """Whether value checks (host synchronisations) must be skipped: torch.compile tracing, or a
    CUDA graph capture, which a synchronisation would invalidate."""
    return torch.compiler.is_compiling() or (grads.is_cuda and torch.cuda.is_current_stream_capturing())


def validate_inputs(grads, assign, tau, rho, alpha, beta, mask, check_finite):
    """Raise a clear ``TypeError``/``ValueError`` naming what is wrong; return cleaned scalars."""
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
    if grads.dim() != 5:
        raise ValueError(f"grads must have shape [D, N, C, H, W] (5 dims), got {grads.dim()} dims "
                         f"with shape {tuple(grads.shape)}")
    if grads.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grads must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {grads.dtype}")
    D, N, C, H, W = grads.shape
    if D == 0:
        raise ValueError("grads has D = 0 domains: at least one domain gradient is needed")
    if min(C, H, W) == 0:
        raise ValueError(f"grads must have C, H, W > 0, got shape {tuple(grads.shape)}")
    if assign is not None:
        if not isinstance(assign, torch.Tensor):
            raise TypeError(f"assign must be a torch.Tensor or None, got {type(assign).__name__}")
        if assign.dtype.is_floating_point or assign.dtype.is_complex or assign.dtype == torch.bool:
            raise TypeError(f"assign must be an integer tensor (int64), got {assign.dtype}")
        if assign.device != grads.device:
            raise ValueError(f"assign is on {assign.device} but grads is on {grads.device}: "
                             "both tensors must be on the same device")
        if assign.shape != (N,):
            raise ValueError(f"assign must have shape [N] = [{N}], got {tuple(assign.shape)}")
        if N > 0 and not _tracing_or_capturing(grads):
            lo, hi = int(assign.min()), int(assign.max())
            if lo < 0 or hi >= D:
                raise ValueError(f"assign values must lie in [0, D) = [0, {D}), got range [{lo}, {hi}]")
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    tau, rho = _check_unit("tau", tau), _check_unit("rho", rho)
    alpha, beta = float(alpha), float(beta)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {v}")
    # The check costs a host synchronisation; inside torch.compile or a CUDA graph capture a NaN
    # input simply propagates.
    if check_finite and grads.numel() and not _tracing_or_capturing(grads):
        if not bool(torch.isfinite(grads).all()):
            raise ValueError("grads contains NaN or Inf values (pass check_finite=False to skip this check)")
    return tau, rho, alpha, beta


def _prepare(grads, assign, tau, rho, alpha, beta, mask, check_finite):
    """Validate; return the int64 assignment (a fresh uniform draw from torch's default generator
    on ``grads.device`` when ``assign`` is None) and the cleaned scalars."""
    tau, rho, alpha, beta = validate_inputs(grads, assign, tau, rho, alpha, beta, mask, check_finite)
    D, N = grads.shape[:2]
    assign = torch.randint(0, D, (N,), device=grads.device) if assign is None else assign.long()
    return assign, tau, rho, alpha, beta


def spectral_gradient_surgery(grads: torch.Tensor, assign: torch.Tensor | None = None, *,
                              tau: float = 1.0, rho: float = 0.0, alpha: float = 1.0,
                              beta: float = 0.25, mask: str = "hard", return_parts: bool = False,
                              check_finite: bool = True):
    """Spectral Gradient Surgery of D domain-wise gradients (``shared/docs/sgs-spec.md`` sec. 3).

    Args:
        grads: ``[D, N, C, H, W]`` gradients of the DM loss of each source domain with respect
            to the N synthetic images (float16/bfloat16/float32 computed in float32; float64 in
            float64). Any strides.
        assign: ``[N]`` integer tensor, the source domain whose specific components each image
            takes this step. ``None`` draws a fresh uniform domain per image from torch's default
            generator on ``grads.device`` (reproducible under ``torch.manual_seed``).
        tau: sign-agreement threshold in [0, 1] (1 = unanimous signs).
        rho: magnitude-agreement threshold ``min_d |F_d| / max_d |F_d|`` in [0, 1]. The default
            0 keeps sign agreement only, the best setting of our sweep (``docs/RESULTS.md``);
            the spec's initial value was 0.25.
        alpha: weight of the shared (cross-domain agreeing) spectrum.
        beta: weight of the diversity spectrum (the assigned domain's own deviation).
        mask: ``"hard"`` (thresholds) or ``"soft"`` (``agreement * magnitude ratio``).
        return_parts: also return the mean, shared and diversity parts and the diagnostics.
        check_finite: raise on NaN/Inf in ``grads`` (costs one host synchronisation).

    Returns:
        ``update`` ``[N, C, H, W]`` in ``grads.dtype``, or an :class:`SGSParts`.
    """
    assign, tau, rho, alpha, beta = _prepare(grads, assign, tau, rho, alpha, beta, mask, check_finite)

    if _build.use_extension(grads.device):
        if return_parts:
            update, mean, shared, diversity, stats = torch.ops.sgs.surgery_parts(
                grads, assign, tau, rho, alpha, beta, mask)
        else:
            return torch.ops.sgs.surgery(grads, assign, tau, rho, alpha, beta, mask)
    elif return_parts:
        update, mean, shared, diversity, stats = sgs_reference(
            grads, assign, tau, rho, alpha, beta, mask, return_parts=True)
    else:
        return sgs_reference(grads, assign, tau, rho, alpha, beta, mask)

    return _parts(update, mean, shared, diversity, stats)


def _parts(update, mean, shared, diversity, stats) -> SGSParts:
    """Bundle the parts with the diagnostics derived from the ``stats`` sums (no host sync)."""
    diagnostics = {
        "mask_fraction": stats[0] / stats[1].clamp_min(1),
        "shared_energy": stats[2] / stats[3].clamp_min(torch.finfo(torch.float64).tiny),
    }
    return SGSParts(update, mean, shared, diversity, diagnostics)


def spatial_gradient_surgery(grads: torch.Tensor, assign: torch.Tensor | None = None, *,
                             tau: float = 1.0, rho: float = 0.0, alpha: float = 1.0,
                             beta: float = 0.25, mask: str = "hard", return_parts: bool = False,
                             check_finite: bool = True):
    """The spatial-domain ablation (spec section 6): the agreement mask of
    :func:`spectral_gradient_surgery` computed per pixel instead of per frequency, with the same
    arguments, validation and return values. Plain torch (elementwise, no transform), so it runs
    on any device; it exists to measure what the spectral domain adds.
    """
    assign, tau, rho, alpha, beta = _prepare(grads, assign, tau, rho, alpha, beta, mask, check_finite)
    parts = _parts(*spatial_reference(grads, assign, tau, rho, alpha, beta, mask))
    return parts if return_parts else parts.update


def _register_fake_kernels() -> None:
    """Shape-only kernels so ``torch.compile``/``opcheck`` can trace ``sgs::surgery``."""

    @torch.library.register_fake("sgs::surgery")
    def _(grads, assign, tau, rho, alpha, beta, mask):
        return grads.new_empty(grads.shape[1:])

    @torch.library.register_fake("sgs::surgery_parts")
    def _(grads, assign, tau, rho, alpha, beta, mask):
        out = grads.shape[1:]
        return (grads.new_empty(out), grads.new_empty(out), grads.new_empty(out),
                grads.new_empty(out), grads.new_empty(4, dtype=torch.float64))


_build.on_load(_register_fake_kernels)
