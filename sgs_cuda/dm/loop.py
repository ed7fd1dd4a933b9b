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

All randomness of the loop comes from streams it owns (:class:`RandomStreams`), inside
``torch.random.fork_rng`` so the caller's global RNG is untouched: the embedding network's
stream (one per run: every process draws the same network), and per class and iteration the
real batches, the DSA draw and the surgery's domain assignment (seeded from ``(seed, iteration,
class)``), so a class's draws do not depend on which process owns it or which chunk it falls in.
Checkpoints hold every state, so a resumed run ends with the same images as an uninterrupted
one.

Scale: the classes are processed in chunks (:mod:`sgs_cuda.dm.memory` picks the largest that
fits and prints the estimate; a run that cannot fit is refused before it starts), and a
:class:`~sgs_cuda.distributed.World` of several processes shards them (each rank distils its
block of classes; the history is summed and the set gathered). DM's per-class losses are
independent given the network, so neither changes the result: chunked and sharded runs give
the single-process set (bitwise on the CPU, tests/test_chunking.py and tests/test_distributed.py).
``precision="bfloat16"`` runs the embedding forward under autocast and ``channels_last`` in NHWC
layout (both ``"auto"``: on for CUDA, off on the CPU); the synthetic images, their gradients and
the update stay float32.
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
from .._dictconfig import DictConfig
from ..distributed import SOLO, World
from ..ops import spatial_gradient_surgery, spectral_gradient_surgery
from ..data.sampling import sample_domain_batches
from ..surgery import SGSConfig, domain_gradients
from .bands import (BAND_EDGES, BAND_KEYS, TRUTH_GROUPS, band_diagnostics, band_index, chance_keep_rate,
                    truth_mask_sums)
from .dsa import DEFAULT_STRATEGY, DSAParams, parse_strategy
from .matching import MATCHINGS, matching_losses
from .memory import plan_memory
from .networks import COMPUTE_DTYPES, NORMS, build_convnet, resolve_depth

