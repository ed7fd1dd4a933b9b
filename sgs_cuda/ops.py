"""The public operator: validation, the numeric range, dispatch to the compiled ``sgs::surgery`` op
or the torch reference, the optional matched-step normalisation, and what ``torch.library`` needs
besides the kernels: the fake (meta) kernels that let ``torch.compile`` trace through the op and
the backward formula (the mask held fixed).

Numeric range. The op is positively homogeneous per (image, channel) plane: scaling every domain's
plane ``n, c`` by the same ``s > 0`` leaves its mask unchanged and scales its outputs by ``s``. The
kernels compute in float32 (float64 for float64 input), where the forward transforms of a plane
whose values are near the dtype's limits overflow (and ``|F|^2`` underflows for tiny ones). So the
finite check also measures each plane's largest ``|value|``; only when a plane lies outside the
range that the kernels compute safely, or the result might not fit the output dtype, are the
planes scaled by exact powers of two, computed, scaled back and checked: every finite input gives
the right finite result, or a ``ValueError`` when the true result is not representable in the
output dtype. In range (the common case) the check is the one reduction and one host
synchronisation that the finite check always cost.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _build, selfcheck
from .options import NORMALIZE_MODES, KernelArgs, SGSConfig
from .reference import compute_dtype, sgs_reference, sgs_vjp, spatial_reference, times_pow2

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SGSParts(NamedTuple):
    """What ``spectral_gradient_surgery(..., return_parts=True)`` returns.

    ``update == mean + alpha * shared + beta * diversity`` (to rounding) when ``normalize="none"``.
    ``diagnostics`` holds ``mask_fraction`` (fraction of the half-spectrum's real and imaginary
    components kept by the hard mask, or the mean of the soft mask) and ``shared_energy`` (share of
    ``|mean_d F_d|^2`` kept in the shared spectrum), as 0-d float64 tensors (no host
    synchronisation). The parts are never normalised; with ``normalize`` the diagnostics say what
    was applied to the update:

    - ``"dm_norm"``: ``update_scale`` ``[N]`` (float64), and
      ``update == update_scale[n] * (mean + alpha * shared + beta * diversity)``;
    - ``"kept_fraction"``: ``shared_scale`` (0-d float64, ``1 / mask_fraction``), and
      ``update == mean + alpha * shared_scale * shared + beta * diversity``.
    """
    update: torch.Tensor
    mean: torch.Tensor
    shared: torch.Tensor
    diversity: torch.Tensor
    diagnostics: dict[str, torch.Tensor]


class SGSUpdate(NamedTuple):
    """What ``spectral_gradient_surgery(..., return_diagnostics=True)`` returns: the update and the
    diagnostics of :class:`SGSParts` without the parts, from one kernel that sums the diagnostics
    as it goes (``sgs::surgery_stats``: on a GPU the fastest CUDA path, the cuFFTDx kernel where
    it applies, which does not write parts)."""
    update: torch.Tensor
    diagnostics: dict[str, torch.Tensor]


def _tracing_or_capturing(grads: torch.Tensor) -> bool:
    """Whether value checks (host synchronisations) must be skipped: torch.compile tracing, or a
    CUDA graph capture, which a synchronisation would invalidate."""
    return torch.compiler.is_compiling() or (grads.is_cuda and torch.cuda.is_current_stream_capturing())


class PlaneRange(NamedTuple):
    """The finite check's one reduction: the largest ``|value|`` of each (image, channel) plane."""
    top: float  # largest |value| of grads; NaN or inf when grads is not finite
    low: float  # smallest non-zero plane maximum; inf when every plane is zero
    plane_max: torch.Tensor  # [N, C], in grads' dtype, on its device


def plane_range(grads: torch.Tensor) -> PlaneRange:
    # max(amax, -amin): two reads and no temporary (faster than abs().amax() or a norm); NaN propagates
    plane_max = torch.maximum(grads.amax(dim=(0, 3, 4)), -grads.amin(dim=(0, 3, 4)))
    top, low = torch.stack([plane_max.amax(), torch.where(plane_max > 0, plane_max, math.inf).amin()]).tolist()
    return PlaneRange(top, low, plane_max)


