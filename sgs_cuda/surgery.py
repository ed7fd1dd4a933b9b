"""What a Distribution Matching loop needs: a validated config, domain-wise gradients from one
batched backward, and the surgery applied in place of ``loss.backward()``."""
from __future__ import annotations

import warnings

import torch

from .ops import SGSParts, spatial_gradient_surgery, spectral_gradient_surgery
from .options import ASSIGNMENTS, SPACES, SGSConfig  # noqa: F401  (SGSConfig: its historical home)
from .reference import formulation_mask, real_spectrum


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

    It is the home of the options that live across steps or need more than the gradients:
    ``assignment="fixed"`` (image n -> domain n % D), ``ema`` (the agreement test on a moving
    average of each domain's gradient per image, kept here: :meth:`state_dict` checkpoints it),
    ``pool="class"`` (the test on each class's mean gradient; pass ``images_per_class``, the set
    being class-ordered as DM's is) and ``decay`` (removal: it passes the synthetic images).

    ``last`` holds the :class:`SGSParts` of the latest step (diagnostics as tensors, so reading
    them is the only host synchronisation). With the spec's formulation, the spectral mask and
    ``normalize`` "none" or "dm_norm" a step computes only the update and the diagnostics (on a
    GPU the fastest CUDA path), and ``last`` is a :class:`StepParts` whose parts are computed if
    they are read. ``last_agree_on`` is the tensor the latest test read (None: the gradients).
    """

    def __init__(self, config: SGSConfig | None = None, check_finite: bool = True, grad_mode: str = "auto",
                 images_per_class: int | None = None):
        self.config = config or SGSConfig()
        self.check_finite = check_finite
        self.grad_mode = grad_mode
        self.images_per_class = images_per_class
        if (self.config.pool == "class" or self.config.spread) and not images_per_class:
            raise ValueError("pool='class' and spread need images_per_class (the set is class-ordered: IPC images per "
                             "class)")
        self.ema: torch.Tensor | None = None  # [D, N, C, H, W]: the moving average (ema > 0), all rows
        self.ema_started: torch.Tensor | None = None  # [N] bool: rows whose average has a gradient in it
        self.last: SGSParts | StepParts | None = None
        self.last_agree_on: torch.Tensor | None = None
        # [N, C, H, W//2+1]: each image's amplitude floor (amp_decay), set by the loop from the real data
        self.amplitude_floor: torch.Tensor | None = None

    def assignment(self, num_domains: int, num_images: int, device) -> torch.Tensor | None:
        if self.config.assignment == "fixed":
            return torch.arange(num_images, device=device) % num_domains
        return None  # the op draws a fresh one from torch's default generator

    # --- state across steps (checkpointed with the run) ---------------------------------------

    def state_dict(self) -> dict:
        """The state across steps, every tensor rows (images) first, so that a loop that shards
        its images over processes can gather and split it like the images."""
        return {"ema": None if self.ema is None else self.ema.detach().transpose(0, 1).cpu().clone(),
                "ema_started": None if self.ema_started is None else self.ema_started.cpu().clone()}

    def load_state_dict(self, state: dict, device=None) -> None:
        def to(t):
            return None if t is None else t.to(device if device is not None else t.device)
        ema = to(state.get("ema"))
        self.ema = None if ema is None else ema.transpose(0, 1).contiguous()
        self.ema_started = to(state.get("ema_started"))

    def agreement_tensor(self, grads: torch.Tensor, rows: slice | None = None, num_images: int | None = None,
                         source: torch.Tensor | None = None):
        """What the test reads for these gradients (``None``: the gradients themselves): ``source``
        (``agree_on="contrast"``: the class-contrast gradients; default ``grads``), averaged over
        time and pooled over classes as configured; updates the moving average of ``rows`` (of a
        set of ``num_images``; default: all of them)."""
        cfg = self.config
        if not cfg.needs_agreement_tensor:
            return None
        if cfg.agree_on == "contrast" and source is None:
            raise ValueError("agree_on='contrast' needs the class-contrast gradients (the DM loop computes them; "
                             "pass agree_source=)")
        agree = (grads if source is None else source).detach()
        if cfg.ema > 0:
            D, N = grads.shape[:2]
            total = num_images if num_images is not None else N
            rows = rows if rows is not None else slice(0, N)
            if self.ema is None or self.ema.shape != (D, total, *grads.shape[2:]):
                self.ema = torch.zeros((D, total, *grads.shape[2:]), dtype=torch.float32, device=grads.device)
                self.ema_started = torch.zeros(total, dtype=torch.bool, device=grads.device)
            part = self.ema[:, rows]
            # a row's first step starts its average at its gradient (no bias toward zero)
            weight = torch.where(self.ema_started[rows], cfg.ema, 0.0).view(1, -1, 1, 1, 1)
            part.mul_(weight).add_((1 - weight) * agree.float())
            self.ema_started[rows] = True
            agree = part
        if cfg.pool == "class":
            D, N = agree.shape[:2]
            ipc = self.images_per_class
            if N % ipc:
                raise ValueError(f"pool='class': {N} images are not whole classes of {ipc}")
            agree = agree.reshape(D, N // ipc, ipc, *agree.shape[2:]).mean(2, keepdim=True).expand(
                D, N // ipc, ipc, *agree.shape[2:]).reshape(agree.shape)
        return agree.to(grads.dtype)

    # --- the step ------------------------------------------------------------------------------

    def __call__(self, grads: torch.Tensor, assign: torch.Tensor | None = None, *, images: torch.Tensor | None = None,
                 rows: slice | None = None, num_images: int | None = None, return_parts: bool = False,
                 agree_source: torch.Tensor | None = None):
        """The surgery of stacked domain gradients ``[D, N, C, H, W]`` -> update ``[N, C, H, W]``.

        ``assign``: default the config's (a fresh random draw, or fixed). ``images``: the
        synthetic images (needed by ``decay``). ``rows``/``num_images``: these are rows ``rows``
        of a set of ``num_images`` (a DM loop that computes its gradients class chunk by chunk),
        so that the moving average is kept per image of the whole set. ``agree_source``: what the
        test reads before averaging and pooling (``agree_on="contrast"``), ``[D, N, C, H, W]``."""
        update = self._surgery(grads, assign, images, rows, num_images, return_parts, agree_source)
        if self.config.amp_decay:
            update = update + self.amplitude_removal(images, rows).to(update.dtype)
        if self.config.spread:
            update = update + self.spread_term(grads, images).to(update.dtype)
        return update

    def spread_term(self, grads: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Diversity within the set: ``-spread (1 - M) (S_n - mean of its class's S)``, so that a
        step moves a class's images apart (from their class mean) on the components the domains
        disagree on (``M``: this step's mask, from what the test read), the gradient of
        ``-spread/2 sum_n |(1 - M)(S_n - S_class)|^2`` with the mask held fixed."""
        cfg = self.config
        if images is None or not self.images_per_class:
            raise ValueError("spread needs the synthetic images and images_per_class (the set is class-ordered)")
        N, ipc = images.shape[0], self.images_per_class
        if N % ipc:
            raise ValueError(f"spread: {N} images are not whole classes of {ipc}")
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        test = grads if self.last_agree_on is None or cfg.combine == "pcgrad" else self.last_agree_on
        args = cfg.kernel_args(grads.shape[0])
        mask_re, mask_im = formulation_mask(real_spectrum(test.detach().to(dtype)), args.tau, args.rho, args.mask,
                                            args.equalize, args.combine)
        own = torch.fft.rfft2(images.detach().to(dtype))
        classes = own.reshape(N // ipc, ipc, *own.shape[1:])
        dev = (classes - classes.mean(1, keepdim=True)).reshape(own.shape)
        step = torch.complex((1 - mask_re) * dev.real, (1 - mask_im) * dev.imag)
        return -cfg.spread * torch.fft.irfft2(step, s=images.shape[-2:])

    def amplitude_removal(self, images: torch.Tensor | None, rows: slice | None = None) -> torch.Tensor:
        """``amp_decay`` x the gradient of ``1/2 sum relu(|rfft2(x)| - floor)^2`` (up to the transform's
        scale): each image's amplitude above its floor, with the image's phase."""
        if images is None or self.amplitude_floor is None:
            raise ValueError("amp_decay needs the synthetic images and their amplitude floor "
                             "(set SpectralGradientSurgery.amplitude_floor; the DM loop computes it from the data)")
        floor = self.amplitude_floor if rows is None else self.amplitude_floor[rows]
        spec = torch.fft.rfft2(images.detach().to(floor.dtype))
        magnitude = spec.abs()
        excess = torch.relu(magnitude - floor)
        step = torch.where(magnitude > 0, excess / magnitude.clamp_min(torch.finfo(floor.dtype).tiny), 0) * spec
        return self.config.amp_decay * torch.fft.irfft2(step, s=images.shape[-2:])

    def _surgery(self, grads, assign, images, rows, num_images, return_parts, agree_source):
        cfg = self.config
        D, N = grads.shape[:2]
        if assign is None:
            assign = self.assignment(D, N, grads.device)
        agree_on = self.agreement_tensor(grads, rows, num_images, agree_source)
        self.last_agree_on = agree_on
        extra = dict(check_finite=self.check_finite, agree_on=agree_on, images=images if cfg.decay else None)
        if cfg.space == "spatial":
            self.last = spatial_gradient_surgery(grads, assign, cfg, return_parts=True,
                                                 check_finite=self.check_finite)
            return self.last.update
        if return_parts or cfg.normalize == "kept_fraction" or agree_on is not None \
                or not cfg.kernel_args(D).is_spec:  # these compute the parts anyway
            self.last = spectral_gradient_surgery(grads, assign, cfg, return_parts=True, **extra)
            return self.last.update
        if assign is None:  # the op's own draw (the same generator calls), kept to recompute the parts
            assign = torch.randint(0, D, (N,), device=grads.device)
        step = spectral_gradient_surgery(grads, assign, cfg, return_diagnostics=True, **extra)
        self.last = StepParts(step.update, step.diagnostics,
                              lambda: spectral_gradient_surgery(grads, assign, cfg, return_parts=True, **extra))
        return step.update

    def backward(self, domain_losses: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
        """Compute the domain gradients, apply the surgery and accumulate it into ``synthetic.grad``."""
        update = self(domain_gradients(domain_losses, synthetic, self.grad_mode), images=synthetic.detach())
        if synthetic.grad is None:
            synthetic.grad = update.detach().clone()
        else:
            synthetic.grad.add_(update)
        return update
