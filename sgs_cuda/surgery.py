"""What a Distribution Matching loop needs: a validated config, domain-wise gradients from one
batched backward, and the surgery applied in place of ``loss.backward()``."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from .ops import SGSParts, _check_unit, check_normalize, spatial_gradient_surgery, spectral_gradient_surgery
from .reference import MASK_MODES

ASSIGNMENTS = ("random", "fixed")
SPACES = ("spectral", "spatial")


@dataclass(frozen=True)
class SGSConfig:
    """Hyper-parameters of the surgery (defaults: ``docs/RESULTS.md`` says how they were set).

    ``assignment``: ``"random"`` draws a fresh source domain per image every step (the spec's
    default); ``"fixed"`` gives image ``n`` domain ``n % D`` for the whole run (round-robin).
    ``space``: ``"spectral"`` (the method) or ``"spatial"`` (the ablation that measures agreement
    per pixel, :func:`~sgs_cuda.ops.spatial_gradient_surgery`).
    ``normalize``: ``"none"`` (default), or a matched-step variant: ``"dm_norm"`` rescales each
    image's update to the norm of its plain DM gradient, ``"kept_fraction"`` divides the shared
    part by the fraction of components the mask kept (see
    :func:`~sgs_cuda.ops.spectral_gradient_surgery`).
    """
    tau: float = 1.0
    rho: float = 0.0  # sign agreement only: docs/RESULTS.md (the spec started at 0.25)
    alpha: float = 1.0
    beta: float = 0.25
    mask: str = "hard"
    assignment: str = "random"
    space: str = "spectral"
    normalize: str = "none"  # run folders saved before this option resume with it (relevant_settings)

    def __post_init__(self):
        _check_unit("tau", self.tau)
        _check_unit("rho", self.rho)
        for name in ("alpha", "beta"):
            value = float(getattr(self, name))
            if value != value or abs(value) == float("inf"):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {self.mask!r}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        check_normalize(self.normalize)

    def replace(self, **changes) -> "SGSConfig":
        return dataclasses.replace(self, **changes)

    def op_kwargs(self) -> dict:
        return {"tau": self.tau, "rho": self.rho, "alpha": self.alpha, "beta": self.beta, "mask": self.mask,
                "normalize": self.normalize}


_batched_grad_failed = False
GRAD_MODES = ("auto", "batched", "loop")


def domain_gradients(domain_losses: torch.Tensor, inputs: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """``[D, *inputs.shape]``: the gradient of each ``domain_losses[d]`` with respect to ``inputs``.

    The forward pass is shared by all D losses. ``mode="batched"`` runs one batched backward
    (``is_grads_batched=True``: vmap over the backward graph); ``"loop"`` runs D backward passes
    through the retained graph; both give the same values. ``"auto"`` picks the batched backward
    on GPUs and the loop on the CPU, where vmap's batching rules made it slower in our
    measurements (``benchmarks/README.md``). If an operation has no batching rule, the batched
    mode falls back to the loop with one warning.
    """
    global _batched_grad_failed
    if mode not in GRAD_MODES:
        raise ValueError(f"mode must be one of {GRAD_MODES}, got {mode!r}")
    if domain_losses.dim() != 1 or domain_losses.numel() == 0:
        raise ValueError(f"domain_losses must be a non-empty 1-D tensor [D], got shape {tuple(domain_losses.shape)}")
    D = domain_losses.numel()
    if mode == "auto":
        mode = "batched" if inputs.is_cuda else "loop"
    if mode == "batched" and not _batched_grad_failed:
        eye = torch.eye(D, dtype=domain_losses.dtype, device=domain_losses.device)
        try:
            (grads,) = torch.autograd.grad(domain_losses, inputs, grad_outputs=eye,
                                           is_grads_batched=True, retain_graph=True)
            return grads
        except RuntimeError as exc:
            _batched_grad_failed = True
            warnings.warn(f"sgs_cuda: batched backward failed ({exc}); using {D} backward passes",
                          RuntimeWarning, stacklevel=2)
    return torch.stack([torch.autograd.grad(domain_losses[d], inputs, retain_graph=True)[0]
                        for d in range(D)])


class StepParts:
    """The :class:`SGSParts` of a step that computed only the update and its diagnostics (the
    fast path of :class:`SpectralGradientSurgery`): ``update`` and ``diagnostics`` at once;
    ``mean``, ``shared`` and ``diversity`` on first access, by one more call of the op on the same
    gradients and assignment (so a loop that reads them only at its log iterations pays for them
    only there)."""

    def __init__(self, update: torch.Tensor, diagnostics: dict, compute_parts):
        self.update, self.diagnostics = update, diagnostics
        self._compute, self._parts = compute_parts, None

    def _full(self) -> SGSParts:
        if self._parts is None:
            self._parts, self._compute = self._compute(), None  # (drops the gradients it held)
        return self._parts

    mean = property(lambda self: self._full().mean)
    shared = property(lambda self: self._full().shared)
    diversity = property(lambda self: self._full().diversity)


class SpectralGradientSurgery:
    """Drop-in replacement for ``loss.backward()`` in a DM loop with D source domains.

    >>> sgs = SpectralGradientSurgery(SGSConfig())
    >>> losses = torch.stack([dm_loss(real[d], syn) for d in range(D)])  # [D]
    >>> optimizer.zero_grad(); sgs.backward(losses, syn); optimizer.step()

    ``last`` holds the :class:`SGSParts` of the latest step (diagnostics as tensors, so reading
    them is the only host synchronisation). With the spectral mask and ``normalize`` "none" or
    "dm_norm" a step computes only the update and the diagnostics (``return_diagnostics``: on a
    GPU the fastest CUDA path), and ``last`` is a :class:`StepParts` whose parts are computed if
    they are read.
    """

    def __init__(self, config: SGSConfig | None = None, check_finite: bool = True, grad_mode: str = "auto"):
        self.config = config or SGSConfig()
        self.check_finite = check_finite
        self.grad_mode = grad_mode
        self.last: SGSParts | StepParts | None = None

    def assignment(self, num_domains: int, num_images: int, device) -> torch.Tensor | None:
        if self.config.assignment == "fixed":
            return torch.arange(num_images, device=device) % num_domains
        return None  # the op draws a fresh one from torch's default generator

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """The surgery of stacked domain gradients ``[D, N, C, H, W]`` -> update ``[N, C, H, W]``."""
        D, N = grads.shape[:2]
        kwargs = dict(check_finite=self.check_finite, **self.config.op_kwargs())
        assign = self.assignment(D, N, grads.device)
        if self.config.space == "spatial" or self.config.normalize == "kept_fraction":  # these compute the parts anyway
            surgery = spatial_gradient_surgery if self.config.space == "spatial" else spectral_gradient_surgery
            self.last = surgery(grads, assign, return_parts=True, **kwargs)
            return self.last.update
        if assign is None:  # the op's own draw (the same generator calls), kept to recompute the parts
            assign = torch.randint(0, D, (N,), device=grads.device)
        step = spectral_gradient_surgery(grads, assign, return_diagnostics=True, **kwargs)
        self.last = StepParts(step.update, step.diagnostics,
                              lambda: spectral_gradient_surgery(grads, assign, return_parts=True, **kwargs))
        return step.update

    def backward(self, domain_losses: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
        """Compute the domain gradients, apply the surgery and accumulate it into ``synthetic.grad``."""
        update = self(domain_gradients(domain_losses, synthetic, self.grad_mode))
        if synthetic.grad is None:
            synthetic.grad = update.detach().clone()
        else:
            synthetic.grad.add_(update)
        return update