def resolve_config(config: SGSConfig | None, options: dict) -> SGSConfig:
    """``config`` (default: :class:`SGSConfig`'s defaults) with the keyword ``options`` applied;
    every value is validated there, and an unknown option is one ``TypeError`` naming them all."""
    if config is not None and not isinstance(config, SGSConfig):
        raise TypeError(f"config must be an SGSConfig or None, got {type(config).__name__}")
    config = config or SGSConfig()
    if not options:
        return config
    unknown = sorted(set(options) - set(SGSConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown surgery option(s) {unknown}; the options are SGSConfig's fields: "
                        f"{sorted(SGSConfig.__dataclass_fields__)}")
    return config.replace(**options)


def validate_inputs(grads, assign, check_finite):
    """Raise a clear ``TypeError``/``ValueError`` naming what is wrong with the tensors; return,
    when ``check_finite``, the :class:`PlaneRange` of ``grads`` (else None)."""
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
            lo, hi = torch.stack([assign.min(), assign.max()]).tolist()  # one host synchronisation
            if lo < 0 or hi >= D:
                raise ValueError(f"assign values must lie in [0, D) = [0, {D}), got range [{lo}, {hi}]")
    # The check costs a host synchronisation; inside torch.compile or a CUDA graph capture a NaN
    # input simply propagates, and no plane is rescaled.
    planes = None
    if check_finite and grads.numel() and not _tracing_or_capturing(grads):
        planes = plane_range(grads)
        if not math.isfinite(planes.top):
            raise ValueError("grads contains NaN or Inf values (pass check_finite=False to skip this check)")
    return planes


def _check_companion(name: str, tensor, grads: torch.Tensor, shape: tuple, check_finite: bool) -> None:
    """``agree_on`` / ``images``: a tensor of ``shape`` on ``grads``' device, finite when checked."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (like grads{'' if name == 'agree_on' else '[0]'}), "
                         f"got {list(tensor.shape)}")
    if tensor.device != grads.device or not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor on {grads.device}, got {tensor.dtype} on "
                         f"{tensor.device}")
    if check_finite and tensor.numel() and not _tracing_or_capturing(grads) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _prepare(grads, assign, config: SGSConfig, check_finite) -> tuple[torch.Tensor, KernelArgs, PlaneRange | None]:
    """Validate; return the int64 assignment (a fresh uniform draw from torch's default generator
    on ``grads.device`` when ``assign`` is None), the kernels' arguments and the plane range."""
    planes = validate_inputs(grads, assign, check_finite)
    D, N = grads.shape[:2]
    args = config.kernel_args(D)
    assign = torch.randint(0, D, (N,), device=grads.device) if assign is None else assign.long()
    return assign, args, planes


# --- the kernels: (grads, assign, outputs, params) -> update (UPDATE) | (update, stats) (STATS) |
# (update, mean, shared, diversity, stats) (PARTS); stats: the four float64 sums of sgs_reference ---

UPDATE, STATS, PARTS = "update", "stats", "parts"


def _spectral_kernel(grads, assign, outputs, params):
    # On a CUDA tensor the first call of a shape class checks the fused paths (sgs_cuda.selfcheck);
    # "torch" when every CUDA path failed there.
    if _build.use_extension(grads.device) and not (grads.is_cuda and selfcheck.route(grads, outputs, params) == "torch"):
        op = {UPDATE: torch.ops.sgs.surgery, STATS: torch.ops.sgs.surgery_stats,
              PARTS: torch.ops.sgs.surgery_parts}[outputs]
        return op(grads, assign, *params)
    out = sgs_reference(grads, assign, *params, return_parts=outputs != UPDATE)
    return (out[0], out[4]) if outputs == STATS else out


def _spatial_kernel(grads, assign, outputs, params):
    out = spatial_reference(grads, assign, *params)
    return {UPDATE: out[0], STATS: (out[0], out[4]), PARTS: out}[outputs]


class _Kernel(NamedTuple):
    run: object  # one of the functions above
    gain: int  # bound of |F| / max|g| (H*W for the 2-D transform, 1 per pixel)
    components: int  # real components over which the mask fraction is taken


def spectral_gradient_surgery(grads: torch.Tensor, assign: torch.Tensor | None = None,
                              config: SGSConfig | None = None, *, agree_on: torch.Tensor | None = None,
                              images: torch.Tensor | None = None, return_parts: bool = False,
                              check_finite: bool = True, return_diagnostics: bool = False, **options):
    """Spectral Gradient Surgery of D domain-wise gradients (``shared/docs/sgs-spec.md`` sec. 3).

    Args:
        grads: ``[D, N, C, H, W]`` gradients of the DM loss of each source domain with respect
            to the N synthetic images (float16/bfloat16/float32 computed in float32; float64 in
            float64). Any strides, any finite values (see the module docstring).
        assign: ``[N]`` integer tensor, the source domain whose specific components each image
            takes this step. ``None`` draws a fresh uniform domain per image from torch's default
            generator on ``grads.device`` (reproducible under ``torch.manual_seed``).
        config: the options (:class:`~sgs_cuda.options.SGSConfig`; default its defaults), and
        **options: any of its fields as keywords, applied on top (``tau=0.5, beta=0``). The op
            reads ``tau``, ``rho``, ``alpha``, ``beta``, ``mask``, ``normalize``, ``sign_test``,
            ``equalize``, ``combine``, ``mean_weight`` and ``decay``; ``ema`` and ``pool`` are kept
            by :class:`~sgs_cuda.surgery.SpectralGradientSurgery`, which passes ``agree_on``.
            ``normalize`` (matched-step variants, so that a comparison with DM isolates the
            direction the surgery chooses from the size of its step): ``"dm_norm"`` rescales each
            image's update to the norm of its plain DM gradient ``mean_d grads[d]`` (over C, H,
            W); ``"kept_fraction"`` divides the shared part by the fraction of components the mask
            kept, taken per call over all images, as the AND-mask does (Parascandolo et al., 2021).
        agree_on: ``[D, N, C, H, W]``, the tensor whose spectra the agreement test reads (a moving
            average of the gradients, their class means); default ``grads``.
        images: ``[N, C, H, W]`` the synthetic images, needed by ``decay`` (removal).
        return_parts: also return the mean, shared and diversity parts and the diagnostics.
        check_finite: raise on NaN/Inf in ``grads`` and bring planes outside the kernels' safe
            range into it (one reduction and one host synchronisation). ``False`` skips both:
            NaN/Inf propagate, and a plane whose values lie outside about ``[1e-12, 1e15]``
            (float32 compute, 32x32; the bounds depend on the size) may come back wrong (NaN, or
            a mask that lost small components). Inside ``torch.compile`` and CUDA graph capture
            the check is skipped the same way.
        return_diagnostics: return the update with the diagnostics of :class:`SGSParts` but no
            parts (an :class:`SGSUpdate`), as fast as the update alone: what a DM loop logs
            every step. Ignored when ``return_parts``.

    Which kernel: the spec's formulation (``decay`` 0, ``equalize`` off, ``combine`` "mask", no
    ``agree_on``; any ``mean_weight``, applied to the kernels' mean part after them) runs the fused
    kernels; the general formulations run
    ``sgs::surgery_general`` on the CPU (the C++ kernel) and the float64-capable torch reference
    elsewhere (on a GPU: the reference on the GPU; ``combine="pcgrad"``: the reference).

    Returns:
        ``update`` ``[N, C, H, W]`` in ``grads.dtype``, an :class:`SGSParts` (``return_parts``) or
        an :class:`SGSUpdate` (``return_diagnostics``).

    Raises:
        TypeError: an unknown option or a tensor of the wrong type.
        ValueError: bad values, a non-finite input, or a true result that overflows the output
            dtype (e.g. a float16 update larger than 65504).

    Autograd: differentiable in ``grads`` with the mask held fixed (it is piecewise constant for
    the hard mask; the soft mask's magnitude ratio is held fixed too), the same gradient on every
    backend. The diagnostics, ``agree_on`` and ``images`` carry no gradient.
    """
    config = resolve_config(config, options)
    assign, args, planes = _prepare(grads, assign, config, check_finite)
    D, N, C, H, W = grads.shape
    if agree_on is not None:
        _check_companion("agree_on", agree_on, grads, grads.shape, check_finite)
    if args.decay:
        if images is None:
            raise ValueError(f"decay={args.decay:g} (removal) needs the synthetic images: pass images=[N, C, H, W]")
        _check_companion("images", images, grads, grads.shape[1:], check_finite)
    if not args.fused or agree_on is not None:
        return _general(grads, assign, args, config.normalize, agree_on, images if args.decay else None, planes,
                        return_parts, return_diagnostics)
    kernel = _Kernel(_spectral_kernel, H * W, 2 * N * C * H * (W // 2 + 1))
    return _surgery(kernel, args.spec, grads, assign, config.normalize, return_parts, planes, return_diagnostics,
                    args.mean_weight)


def spatial_gradient_surgery(grads: torch.Tensor, assign: torch.Tensor | None = None,
                             config: SGSConfig | None = None, *, return_parts: bool = False,
                             check_finite: bool = True, return_diagnostics: bool = False, **options):
    """The spatial-domain ablation (spec section 6): the agreement mask of
    :func:`spectral_gradient_surgery` computed per pixel instead of per frequency, with the same
    arguments (the spec's formulation only), validation, numeric range, normalisation, autograd
    and return values (the ``kept_fraction`` is then the fraction of pixels kept). Plain torch
    (elementwise, no transform), so it runs on any device; it exists to measure what the spectral
    domain adds.
    """
    config = resolve_config(config, options)
    assign, args, planes = _prepare(grads, assign, config, check_finite)
    if not args.is_spec:
        raise ValueError(f"the spatial ablation takes the spec's formulation only, got {config.differences()}")
    kernel = _Kernel(_spatial_kernel, 1, grads[0].numel())
    return _surgery(kernel, args.spec, grads, assign, config.normalize, return_parts, planes, return_diagnostics)


# --- the general formulations ----------------------------------------------------------------------

GENERAL_SAFE_RANGE = (2.0 ** -40, 2.0 ** 50)  # plane maxima the general path computes in float32 as is


def _general(grads, assign, args: KernelArgs, normalize, agree_on, images, planes, return_parts,
             return_diagnostics):
    """The general formulations: ``sgs::surgery_general`` (C++, CPU) or the torch reference, always
    with the parts; computed in float64 (then rounded once and checked) when a plane lies outside
    a range where float32 is comfortably safe."""
    wide = planes is not None and grads.dtype != torch.float64 and (
        planes.low < GENERAL_SAFE_RANGE[0] or planes.top > GENERAL_SAFE_RANGE[1])
    if not wide and _general_kernel_available(grads, args):
        out = torch.ops.sgs.surgery_general(grads, assign, agree_on, images, *args.spec[:4], args.mean_weight,
                                            args.decay, args.mask, args.equalize)
    else:
        out = _general_reference(grads.double() if wide else grads, assign, args, agree_on, images)
    return _finish(_normalize(_parts(*out), args.alpha, normalize), grads.dtype, wide, return_parts,
                   return_diagnostics)


def _general_reference(grads, assign, args: KernelArgs, agree_on, images):
    """:func:`~sgs_cuda.reference.sgs_reference` of the general formulations, with the parts."""
    return sgs_reference(grads, assign, *args.spec, return_parts=True, agree_on=agree_on, equalize=args.equalize,
                         mean_weight=args.mean_weight, images=images, decay=args.decay, combine=args.combine)


def _general_kernel_available(grads: torch.Tensor, args: KernelArgs) -> bool:
    return (args.combine == "mask" and grads.device.type == "cpu" and _build.use_extension(grads.device)
            and hasattr(torch.ops.sgs, "surgery_general"))


# --- numeric range ---------------------------------------------------------------------------------

def _safe_exponents(dtype: torch.dtype, num_domains: int, gain: int, alpha: float, beta: float) -> tuple[int, int]:
    """``(lo, hi)``: a plane whose largest ``|value|`` lies in ``[2**lo, 2**hi]`` is computed in the
    compute dtype without overflow and without its mask losing components to underflow."""
    fi = torch.finfo(compute_dtype(dtype))
    k = 1 + abs(alpha) + 2 * abs(beta)
    # A spectral component eps * max|F| still has a normal square (the kernels compare |F|^2).
    lo = math.ceil(math.log2(math.sqrt(fi.tiny) / fi.eps))
    # |F| <= gain * max|g|: its square, the sum over the domains and the inverse transform's
    # partial sums (at most k * gain**1.5 * max|g|) stay below the largest value, with margin.
    hi = math.floor(math.log2(min(math.sqrt(fi.max) / (4 * gain),
                                  fi.max / (8 * gain * max(num_domains, k * math.sqrt(gain))))))
    return lo, hi


def _output_bound(kernel: _Kernel, shape, alpha: float, beta: float, parts: bool, normalize: str,
                  mean_weight: float = 1.0) -> float:
    """A bound of ``max |output| / max |grads|`` over the outputs the kernel writes and the op
    returns: the mean is at most max|g|, the inverse transform of a masked spectrum at most
    ``sqrt(gain)`` times it (Cauchy-Schwarz and Parseval), the diversity part twice that. The
    kernels write the update with the mean's weight 1, the op returns it with ``mean_weight``."""
    s = math.sqrt(kernel.gain)
    bound = max(1, abs(mean_weight)) + (abs(alpha) + 2 * abs(beta)) * s
    if parts:
        bound = max(bound, 2 * s)
    if normalize == "dm_norm":  # the norm of an image's DM gradient
        bound = max(bound, math.sqrt(math.prod(shape[2:])))
    if normalize == "kept_fraction":  # |shared| / fraction <= components * |mean spectrum|
        bound = max(bound, 1 + (abs(alpha) * kernel.components + 2 * abs(beta)) * s)
    return bound


def _surgery(kernel: _Kernel, params, grads, assign, normalize, return_parts, planes, return_diagnostics=False,
             mean_weight: float = 1.0):
    D, N, C, H, W = grads.shape
    alpha, beta = params[2], params[3]
    dtype = compute_dtype(grads.dtype)
    # mean_weight != 1 is applied to the kernels' mean part: it needs the parts
    parts = return_parts or normalize != "none" or mean_weight != 1.0
    lo, hi = _safe_exponents(grads.dtype, D, kernel.gain, alpha, beta)
    rescale = planes is not None and (
        planes.low < 2.0 ** lo or
        planes.top > min(2.0 ** hi, torch.finfo(grads.dtype).max /
                         (2 * _output_bound(kernel, grads.shape, alpha, beta, parts, normalize, mean_weight))))
    if normalize == "dm_norm" and not return_parts and not rescale:
        # the rescale needs only the DM gradient's norm: one reduction, not the kernel's three parts
        out = kernel.run(grads, assign, STATS if return_diagnostics else UPDATE, params)
        raw = out[0] if return_diagnostics else out
        mean = grads.to(dtype).mean(0)
        update, scale = _rescale_to_norm(_weigh_mean(raw.to(dtype), mean, mean_weight), mean)
        update = update.to(raw.dtype)
        return SGSUpdate(update, {**_diagnostics(out[1]), "update_scale": scale}) if return_diagnostics else update
    outputs = PARTS if parts else (STATS if return_diagnostics else UPDATE)
    if rescale:
        out = _run_rescaled(kernel, params, grads, assign, outputs, planes.plane_max, lo, hi)
    else:
        out = kernel.run(grads, assign, outputs, params)
    if not parts:
        update = out if outputs == UPDATE else out[0]
        if rescale:
            update = update.to(grads.dtype)
            _check_representable((update,), grads.dtype)
        return update if outputs == UPDATE else SGSUpdate(update, _diagnostics(out[1]))
    result = _parts(*out)
    if mean_weight != 1.0:
        update = _weigh_mean(result.update.to(dtype), result.mean.to(dtype), mean_weight)
        result = result._replace(update=update.to(result.update.dtype))
    return _finish(_normalize(result, alpha, normalize), grads.dtype, rescale, return_parts,
                   return_diagnostics)


def _weigh_mean(update: torch.Tensor, mean: torch.Tensor, mean_weight: float) -> torch.Tensor:
    """The kernels' ``update`` (the mean part with weight 1) with the mean's weight ``mean_weight``."""
    return update if mean_weight == 1.0 else update + (mean_weight - 1.0) * mean


def _finish(result: SGSParts, dtype, widened: bool, return_parts: bool, return_diagnostics: bool):
    """What the op returns from its normalised parts; ``widened``: they were computed in a wider
    dtype than ``dtype``: round once, and say if the result does not fit."""
    if widened:
        result = result._replace(**{k: getattr(result, k).to(dtype) for k in ("update", "mean", "shared", "diversity")})
        _check_representable(result if return_parts else result[:1], dtype)
    if return_parts:
        return result
    return SGSUpdate(result.update, result.diagnostics) if return_diagnostics else result.update


def _run_rescaled(kernel: _Kernel, params, grads, assign, outputs, plane_max, lo, hi):
    """The kernel on planes scaled by exact powers of two into ``[2**lo, 2**hi]``, with its outputs
    scaled back, in the compute dtype. Planes are scaled by ``2**(-step * k)``, k an integer per
    plane, so that a call needs one kernel launch per distinct k (at most a handful)."""
    dtype = compute_dtype(grads.dtype)
    D, N, C, H, W = grads.shape
    center = (lo + hi) // 2
    half = max(min(center - lo - 1, hi - center), 0)
    step = 2 * half + 1  # a plane max in [2**(e-1), 2**e) lands in [2**(center-half-1), 2**(center+half))
    exponent = torch.frexp(plane_max.double()).exponent
    group = torch.where(plane_max > 0, torch.floor((exponent - center) / step + 0.5), 0).long().flatten()
    keys = torch.unique(group).tolist()

    if len(keys) == 1:  # every plane scaled alike: no regrouping
        batches = [(keys[0], grads, assign, None)]
    else:  # one batch of planes [D, P, 1, H, W] per scale, with the matching assignment
        flat, flat_assign = grads.reshape(D, N * C, 1, H, W), assign.repeat_interleave(C)
        batches = []
        for k in keys:
            index = (group == k).nonzero().squeeze(1)
            batches.append((k, flat.index_select(1, index), flat_assign.index_select(0, index), index))

    outs, stats = [], []
    for k, g, a, _ in batches:
        out = kernel.run(times_pow2(g.to(dtype), -step * k), a, outputs, params)
        out = (out,) if outputs == UPDATE else out
        outs.append([times_pow2(t, step * k) for t in (out[:4] if outputs == PARTS else out[:1])])
        if outputs != UPDATE:
            stats.append((2 * step * k, out[-1]))
    if len(batches) == 1:
        tensors = outs[0]
    else:
        inverse = torch.argsort(torch.cat([b[3] for b in batches]))
        tensors = [torch.cat([o[i] for o in outs])[inverse].reshape(N, C, H, W) for i in range(len(outs[0]))]
    return tensors[0] if outputs == UPDATE else (*tensors, _combine_stats(stats, grads.device))


def _combine_stats(stats: list[tuple[int, torch.Tensor]], device) -> torch.Tensor:
    """Sum per-batch ``stats`` whose energies (entries 2, 3) are ``2**shift`` times too small. The
    energies are returned relative to a common power of two (they can exceed float64), which
    leaves the diagnostics, their ratios, exact."""
    rows = [(shift, row) for shift, row in zip((s for s, _ in stats), torch.stack([t for _, t in stats]).tolist())]
    ref = max((math.frexp(r[3])[1] + shift for shift, r in rows if r[3] > 0), default=0)
    combined = [sum(r[0] for _, r in rows), sum(r[1] for _, r in rows),
                sum(math.ldexp(r[2], shift - ref) for shift, r in rows),
                sum(math.ldexp(r[3], shift - ref) for shift, r in rows)]
    return torch.tensor(combined, dtype=torch.float64, device=device)


def _check_representable(tensors: SGSParts | tuple, dtype: torch.dtype) -> None:
    names = ("update", "mean", "shared", "diversity")
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors[:4]]).tolist()
    for name, tensor, overflow in zip(names, tensors, bad):
        if overflow:
            n, c = (~torch.isfinite(tensor)).nonzero()[0, :2].tolist()
            raise ValueError(
                f"the {name} of image {n}, channel {c} is not representable in {dtype} (its true value "
                f"exceeds the largest finite {dtype} value, {torch.finfo(dtype).max:.5g}): scale the "
                "gradients down (the op is positively homogeneous) or pass a wider dtype")


# --- diagnostics and the matched-step normalisation ------------------------------------------------

def _diagnostics(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The diagnostics derived from the ``stats`` sums (no host sync)."""
    return {
        "mask_fraction": stats[0] / stats[1].clamp_min(1),
        "shared_energy": stats[2] / stats[3].clamp_min(torch.finfo(torch.float64).tiny),
    }


def _parts(update, mean, shared, diversity, stats) -> SGSParts:
    """Bundle the parts with the diagnostics derived from the ``stats`` sums (no host sync)."""
    return SGSParts(update, mean, shared, diversity, _diagnostics(stats))


def _normalize(parts: SGSParts, alpha: float, normalize: str) -> SGSParts:
    """Apply ``normalize`` to the update (computed in the compute dtype, returned in the update's
    dtype) and record the factor in the diagnostics. No host synchronisation."""
    if normalize == "none":
        return parts
    dtype = compute_dtype(parts.update.dtype)
    update, diagnostics = parts.update.to(dtype), dict(parts.diagnostics)
    if normalize == "dm_norm":
        update, diagnostics["update_scale"] = _rescale_to_norm(update, parts.mean.to(dtype))
    else:  # kept_fraction
        fraction = diagnostics["mask_fraction"]
        scale = torch.where(fraction > 0, 1 / fraction.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        update = update + (alpha * (scale - 1)).to(dtype) * parts.shared.to(dtype)
        diagnostics["shared_scale"] = scale
    return parts._replace(update=update.to(parts.update.dtype), diagnostics=diagnostics)


def _rescale_to_norm(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[n] * |target[n]| / |x[n]|`` for each image n (0 where ``x[n] = 0``), and the factors
    (float64 ``[N]``). The norms are taken of the images divided by their largest ``|value|``, so
    that squaring cannot overflow or underflow whatever the values."""
    dims = tuple(range(1, x.dim()))

    def unit(t):  # t / max|t| per image (detached scale: the result does not depend on it)
        peak = t.detach().abs().amax(dims, keepdim=True)
        peak = torch.where(peak > 0, peak, 1)
        return t / peak, peak

    x_unit, x_peak = unit(x)
    t_unit, t_peak = unit(target)
    x_norm = torch.linalg.vector_norm(x_unit, dim=dims, keepdim=True)
    ratio = torch.linalg.vector_norm(t_unit, dim=dims, keepdim=True) / torch.where(x_norm > 0, x_norm, 1)
    out = x_unit * ratio * t_peak  # in this order: only a result that does not fit overflows
    factor = torch.where(x_norm > 0, ratio.double() * t_peak.double() / x_peak.double(), 0)
    return out, factor.flatten().detach()


# --- torch.library registrations -------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    grads, assign, tau, rho, alpha, beta, mask = inputs
    ctx.save_for_backward(grads, assign)
    ctx.params = (tau, rho, alpha, beta, mask)
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(output[-1])  # the diagnostics' sums


def _backward(ctx, g_update, g_mean=None, g_shared=None, g_diversity=None, _g_stats=None):
    grads, assign = ctx.saved_tensors
    grad = sgs_vjp(grads, assign, *ctx.params, g_update, g_mean, g_shared, g_diversity) \
        if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None, None, None


def _backward_stats(ctx, g_update, _g_stats=None):  # sgs::surgery_stats: (update, stats)
    return _backward(ctx, g_update)


def _register_op_python_parts() -> None:
    """Shape-only kernels so ``torch.compile``/``opcheck`` can trace the ``sgs::surgery*`` ops, and
    their backward (the mask held fixed, recomputed in torch from the saved gradients)."""

    @torch.library.register_fake("sgs::surgery")
    def _(grads, assign, tau, rho, alpha, beta, mask):
        return grads.new_empty(grads.shape[1:])

    @torch.library.register_fake("sgs::surgery_parts")
    def _(grads, assign, tau, rho, alpha, beta, mask):
        out = grads.shape[1:]
        return (grads.new_empty(out), grads.new_empty(out), grads.new_empty(out),
                grads.new_empty(out), grads.new_empty(4, dtype=torch.float64))

    @torch.library.register_fake("sgs::surgery_stats")
    def _(grads, assign, tau, rho, alpha, beta, mask):
        return grads.new_empty(grads.shape[1:]), grads.new_empty(4, dtype=torch.float64)

    for op in ("sgs::surgery", "sgs::surgery_parts"):
        torch.library.register_autograd(op, _backward, setup_context=_setup_context)
    torch.library.register_autograd("sgs::surgery_stats", _backward_stats, setup_context=_setup_context)
    if hasattr(torch.ops.sgs, "surgery_general"):
        _register_general()


def _register_general() -> None:
    """``sgs::surgery_general``: shapes for tracing, and a backward through the reference (the mask
    held fixed: the reference computes it from the detached ``agree_on``/``grads``)."""

    @torch.library.register_fake("sgs::surgery_general")
    def _(grads, assign, agree_on, images, tau, rho, alpha, beta, mean_weight, decay, mask, equalize):
        out = grads.shape[1:]
        return (grads.new_empty(out), grads.new_empty(out), grads.new_empty(out),
                grads.new_empty(out), grads.new_empty(4, dtype=torch.float64))

    def setup(ctx, inputs, output):
        grads, assign, agree_on, images, *scalars = inputs
        ctx.save_for_backward(grads, assign, agree_on, images)
        ctx.scalars = scalars
        ctx.mark_non_differentiable(output[-1])

    def backward(ctx, *outs):
        grads, assign, agree_on, images = ctx.saved_tensors
        tau, rho, alpha, beta, mean_weight, decay, mask, equalize = ctx.scalars
        if not ctx.needs_input_grad[0]:
            return (None,) * 12
        args = KernelArgs(tau, rho, alpha, beta, mask, mean_weight, decay, equalize, "mask")
        with torch.enable_grad():
            g = grads.detach().requires_grad_()
            parts = _general_reference(g, assign, args, agree_on, images)
            pairs = [(p, o) for p, o in zip(parts[:4], outs[:4]) if o is not None]
            (grad,) = torch.autograd.grad([p for p, _ in pairs], g, [o for _, o in pairs], allow_unused=True)
        return (grad if grad is not None else torch.zeros_like(grads),) + (None,) * 11

    torch.library.register_autograd("sgs::surgery_general", backward, setup_context=setup)


_build.on_load(_register_op_python_parts)
