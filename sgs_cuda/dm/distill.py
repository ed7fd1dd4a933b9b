"""The distillation loop: Distribution Matching (DM) and DM with Spectral Gradient Surgery.

Per iteration (``shared/docs/sgs-spec.md`` sections 1-2): a freshly initialised, frozen ConvNet
``psi``; for every class ``c`` one DSA draw shared by the class's real batches of all source
domains and its synthetic images; domain losses

    L_d = sum_c || mean psi(A(real_{c,d})) - mean psi(A(syn_c)) ||^2        d = 1..D

(``matching="m3d"``: a Gaussian-kernel MMD per class instead of the mean difference,
:mod:`sgs_cuda.dm.matching`). ``dm`` steps the pixels with the gradient of the pooled loss
(real batches of all domains pooled); ``dm_sgs`` hands the D losses to
:class:`~sgs_cuda.surgery.SpectralGradientSurgery` (one synthetic forward shared by all domains,
one batched backward) and steps with its update.

All randomness of the loop comes from generators it owns (data, network init, DSA) plus torch's
default generator (the surgery's random domain assignment), inside ``torch.random.fork_rng`` so
the caller's global RNG is untouched. Checkpoints hold every one of these states, so a resumed
run ends with the same images as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import _io
from .._config import DictConfig
from ..surgery import SGSConfig, SpectralGradientSurgery, domain_gradients
from .bands import BAND_EDGES, BAND_KEYS, band_diagnostics
from .dsa import DEFAULT_STRATEGY, DSAParams, parse_strategy
from .matching import MATCHINGS, matching_losses
from .networks import NORMS, build_convnet

METHODS = ("dm", "dm_sgs")
INITS = ("real", "noise")
CHECKPOINT_NAME = "checkpoint.pt"
# Fields that may differ between a checkpoint and the resuming config (they do not change the
# trajectory up to the checkpoint): a run can be extended or checkpointed at another interval.
RESUMABLE_CHANGES = frozenset({"iterations", "checkpoint_every", "log_every"})
CHECKPOINT_KEYS = frozenset({"images", "labels", "optimizer", "iteration", "history", "rng", "config",
                             "source_domains", "classes"})


@dataclass
class DistillConfig(DictConfig):
    """Hyper-parameters of one distillation run (defaults: the DM reference / the paper)."""
    _kind = "distillation"
    method: str = "dm_sgs"
    ipc: int = 10
    iterations: int = 20000
    batch_real: int = 256  # real images per class and iteration, split equally over the source domains
    lr_img: float = 1.0
    momentum: float = 0.5
    init: str = "real"
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    matching: str = "dm"  # "dm": feature means; "m3d": Gaussian-kernel MMD (sgs_cuda.dm.matching)
    sgs: SGSConfig = field(default_factory=SGSConfig)
    seed: int = 0
    checkpoint_every: int = 0  # 0: no checkpoints
    log_every: int = 10  # history is read back to the host (one synchronisation) every log_every iterations

    def __post_init__(self):
        if isinstance(self.sgs, dict):
            self.sgs = SGSConfig(**self.sgs)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {self.matching!r}")
        for name in ("ipc", "batch_real", "width", "depth", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_img <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr_img > 0 and 0 <= momentum < 1, got {self.lr_img}, {self.momentum}")
        parse_strategy(self.dsa_strategy)



@dataclass
class DistillResult:
    images: torch.Tensor  # [K * ipc, C, H, W] float32 on the CPU, normalised like the data
    labels: torch.Tensor  # [K * ipc] int64
    history: dict  # lists per recorded iteration: iteration, loss (+ domain_loss, mask_fraction, shared_energy,
    # and "bands": per-frequency-band diagnostics every log_every iterations, sgs_cuda.dm.bands)
    config: DistillConfig
    seconds: float = 0.0  # wall time of this call (a resumed call counts only its own part)


# --- helpers --------------------------------------------------------------------------------

def _domain_batches(data, domains, label, n, generator) -> torch.Tensor:
    """``[D, n, C, H, W]`` real images of class ``label``, one batch per domain."""
    try:
        from ..data.sampling import sample_domain_batches
    except ImportError:  # the data package's helper is optional: the protocol suffices
        return torch.stack([data.real_batch(d, label, n, generator=generator) for d in domains])
    return sample_domain_batches(data, domains, label, n, generator)


def initial_images(data, domains: Sequence[str], ipc: int, init: str, generator: torch.Generator):
    """Class-ordered initial synthetic set: ``ipc`` real images per class drawn round-robin over
    the source domains that hold the class (``init="real"``), or standard normal noise (``"noise"``)."""
    K = len(data.classes)
    labels = torch.arange(K).repeat_interleave(ipc)
    if init == "noise":
        return torch.randn((K * ipc, *data.image_shape), generator=generator), labels
    images = []
    for c, present in enumerate(class_domains(data, domains)):
        have = [domains[i] for i in present]
        per_domain = [ipc // len(have) + (i < ipc % len(have)) for i in range(len(have))]
        images += [data.real_batch(d, c, k, generator=generator) for d, k in zip(have, per_domain) if k]
    return torch.cat(images).float(), labels


def class_domains(data, domains: Sequence[str]) -> list[list[int]]:
    """For each class, the indices of the source domains that hold train images of it.

    Real domains hold every class; pseudo-domains (clusters) may not. A class no source domain
    holds cannot be distilled.
    """
    present = [[i for i, d in enumerate(domains) if data.count(d, c, "train") > 0] for c in range(len(data.classes))]
    missing = [data.classes[c] for c, p in enumerate(present) if not p]
    if missing:
        raise ValueError(f"no source domain of {list(domains)} has train images of class(es) {missing}")
    return present


def _rng_states(gens: dict, device: torch.device) -> dict:
    states = {name: g.get_state() for name, g in gens.items()}
    states["torch_cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict, gens: dict, device: torch.device) -> None:
    for name, g in gens.items():
        g.set_state(states[name])
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda":
        if "torch_cuda" not in states:
            raise ValueError("the checkpoint was written by a CPU run; resume it on the CPU")
        torch.cuda.set_rng_state(states["torch_cuda"], device)


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, ``fsync``, then rename (:func:`sgs_cuda._io.save_torch`):
    neither a kill nor a power cut leaves a torn or empty checkpoint."""
    _io.save_torch(obj, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`distill`; a damaged one is one line naming it."""
    hint = "delete it to start this set again from iteration 0, or run without --resume"
    saved = _io.load_torch(path, hint)
    missing = CHECKPOINT_KEYS - set(saved) if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise _io.RunFolderError(f"{path} is not a checkpoint of this package (no {sorted(missing)}); {hint}")
    return saved


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def relevant_settings(config: dict) -> dict:
    """The settings that shape a run's trajectory (a config dict without the resumable fields,
    and without the surgery settings for plain DM, which ignores them)."""
    added = {"matching": "dm"}  # options added since runs were first saved, at their defaults
    out = {k: v for k, v in {**added, **config}.items() if k not in RESUMABLE_CHANGES}
    if out.get("method") == "dm":
        out.pop("sgs", None)
    elif isinstance(out.get("sgs"), dict):  # fill options added since the run was saved
        out["sgs"] = dataclasses.asdict(SGSConfig(**out["sgs"]))
    return out


def _check_resumable(saved: dict, cfg: DistillConfig, domains, data) -> None:
    now, then = relevant_settings(cfg.to_dict()), relevant_settings(saved["config"])
    diff = sorted(k for k in set(now) | set(then) if then.get(k) != now.get(k))
    if diff:
        raise ValueError(f"cannot resume: the checkpoint was written with different settings for {diff} "
                         f"(checkpoint: {[then.get(k) for k in diff]}, now: {[now.get(k) for k in diff]})")
    if list(saved["source_domains"]) != list(domains) or list(saved["classes"]) != list(data.classes):
        raise ValueError(f"cannot resume: checkpoint source domains/classes {saved['source_domains']}/"
                         f"{saved['classes']} differ from {list(domains)}/{list(data.classes)}")


def _new_history(method: str) -> dict:
    keys = ["iteration", "loss"] + (["domain_loss", "mask_fraction", "shared_energy"] if method == "dm_sgs" else [])
    return {k: [] for k in keys}


# --- the loop -------------------------------------------------------------------------------

def distill(data, source_domains: Sequence[str], cfg: DistillConfig | None = None, device="cpu",
            run_dir=None, resume: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = None) -> DistillResult:
    """Distil ``cfg.ipc`` images per class from ``source_domains`` of ``data``.

    Args:
        data: a :class:`~sgs_cuda.data.base.MultiDomainDataset`.
        source_domains: the domains the real batches come from (leave the target out).
        cfg: :class:`DistillConfig`.
        device: where the networks and the synthetic images live.
        run_dir: folder for ``checkpoint.pt`` (written every ``cfg.checkpoint_every`` iterations).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        progress: show a tqdm bar with the loss (and the surgery's mask fraction).
        log: where one-line messages go (resuming from a checkpoint); default: stderr.
    """
    cfg = cfg or DistillConfig()
    device = torch.device(device)
    domains = list(source_domains)
    if not domains:
        raise ValueError("distill needs at least one source domain")
    unknown = [d for d in domains if d not in data.domains]
    if unknown:
        raise ValueError(f"unknown source domain(s) {unknown}; the dataset has {list(data.domains)}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir (where the checkpoint is)")
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    if ckpt_path is not None:
        _io.ensure_dir(ckpt_path.parent)

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _distill(data, domains, cfg, device, ckpt_path, resume, progress, log or _stderr)


def _distill(data, domains, cfg: DistillConfig, device, ckpt_path, resume, progress, log) -> DistillResult:
    t0 = time.perf_counter()
    K, D, ipc = len(data.classes), len(domains), cfg.ipc
    n_real = max(1, cfg.batch_real // D)  # per domain: equal sizes make mean_d g_d the pooled gradient
    strategy = cfg.dsa_strategy if cfg.dsa else "none"

    # Separate streams, so DM and DM+SGS with one seed see the same nets, batches and
    # augmentations even though only the surgery draws from torch's default generator.
    gens = {name: torch.Generator().manual_seed(cfg.seed * 1000 + i)
            for i, name in enumerate(("data", "net", "dsa"))}
    torch.default_generator.manual_seed(cfg.seed * 1000 + 3)  # the surgery's assignments
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(cfg.seed * 1000 + 3)

    net = build_convnet(data.image_shape, K, cfg.width, cfg.depth, cfg.norm, device=device)
    net.train()  # batch norm (if chosen) uses the batch statistics, as in the reference
    for p in net.parameters():
        p.requires_grad_(False)

    present = class_domains(data, domains)
    if all(len(p) == D for p in present):
        present = None  # every domain holds every class (real domains): the plain path
    else:
        gaps = [f"{data.classes[c]} (in {len(p)}/{D})" for c, p in enumerate(present) if len(p) < D]
        warnings.warn(f"some source domains lack classes {gaps}: their terms use the pooled class mean",
                      RuntimeWarning, stacklevel=3)
    start, history = 0, _new_history(cfg.method)
    saved = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        _check_resumable(saved, cfg, domains, data)
        if saved["iteration"] > cfg.iterations:
            raise ValueError(f"cannot resume: the checkpoint is at iteration {saved['iteration']}, "
                             f"beyond iterations={cfg.iterations}")
        images, labels = saved["images"], saved["labels"]
        start, history = saved["iteration"], saved["history"]
        log(f"resuming from iteration {start} of {cfg.iterations} ({ckpt_path})")
    else:
        images, labels = initial_images(data, domains, ipc, cfg.init, gens["data"])
    syn = images.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        _set_rng_states(saved["rng"], gens, device)
    surgery = SpectralGradientSurgery(cfg.sgs, check_finite=False) if cfg.method == "dm_sgs" else None

    pending: list[tuple[int, torch.Tensor]] = []  # (iteration, stacked scalars) not yet read back

    def flush(bar=None):
        if not pending:
            return
        its = [i for i, _ in pending]
        rows = torch.stack([v for _, v in pending]).double().cpu().tolist()  # the one host sync
        pending.clear()
        keys = [k for k in history if k not in ("iteration", "bands")]
        history["iteration"] += its
        for j, k in enumerate(keys):
            history[k] += [r[j] for r in rows]
        last = dict(zip(keys, rows[-1]))
        bad = next((i for i, r in zip(its, rows) if not math.isfinite(r[0])), None)
        if bad is not None:
            raise FloatingPointError(f"the DM loss became non-finite at iteration {bad}; "
                                     "lower lr_img or check the data normalisation")
        if bar is not None:
            post = {"loss": f"{last['loss']:.4g}"}
            if "mask_fraction" in last:
                post["mask"] = f"{last['mask_fraction']:.3f}"
            bar.set_postfix(post)  # redraws: once per log_every iterations

    def checkpoint(iteration: int):
        flush()
        save_atomic({"images": syn.detach().cpu(), "labels": labels, "optimizer": opt.state_dict(),
                     "iteration": iteration, "history": history, "rng": _rng_states(gens, device),
                     "config": cfg.to_dict(), "source_domains": domains, "classes": list(data.classes)},
                    ckpt_path)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc=cfg.method,
               dynamic_ncols=True, leave=False)
    try:
        for it in range(start, cfg.iterations):
            net.reinitialize(gens["net"])
            real, params = draw_class_batches(data, domains, K, n_real, strategy, gens, device, present)
            losses, pooled = matching_losses(net, real, syn, params, pool_all=cfg.norm == "batchnorm",
                                             present=present, num_domains=D, matching=cfg.matching)
            opt.zero_grad(set_to_none=True)
            if surgery is None:
                pooled.backward()
                record = pooled.detach().view(1)
            else:  # surgery.backward, keeping the domain gradients for the band diagnostics
                grads = domain_gradients(losses, syn, surgery.grad_mode)
                syn.grad = surgery(grads).detach()
                diag = surgery.last.diagnostics
                record = torch.stack([pooled.detach().double(), losses.detach().mean().double(),
                                      diag["mask_fraction"].double(), diag["shared_energy"].double()])
                if (it + 1) % cfg.log_every == 0 and cfg.sgs.space == "spectral":
                    _record_bands(history, it, grads, surgery)
            opt.step()
            pending.append((it, record))
            bar.update(1)
            done = it + 1
            if done % cfg.log_every == 0:
                flush(bar)
            if ckpt_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                    and done < cfg.iterations:
                checkpoint(done)
        flush(bar)
        if ckpt_path is not None and cfg.checkpoint_every:
            checkpoint(cfg.iterations)  # a later resume with the same config returns at once
    finally:
        bar.close()
    return DistillResult(syn.detach().cpu().clone(), labels.clone(), history, cfg, time.perf_counter() - t0)


def _record_bands(history: dict, iteration: int, grads: torch.Tensor, surgery: SpectralGradientSurgery) -> None:
    """Append this step's per-band diagnostics (:mod:`sgs_cuda.dm.bands`) to ``history["bands"]``."""
    c = surgery.config
    bands = history.setdefault("bands", {"edges": list(BAND_EDGES), "iteration": [], **{k: [] for k in BAND_KEYS}})
    values = band_diagnostics(grads, surgery.last.diversity, c.tau, c.rho, c.mask)
    rows = torch.stack([values[k] for k in BAND_KEYS]).cpu().tolist()  # one host sync
    bands["iteration"].append(iteration)
    for k, row in zip(BAND_KEYS, rows):
        bands[k].append(row)


def draw_class_batches(data, domains, K, n_real, strategy, gens, device, present=None):
    """Per class: the real batches ``[D_c, n_real, C, H, W]`` of the domains holding the class
    (``present[c]``; all ``D`` when ``None``), on ``device``, and one DSA draw, shared by those
    batches and the class's synthetic images."""
    real, params = [], []
    for c in range(K):
        have = domains if present is None else [domains[i] for i in present[c]]
        real.append(_domain_batches(data, have, c, n_real, gens["data"]).to(device, non_blocking=True))
        params.append(DSAParams.sample(strategy, gens["dsa"], device=device))
    return real, params
