"""The distillation loop: Distribution Matching (DM) and DM with Spectral Gradient Surgery.

Per iteration (``shared/docs/sgs-spec.md`` sections 1-2): a freshly initialised, frozen ConvNet
``psi``; for every class ``c`` one DSA draw shared by the class's real batches of all source
domains and its synthetic images; domain losses

    L_d = sum_c || mean psi(A(real_{c,d})) - mean psi(A(syn_c)) ||^2        d = 1..D

``dm`` steps the pixels with the gradient of the pooled loss (real batches of all domains
pooled); ``dm_sgs`` hands the D losses to :class:`~sgs_cuda.surgery.SpectralGradientSurgery`
(one synthetic forward shared by all domains, one batched backward) and steps with its update.

All randomness of the loop comes from generators it owns (data, network init, DSA) plus torch's
default generator (the surgery's random domain assignment), inside ``torch.random.fork_rng`` so
the caller's global RNG is untouched. Checkpoints hold every one of these states, so a resumed
run ends with the same images as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..surgery import SGSConfig, SpectralGradientSurgery
from .dsa import DEFAULT_STRATEGY, DSAParams, augment, parse_strategy
from .networks import NORMS, build_convnet

METHODS = ("dm", "dm_sgs")
INITS = ("real", "noise")
CHECKPOINT_NAME = "checkpoint.pt"
# Fields that may differ between a checkpoint and the resuming config (they do not change the
# trajectory up to the checkpoint): a run can be extended or checkpointed at another interval.
_RESUMABLE_CHANGES = {"iterations", "checkpoint_every", "log_every"}


@dataclass
class DistillConfig:
    """Hyper-parameters of one distillation run (defaults: the DM reference / the paper)."""
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
        for name in ("ipc", "batch_real", "width", "depth", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_img <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr_img > 0 and 0 <= momentum < 1, got {self.lr_img}, {self.momentum}")
        parse_strategy(self.dsa_strategy)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown distillation option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class DistillResult:
    images: torch.Tensor  # [K * ipc, C, H, W] float32 on the CPU, normalised like the data
    labels: torch.Tensor  # [K * ipc] int64
    history: dict  # lists per recorded iteration: iteration, loss (+ domain_loss, mask_fraction, shared_energy)
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
    the source domains (``init="real"``), or standard normal noise (``"noise"``)."""
    K = len(data.classes)
    labels = torch.arange(K).repeat_interleave(ipc)
    if init == "noise":
        return torch.randn((K * ipc, *data.image_shape), generator=generator), labels
    images = []
    for c in range(K):
        per_domain = [ipc // len(domains) + (i < ipc % len(domains)) for i in range(len(domains))]
        images += [data.real_batch(d, c, k, generator=generator) for d, k in zip(domains, per_domain) if k]
    return torch.cat(images).float(), labels


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
    """``torch.save`` to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_resumable(saved: dict, cfg: DistillConfig, domains, data) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved["config"].get(k) != now[k])
    if diff:
        raise ValueError(f"cannot resume: the checkpoint was written with different settings for {diff} "
                         f"(checkpoint: {[saved['config'].get(k) for k in diff]}, now: {[now[k] for k in diff]})")
    if list(saved["source_domains"]) != list(domains) or list(saved["classes"]) != list(data.classes):
        raise ValueError(f"cannot resume: checkpoint source domains/classes {saved['source_domains']}/"
                         f"{saved['classes']} differ from {list(domains)}/{list(data.classes)}")


def _new_history(method: str) -> dict:
    keys = ["iteration", "loss"] + (["domain_loss", "mask_fraction", "shared_energy"] if method == "dm_sgs" else [])
    return {k: [] for k in keys}


# --- the loop -------------------------------------------------------------------------------

def distill(data, source_domains: Sequence[str], cfg: DistillConfig | None = None, device="cpu",
            run_dir=None, resume: bool = False, progress: bool = True) -> DistillResult:
    """Distil ``cfg.ipc`` images per class from ``source_domains`` of ``data``.

    Args:
        data: a :class:`~sgs_cuda.data.base.MultiDomainDataset`.
        source_domains: the domains the real batches come from (leave the target out).
        cfg: :class:`DistillConfig`.
        device: where the networks and the synthetic images live.
        run_dir: folder for ``checkpoint.pt`` (written every ``cfg.checkpoint_every`` iterations).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        progress: show a tqdm bar with the loss (and the surgery's mask fraction).
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
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _distill(data, domains, cfg, device, ckpt_path, resume, progress)


def _distill(data, domains, cfg: DistillConfig, device, ckpt_path, resume, progress) -> DistillResult:
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

    start, history = 0, _new_history(cfg.method)
    saved = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resumable(saved, cfg, domains, data)
        if saved["iteration"] > cfg.iterations:
            raise ValueError(f"cannot resume: the checkpoint is at iteration {saved['iteration']}, "
                             f"beyond iterations={cfg.iterations}")
        images, labels = saved["images"], saved["labels"]
        start, history = saved["iteration"], saved["history"]
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
        keys = [k for k in history if k != "iteration"]
        history["iteration"] += its
        for j, k in enumerate(keys):
            history[k] += [r[j] for r in rows]
        last = dict(zip(keys, rows[-1]))
        if last["loss"] != last["loss"] or last["loss"] == float("inf"):
            raise FloatingPointError(f"the DM loss became {last['loss']} at iteration {its[-1]}; "
                                     "lower lr_img or check the data normalisation")
        if bar is not None:
            post = {"loss": f"{last['loss']:.4g}"}
            if "mask_fraction" in last:
                post["mask"] = f"{last['mask_fraction']:.3f}"
            bar.set_postfix(post, refresh=False)

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
            losses, pooled = _matching_losses(net, syn, data, domains, K, ipc, n_real, strategy,
                                              cfg.norm == "batchnorm", gens, device)
            opt.zero_grad(set_to_none=True)
            if surgery is None:
                pooled.backward()
                record = pooled.detach().view(1)
            else:
                surgery.backward(losses, syn)
                diag = surgery.last.diagnostics
                record = torch.stack([pooled.detach().double(), losses.detach().mean().double(),
                                      diag["mask_fraction"].double(), diag["shared_energy"].double()])
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


def _matching_losses(net, syn, data, domains, K, ipc, n_real, strategy, pool_all, gens, device):
    """``(L [D], pooled)``: the domain-wise DM losses and the pooled-batch DM loss.

    Real features need no gradient; the synthetic images go through the net in one forward
    (their graph is shared by all D losses). With batch norm the real images of all classes also
    go through one forward, so both sides see batch statistics over all classes.
    """
    D = len(domains)
    real_aug, syn_aug = [], []
    for c in range(K):
        real = _domain_batches(data, domains, c, n_real, gens["data"]).to(device, non_blocking=True)
        params = DSAParams.sample(strategy, gens["dsa"], device=device)  # one draw for real and syn
        real_aug.append(augment(real.flatten(0, 1), params))
        syn_aug.append(augment(syn[c * ipc:(c + 1) * ipc], params))
    with torch.no_grad():
        if pool_all:
            mu_real = net.embed(torch.cat(real_aug)).view(K, D, n_real, -1).mean(2)
        else:
            mu_real = torch.stack([net.embed(r).view(D, n_real, -1).mean(1) for r in real_aug])  # [K, D, F]
    mu_syn = net.embed(torch.cat(syn_aug)).view(K, ipc, -1).mean(1)  # [K, F]
    losses = ((mu_real - mu_syn[:, None]) ** 2).sum(dim=(0, 2))  # [D]
    pooled = ((mu_real.mean(1) - mu_syn) ** 2).sum()
    return losses, pooled