METHODS = ("dm", "dm_sgs")
INITS = ("real", "noise")
PRECISIONS = ("auto", *COMPUTE_DTYPES)
CHECKPOINT_NAME = "checkpoint.pt"
# Fields that may differ between a checkpoint and the resuming config (they do not change the
# trajectory up to the checkpoint, or only how it is computed): a run can be extended or
# checkpointed at another interval, resumed with other memory limits (chunks give the same
# result) or on another kind of device (precision, layout: the resume says so).
COMPUTE_SETTINGS = ("precision", "channels_last")
RESUMABLE_CHANGES = frozenset({"iterations", "checkpoint_every", "log_every", "class_chunk", "memory_gib",
                               *COMPUTE_SETTINGS})
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
    depth: int | str = "auto"  # "auto": 3 at 32 px, 4 at 64, 5 at 128, 6 at 256 (networks.auto_depth)
    norm: str = "instancenorm"
    matching: str = "dm"  # "dm": feature means; "m3d": Gaussian-kernel MMD (sgs_cuda.dm.matching)
    sgs: SGSConfig = field(default_factory=SGSConfig)
    seed: int = 0
    checkpoint_every: int = 0  # 0: no checkpoints
    log_every: int = 10  # history is read back to the host (one synchronisation) every log_every iterations
    precision: str = "auto"  # embedding forward: float32, bfloat16 (autocast); auto: bfloat16 on CUDA
    channels_last: bool | str = "auto"  # NHWC layout for the embedding; auto: on CUDA, off on the CPU
    class_chunk: int = 0  # classes per forward/backward pass; 0: as many as fit in memory
    memory_gib: float = 0.0  # memory a process may use; 0: 90% of what the device has free

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
        for name in ("ipc", "batch_real", "width", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth != "auto" and (isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1):
            raise ValueError(f"depth must be a positive integer or 'auto', got {self.depth!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be true, false or 'auto', got {self.channels_last!r}")
        if self.memory_gib < 0:
            raise ValueError(f"memory_gib must be >= 0, got {self.memory_gib}")
        for name in ("iterations", "checkpoint_every", "class_chunk"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_img <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr_img > 0 and 0 <= momentum < 1, got {self.lr_img}, {self.momentum}")
        parse_strategy(self.dsa_strategy)

    def resolved(self, image_shape, device) -> "DistillConfig":
        """This config with ``"auto"`` replaced by what it means for ``image_shape`` on ``device``
        (the values a run records: its checkpoints and sets say what was computed)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        precision = self.precision
        if precision == "auto":
            precision = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        channels_last = cuda if self.channels_last == "auto" else bool(self.channels_last)
        return dataclasses.replace(self, depth=resolve_depth(self.depth, image_shape), precision=precision,
                                   channels_last=channels_last)


@dataclass
class DistillResult:
    images: torch.Tensor  # [K * ipc, C, H, W] float32 on the CPU, normalised like the data
    labels: torch.Tensor  # [K * ipc] int64
    history: dict  # lists per recorded iteration: iteration, loss (+ domain_loss, mask_fraction, shared_energy,
    # "bands": per-frequency-band diagnostics every log_every iterations, sgs_cuda.dm.bands, and on a
    # benchmark with a known cue (fmnist-cues) "truth": the mask on the cue bins vs the others)
    config: DistillConfig
    seconds: float = 0.0  # wall time of this call (a resumed call counts only its own part)


# --- random streams -------------------------------------------------------------------------

STREAM_KINDS = {"init": 0, "data": 1, "dsa": 2, "assign": 3}
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, kind: str, iteration: int, label: int) -> int:
    """The 64-bit seed of one class's stream ``kind`` at ``iteration`` (SplitMix64 over the
    tuple): well mixed, so neighbouring classes and iterations draw unrelated numbers."""
    x = 0
    for value in (seed, STREAM_KINDS[kind], iteration, label):
        x = _splitmix64(x ^ (value & _MASK64))
    return x


class RandomStreams:
    """The loop's randomness (module docstring). ``net``: the embedding network's stream, the
    same on every process. :meth:`for_class` gives the generator of one class's draws of a kind
    (``init``, ``data``, ``dsa``); :meth:`assignment` the surgery's domain per image."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.gens = {"net": torch.Generator().manual_seed(seed * 1000 + 1)}
        self._scratch = {kind: torch.Generator() for kind in STREAM_KINDS}
        # torch's default generators too (inside distill's fork_rng), so that a draw the loop does
        # not own is seeded and checkpointed as well
        torch.default_generator.manual_seed(seed * 1000 + 3)
        if device.type == "cuda":
            torch.cuda.default_generators[device.index].manual_seed(seed * 1000 + 3)

    @property
    def net(self) -> torch.Generator:
        return self.gens["net"]

    def for_class(self, kind: str, iteration: int, label: int) -> torch.Generator:
        g = self._scratch[kind]
        g.manual_seed(stream_seed(self.seed, kind, iteration, label))
        return g

    def assignment(self, iteration: int, classes: range, ipc: int, num_domains: int, kind: str) -> torch.Tensor:
        """``[len(classes) * ipc]`` source domain per synthetic image of ``classes`` (class-ordered):
        ``fixed``: image ``n`` (its index in the whole set) takes ``n % D``; ``random``: a fresh
        draw per image, from each class's stream."""
        first, count = classes.start * ipc, len(classes) * ipc
        if kind == "fixed":
            return torch.arange(first, first + count, device=self.device) % num_domains
        return torch.cat([torch.randint(0, num_domains, (ipc,), generator=self.for_class("assign", iteration, c))
                          for c in classes]).to(self.device)

    def state(self) -> dict:
        states = {name: g.get_state() for name, g in self.gens.items()}
        states["torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            states["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def set_state(self, states: dict) -> None:
        for name, g in self.gens.items():
            g.set_state(states[name])
        torch.set_rng_state(states["torch_cpu"])
        if self.device.type == "cuda" and "torch_cuda" in states:  # (absent: written by a CPU run)
            torch.cuda.set_rng_state(states["torch_cuda"], self.device)


# --- helpers --------------------------------------------------------------------------------

def _class_init(data, have: Sequence[str], label: int, ipc: int, init: str, generator) -> torch.Tensor:
    if init == "noise":
        return torch.randn((ipc, *data.image_shape), generator=generator)
    per_domain = [ipc // len(have) + (i < ipc % len(have)) for i in range(len(have))]
    return torch.cat([data.real_batch(d, label, k, generator=generator) for d, k in zip(have, per_domain) if k]).float()


def initial_class_images(data, domains: Sequence[str], ipc: int, init: str, classes: range,
                         present: Sequence[Sequence[int]], streams: RandomStreams) -> torch.Tensor:
    """The initial images of ``classes`` (class-ordered), each class from its own stream."""
    return torch.cat([_class_init(data, [domains[i] for i in present[c]], c, ipc, init,
                                  streams.for_class("init", -1, c)) for c in classes]).float()


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
    out = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    if out.get("method") == "dm":
        out.pop("sgs", None)
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
            log: Callable[[str], None] | None = None, world: World | None = None) -> DistillResult:
    """Distil ``cfg.ipc`` images per class from ``source_domains`` of ``data``.

    Args:
        data: a :class:`~sgs_cuda.data.base.MultiDomainDataset`.
        source_domains: the domains the real batches come from (leave the target out).
        cfg: :class:`DistillConfig` (``"auto"`` settings are resolved for the data and device:
            the result's ``config`` says what ran).
        device: where the networks and the synthetic images live.
        run_dir: folder for ``checkpoint.pt`` (written every ``cfg.checkpoint_every`` iterations).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (written with any number
            of processes).
        progress: show a tqdm bar with the loss (and the surgery's mask fraction).
        log: where one-line messages go (the memory estimate, resuming); default: stderr.
        world: the processes sharing this distillation (:mod:`sgs_cuda.distributed`); each
            distils its block of classes, rank 0 writes the checkpoints, and every rank returns
            the whole gathered set. Default: this process alone.
    """
    cfg = cfg or DistillConfig()
    world = world or SOLO
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
        world.on_main(lambda: _io.ensure_dir(ckpt_path.parent))

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = cfg.resolved(data.image_shape, device)
    say = (log or _stderr) if world.is_main else (lambda msg: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _distill(data, domains, cfg, device, ckpt_path, resume, progress and world.is_main, say, world)


def check_shardable(cfg: DistillConfig, num_classes: int, world: World) -> None:
    """Refuse, in one line, a distillation that cannot be split over ``world``'s processes."""
    if not world.sharded:
        return
    if cfg.norm == "batchnorm":
        raise ValueError("norm=batchnorm pools its batch statistics over the classes, so the classes of a sharded "
                         "run would interact: use norm=instancenorm (the default), or run one process")
    if num_classes < world.world_size:
        raise ValueError(f"{num_classes} classes cannot be shared by {world.world_size} processes: start at most "
                         f"{num_classes} (torchrun --nproc_per_node)")


def _distill(data, domains, cfg: DistillConfig, device, ckpt_path, resume, progress, log,
             world: World) -> DistillResult:
    t0 = time.perf_counter()
    K, D, ipc = len(data.classes), len(domains), cfg.ipc
    n_real = max(1, cfg.batch_real // D)  # per domain: equal sizes make mean_d g_d the pooled gradient
    strategy = cfg.dsa_strategy if cfg.dsa else "none"
    surgery = cfg.method == "dm_sgs"
    check_shardable(cfg, K, world)
    mine = world.shard(K)  # this process's classes
    rows_mine = slice(mine.start * ipc, mine.stop * ipc)

    streams = RandomStreams(cfg.seed, device)
    net = build_convnet(data.image_shape, K, cfg.width, cfg.depth, cfg.norm, device=device)
    net.set_compute(cfg.precision, cfg.channels_last)
    net.train()  # batch norm (if chosen) uses the batch statistics, as in the reference
    for p in net.parameters():
        p.requires_grad_(False)

    present_all = class_domains(data, domains)
    present = None
    if not all(len(p) == D for p in present_all):
        present = present_all
        gaps = [f"{data.classes[c]} (in {len(p)}/{D})" for c, p in enumerate(present_all) if len(p) < D]
        warnings.warn(f"some source domains lack classes {gaps}: their terms use the pooled class mean",
                      RuntimeWarning, stacklevel=3)
    plan = plan_memory(data.image_shape, ipc=ipc, classes=len(mine), num_domains=D, n_real=n_real, width=cfg.width,
                       depth=cfg.depth, num_classes=K, surgery=surgery, device=device, precision=cfg.precision,
                       chunk_classes=cfg.class_chunk, memory_gib=cfg.memory_gib, splittable=cfg.norm != "batchnorm")
    log(plan.describe())
    chunks = plan.chunks
    whole = len(chunks) == 1 and not world.sharded  # one pass over the whole set: the op's own diagnostics
    if surgery and cfg.sgs.normalize == "kept_fraction" and not whole:
        raise ValueError("normalize=kept_fraction divides by the mask fraction of the whole set, so it needs all "
                         "classes in one pass on one process (set class_chunk/memory_gib so they fit, one process)")

    start, history = 0, _new_history(cfg.method)
    saved = world.on_main(lambda: _resumable_checkpoint(ckpt_path, cfg, domains, data)) if resume else None
    if saved is not None:
        images = saved.pop("images")[rows_mine]
        start, history = saved["iteration"], saved["history"]
        log(f"resuming from iteration {start} of {cfg.iterations} ({ckpt_path})")
        then = {k: saved["config"].get(k) for k in COMPUTE_SETTINGS}
        if then != {k: getattr(cfg, k) for k in COMPUTE_SETTINGS}:
            log(f"the checkpoint was computed with {then}, this run continues with "
                f"{ {k: getattr(cfg, k) for k in COMPUTE_SETTINGS} }")
    else:
        images = initial_class_images(data, domains, ipc, cfg.init, mine, present_all, streams)
    labels = torch.arange(K).repeat_interleave(ipc)
    syn = images.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    del images  # (a resumed run's whole set too: the checkpoint's images were popped)
    opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
    if saved is not None:
        opt.load_state_dict(_optimizer_rows(saved.pop("optimizer"), rows_mine))
        streams.set_state(saved["rng"])
        saved = None  # the whole set's momentum: only this process's rows are kept
    op = spatial_gradient_surgery if cfg.sgs.space == "spatial" else spectral_gradient_surgery
    bands_every = cfg.log_every if surgery and cfg.sgs.space == "spectral" else 0
    # a benchmark that knows where its domain cue lives (fmnist-cues): the mask against that truth
    cue_bins = getattr(data, "cue_bins", None) if bands_every else None

    pending: list[tuple[int, torch.Tensor]] = []  # (iteration, summed record) not yet read back
    pending_bands: list[tuple[int, torch.Tensor]] = []  # (iteration, [2, keys, bands] sums)
    pending_truth: list[tuple[int, torch.Tensor]] = []  # (iteration, [2, 2] sums: kept, components)

    def flush(bar=None):
        if not pending:
            return
        its = [i for i, _ in pending]
        rows = world.all_sum(torch.stack([v for _, v in pending]).double()).cpu().tolist()  # the one host sync
        pending.clear()
        rows = [_record_values(r) for r in rows]
        keys = [k for k in history if k not in ("iteration", "bands", "truth")]
        history["iteration"] += its
        for j, k in enumerate(keys):
            history[k] += [r[j] for r in rows]
        last = dict(zip(keys, rows[-1]))
        if pending_bands:
            _append_bands(history, [i for i, _ in pending_bands],
                          world.all_sum(torch.stack([b for _, b in pending_bands])).cpu())
            pending_bands.clear()
        if pending_truth:
            _append_truth(history, [i for i, _ in pending_truth],
                          world.all_sum(torch.stack([t for _, t in pending_truth])).cpu(),
                          chance_keep_rate(D, cfg.sgs.tau, cfg.sgs.rho, cfg.sgs.mask), int(cue_bins.sum()))
            pending_truth.clear()
        bad = next((i for i, r in zip(its, rows) if not math.isfinite(r[0])), None)
        if bad is not None:
            raise FloatingPointError(f"the DM loss became non-finite at iteration {bad}; "
                                     "lower lr_img or check the data normalisation")
        if bar is not None:
            post = {"loss": f"{last['loss']:.4g}"}
            if "mask_fraction" in last:
                post["mask"] = f"{last['mask_fraction']:.3f}"
            bar.set_postfix(post)  # redraws: once per log_every iterations

    def gathered_state():
        state = opt.state_dict()
        state["state"] = {i: {k: world.gather_rows(v).cpu() if torch.is_tensor(v) and v.dim() > 0 else v
                              for k, v in s.items()} for i, s in state["state"].items()}
        return world.gather_rows(syn.detach()).cpu(), state

    def checkpoint(iteration: int):
        flush()
        all_images, state = gathered_state()  # collective: every rank takes part
        payload = {"images": all_images, "labels": labels, "optimizer": state, "iteration": iteration,
                   "history": history, "rng": streams.state(), "config": cfg.to_dict(), "source_domains": domains,
                   "classes": list(data.classes)}
        world.on_main(lambda: save_atomic(payload, ckpt_path))

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc=cfg.method,
               dynamic_ncols=True, leave=False)
    try:
        for it in range(start, cfg.iterations):
            net.reinitialize(streams.net)
            assign = streams.assignment(it, mine, ipc, D, cfg.sgs.assignment) if surgery else None
            with_bands = bands_every and (it + 1) % bands_every == 0
            opt.zero_grad(set_to_none=True)
            grad = torch.empty_like(syn)
            record = bands = truth = None
            for lo, hi in chunks:
                classes, rows = mine[lo:hi], slice(lo * ipc, hi * ipc)
                part = syn if whole else syn[rows]  # a view: its gradient is the chunk's rows only
                real, params = draw_class_batches(data, domains, classes, n_real, strategy, streams, it, device,
                                                  present)
                losses, pooled = matching_losses(net, real, part, params, pool_all=cfg.norm == "batchnorm",
                                                 present=None if present is None else [present[c] for c in classes],
                                                 num_domains=D, matching=cfg.matching)
                if not surgery:
                    (grad[rows],) = torch.autograd.grad(pooled, part)
                    row = pooled.detach().double().view(1)
                else:
                    grads = domain_gradients(losses, part, "auto")
                    # the parts only where the record or the bands need them; else the op's fastest path
                    parts = op(grads, assign[rows], return_parts=with_bands or not whole, return_diagnostics=True,
                               check_finite=False, **cfg.sgs.op_kwargs())
                    grad[rows] = parts.update
                    row = _surgery_record(pooled, losses, parts, cfg.sgs.space, whole)
                    if with_bands:
                        b = _band_sums(grads, parts, cfg.sgs, whole)
                        bands = b if bands is None else bands + b
                        if cue_bins is not None:
                            t = truth_mask_sums(grads, cfg.sgs.tau, cfg.sgs.rho, cfg.sgs.mask, cue_bins)
                            truth = t if truth is None else truth + t
                    del grads, parts
                record = row if record is None else record + row
                del real, losses, pooled, part
            syn.grad = grad
            opt.step()
            pending.append((it, record))
            if bands is not None:
                pending_bands.append((it, bands))
            if truth is not None:
                pending_truth.append((it, truth))
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
    images = world.gather_rows(syn.detach()).cpu().clone()
    return DistillResult(images, labels, history, cfg, time.perf_counter() - t0)


def _resumable_checkpoint(ckpt_path, cfg: DistillConfig, domains, data) -> dict | None:
    """The checkpoint to resume from (``None``: there is none), checked against this run."""
    if ckpt_path is None or not ckpt_path.exists():
        return None
    saved = load_checkpoint(ckpt_path)
    _check_resumable(saved, cfg, domains, data)
    if saved["iteration"] > cfg.iterations:
        raise ValueError(f"cannot resume: the checkpoint is at iteration {saved['iteration']}, "
                         f"beyond iterations={cfg.iterations}")
    return saved


def _optimizer_rows(state: dict, rows: slice) -> dict:
    """An optimizer state of the whole set cut to this process's image rows."""
    return {**state, "state": {i: {k: v[rows].clone() if torch.is_tensor(v) and v.dim() > 0 else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}


# --- the recorded diagnostics ---------------------------------------------------------------
# A record is a float64 vector of sums, so chunks and processes add up: for DM+SGS the losses and
# (numerator, denominator) pairs of the two ratios. One pass over the whole set records the op's
# own ratios over 1 (the history is then exactly what the op said).

def _surgery_record(pooled, losses, parts, space: str, whole: bool) -> torch.Tensor:
    d = parts.diagnostics
    if whole:
        one = torch.ones((), dtype=torch.float64, device=pooled.device)
        weights = (one, one)
    else:  # the op's denominators: components over which the mask is taken, energy of the mean
        mean = parts.mean.detach().double()
        if space == "spectral":
            n, c, h, w = mean.shape
            components = torch.tensor(2.0 * n * c * h * (w // 2 + 1), dtype=torch.float64, device=mean.device)
            energy = torch.fft.rfft2(mean).abs().square().sum()
        else:
            components = torch.tensor(float(mean.numel()), dtype=torch.float64, device=mean.device)
            energy = mean.square().sum()
        weights = (components, energy)
    return torch.stack([pooled.detach().double(), losses.detach().mean().double(),
                        d["mask_fraction"].double() * weights[0], weights[0],
                        d["shared_energy"].double() * weights[1], weights[1]])


def _record_values(row: list[float]) -> list[float]:
    """A summed record -> the history's values (loss[, domain loss, mask fraction, shared energy])."""
    if len(row) == 1:
        return row
    return [row[0], row[1], row[2] / row[3], row[4] / row[5]]


def _band_sums(grads: torch.Tensor, parts, sgs: SGSConfig, whole: bool) -> torch.Tensor:
    """``[2, len(BAND_KEYS), bands]``: numerators and denominators of this chunk's band
    diagnostics (:mod:`sgs_cuda.dm.bands`), so that chunks and processes add up."""
    values = band_diagnostics(grads, parts.diversity, sgs.tau, sgs.rho, sgs.mask)
    num = torch.stack([values[k] for k in BAND_KEYS])
    if whole:
        return torch.stack([num, torch.ones_like(num)])
    H, W = grads.shape[-2:]
    idx = band_index(H, W, BAND_EDGES, device=grads.device).flatten()
    nb = len(BAND_EDGES) + 1
    n, c = grads.shape[1:3]
    bins = torch.bincount(idx, minlength=nb).double() * 2 * n * c
    spec = torch.fft.rfft2(parts.mean.detach().double()).abs().square().reshape(-1, idx.numel()).sum(0)
    total = torch.zeros(nb, dtype=torch.float64, device=grads.device).index_add_(0, idx, spec)
    den = torch.stack([bins, total, total, total.sum().expand(nb)])
    weights = {"mask_fraction": bins, "shared_energy": total, "diversity_energy": total, "energy": total.sum()}
    num = torch.stack([values[k] * weights[k] for k in BAND_KEYS])
    return torch.stack([num, den])


def _append_bands(history: dict, iterations: list[int], sums: torch.Tensor) -> None:
    """Append the band diagnostics of ``iterations`` (``sums``: ``[n, 2, keys, bands]``)."""
    bands = history.setdefault("bands", {"edges": list(BAND_EDGES), "iteration": [], **{k: [] for k in BAND_KEYS}})
    values = (sums[:, 0] / sums[:, 1]).tolist()
    for it, rows in zip(iterations, values):
        bands["iteration"].append(it)
        for k, row in zip(BAND_KEYS, rows):
            bands[k].append(row)


def _append_truth(history: dict, iterations: list[int], sums: torch.Tensor, chance: float | None,
                  cue_bins: int) -> None:
    """Append the mask-against-truth fractions of ``iterations`` (``sums``: ``[n, 2, 2]``): the
    share of the cue bins' components the mask kept, of the other bins', and the chance rate."""
    truth = history.setdefault("truth", {"iteration": [], **{g: [] for g in TRUTH_GROUPS}, "chance": chance,
                                         "cue_bins": cue_bins})
    for it, (kept, total) in zip(iterations, sums.tolist()):
        truth["iteration"].append(it)
        for g, k, n in zip(TRUTH_GROUPS, kept, total):
            truth[g].append(k / n if n else float("nan"))


def draw_class_batches(data, domains, classes: Sequence[int], n_real, strategy, streams: RandomStreams, iteration,
                       device, present=None):
    """Per class of ``classes``: the real batches ``[D_c, n_real, C, H, W]`` of the domains
    holding the class (``present[c]``; all ``D`` when ``None``), on ``device``, and one DSA draw,
    shared by those batches and the class's synthetic images."""
    real, params = [], []
    for c in classes:
        have = domains if present is None else [domains[i] for i in present[c]]
        batches = sample_domain_batches(data, have, c, n_real, streams.for_class("data", iteration, c))
        real.append(batches.to(device, non_blocking=True))
        params.append(DSAParams.sample(strategy, streams.for_class("dsa", iteration, c), device=device))
    return real, params
