"""The distillation loop: Distribution Matching (DM) and DM with Spectral Gradient Surgery.

Per iteration (``shared/docs/sgs-spec.md`` sections 1-2): a freshly initialised, frozen ConvNet
``psi``; for every class ``c`` one DSA draw shared by the class's real batches of all source
domains and its synthetic images; domain losses

    L_d = sum_c || mean psi(A(real_{c,d})) - mean psi(A(syn_c)) ||^2        d = 1..D

(``matching="m3d"``: a Gaussian-kernel MMD per class instead of the mean difference,
:mod:`sgs_cuda.dm.matching`). ``dm`` steps the pixels with the gradient of the pooled loss
(real batches of all domains pooled); ``dm_sgs`` hands the D losses to
:class:`~sgs_cuda.surgery.SpectralGradientSurgery` (one synthetic forward shared by all domains,
one batched backward) and steps with its update; ``dm_dam`` adds to DM's pooled loss the matching
of learnable per-domain views of each image with that domain alone (:mod:`sgs_cuda.dm.dam`).

All randomness of the loop comes from streams it owns (:class:`RandomStreams`), inside
``torch.random.fork_rng`` so the caller's global RNG is untouched: the embedding network's
stream (one per run: every process draws the same network), and per class and iteration the
real batches, the DSA draw and the surgery's domain assignment (seeded from ``(seed, iteration,
class)``), so a class's draws do not depend on which process owns it or which chunk it falls in.
Checkpoints (:mod:`sgs_cuda.dm.checkpoint`) hold every state, so a resumed run ends with the
same images as an uninterrupted one; the history is recorded by :mod:`sgs_cuda.dm.recorder`.

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
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import _io
from .._dictconfig import DictConfig
from ..data.sampling import check_source_domains, sample_domain_batches
from ..distributed import SOLO, World
from ..options import SGSConfig
from ..surgery import SpectralGradientSurgery, domain_gradients
from .dam import domain_views, initial_logits
from .checkpoint import CHECKPOINT_NAME, optimizer_rows, resumable_checkpoint, save_checkpoint, say_resumed
from .dsa import DEFAULT_STRATEGY, DSAParams, parse_strategy
from .matching import MATCHINGS, matching_losses
from .memory import plan_memory
from .networks import COMPUTE_DTYPES, NORMS, build_convnet, resolve_depth
from .recorder import HistoryRecorder

METHODS = ("dm", "dm_sgs", "dm_dam")
INITS = ("real", "noise", "spectral", "spectral_min")
SPECTRAL_INIT_SAMPLE = 64  # real images per source domain and class behind the class amplitude spectra
PRECISIONS = ("auto", *COMPUTE_DTYPES)


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
    dam_weight: float = 1.0  # dm_dam: weight of the domain views' matching loss (sgs_cuda.dm.dam)
    dam_temperature: float = 0.1  # dm_dam: temperature of the softmax over the domains' mask logits
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
        if self.dam_weight < 0 or not self.dam_temperature > 0:
            raise ValueError(f"need dam_weight >= 0 and dam_temperature > 0, got {self.dam_weight}, "
                             f"{self.dam_temperature}")
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
    images = torch.cat([data.real_batch(d, label, k, generator=generator)
                        for d, k in zip(have, per_domain) if k]).float()
    if init in ("spectral", "spectral_min"):
        images = _spectral_init(data, have, label, images, init, generator)
    return images


def class_amplitudes(data, have: Sequence[str], label: int, generator) -> torch.Tensor:
    """``[len(have), C, H, W // 2 + 1]`` float64: per source domain, the mean ``|rfft2|`` of up to
    ``SPECTRAL_INIT_SAMPLE`` of its train images of class ``label``."""
    return torch.stack([
        torch.fft.rfft2(data.real_batch(d, label, min(SPECTRAL_INIT_SAMPLE, data.count(d, label, "train")),
                                        generator=generator).double()).abs().mean(0) for d in have])


def _spectral_init(data, have: Sequence[str], label: int, images: torch.Tensor, init: str, generator) -> torch.Tensor:
    """Real images with their domain-specific spectrum taken out before the first step: each keeps
    its phase and takes its class's amplitude spectrum across the source domains
    (:func:`class_amplitudes`: their mean over the domains, ``spectral``, FACT/FDA-style, or
    their minimum, ``spectral_min``: a component one domain carries and the others do not is
    brought down to the quietest domain's level)."""
    amplitudes = class_amplitudes(data, have, label, generator)
    amplitude = amplitudes.mean(0) if init == "spectral" else amplitudes.amin(0)
    spectrum = torch.fft.rfft2(images.double())
    phase = torch.where(spectrum.abs() > 0, spectrum / spectrum.abs().clamp_min(1e-300), 1)
    return torch.fft.irfft2(amplitude * phase, s=images.shape[-2:]).float()


def amplitude_floor(data, domains: Sequence[str], classes: range, ipc: int, present, streams) -> torch.Tensor:
    """``[len(classes) * ipc, C, H, W // 2 + 1]`` float32: for each synthetic image, its class's
    smallest mean amplitude over the source domains (what ``SGSConfig.amp_decay`` shrinks toward),
    from a stream of its own so that a resumed run computes the same floor."""
    floors = [class_amplitudes(data, [domains[i] for i in present[c]], c, streams.for_class("init", -2, c)).amin(0)
              for c in classes]
    return torch.stack(floors).float().repeat_interleave(ipc, dim=0)


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


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    domains = check_source_domains(data, source_domains, "distill")
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


@dataclass
class _Run:
    """What every step of one distillation uses, fixed for the run."""
    data: object
    domains: list[str]
    cfg: DistillConfig
    device: torch.device
    mine: range  # this process's classes
    present: list[list[int]] | None  # per class, the source domains holding it (None: all do)
    net: torch.nn.Module
    streams: RandomStreams
    n_real: int  # real images per class and domain
    strategy: str  # the DSA strategy ("none" without DSA)
    surgery: SpectralGradientSurgery | None  # None for plain DM
    dam_logits: torch.Tensor | None = None  # dm_dam: the mask logits [N_mine, D, C, H, W] (optimised with the images)


def _distill(data, domains, cfg: DistillConfig, device, ckpt_path, resume, progress, log,
             world: World) -> DistillResult:
    t0 = time.perf_counter()
    K, ipc = len(data.classes), cfg.ipc
    run, chunks = _prepare(data, domains, cfg, device, world, log)
    recorder = HistoryRecorder(cfg, len(domains), world, one_pass=len(chunks) == 1 and not world.sharded,
                               cue_bins=getattr(data, "cue_bins", None),
                               class_cue_bins=data.class_cue_bins(domains) if hasattr(data, "class_cue_bins") else None)
    if cfg.method == "dm_sgs" and cfg.sgs.normalize == "kept_fraction" and not recorder.one_pass:
        raise ValueError("normalize=kept_fraction divides by the mask fraction of the whole set, so it needs all "
                         "classes in one pass on one process (set class_chunk/memory_gib so they fit, one process)")
    rows_mine = slice(run.mine.start * ipc, run.mine.stop * ipc)
    saved = world.on_main(lambda: resumable_checkpoint(ckpt_path, cfg, domains, data.classes)) if resume else None
    if saved is not None:
        say_resumed(saved, cfg, ckpt_path, log)
        images = saved.pop("images")[rows_mine]
        recorder.history = saved["history"]
    else:
        images = initial_class_images(data, domains, ipc, cfg.init, run.mine, class_domains(data, domains),
                                      run.streams)
    if run.surgery is not None and cfg.sgs.amp_decay:
        run.surgery.amplitude_floor = amplitude_floor(data, domains, run.mine, ipc, class_domains(data, domains),
                                                      run.streams).to(device)
    labels = torch.arange(K).repeat_interleave(ipc)
    syn = images.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    del images  # (a resumed run's whole set too: the checkpoint's images were popped)
    params = [syn]
    if cfg.method == "dm_dam":
        logits = saved["dam"][rows_mine] if saved is not None else initial_logits(len(syn), len(domains),
                                                                                 data.image_shape, "cpu")
        run.dam_logits = logits.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
        params.append(run.dam_logits)
    opt = torch.optim.SGD(params, lr=cfg.lr_img, momentum=cfg.momentum)
    start = 0
    if saved is not None:
        opt.load_state_dict(optimizer_rows(saved.pop("optimizer"), rows_mine))
        run.streams.set_state(saved["rng"])
        if run.surgery is not None and saved.get("surgery"):  # per-image state, rows first
            run.surgery.load_state_dict({k: None if v is None else v[rows_mine] for k, v in saved["surgery"].items()},
                                        device)
        start = saved["iteration"]
        saved = None  # the whole set's momentum: only this process's rows are kept

    def checkpoint(iteration: int):
        recorder.flush()
        surgery = None
        if run.surgery is not None:
            surgery = {k: None if v is None else world.gather_rows(v.to(device)).cpu()
                       for k, v in run.surgery.state_dict().items()}
        dam = None if run.dam_logits is None else world.gather_rows(run.dam_logits.detach()).cpu()
        save_checkpoint(ckpt_path, world, syn, opt, labels=labels, iteration=iteration, history=recorder.history,
                        rng=run.streams.state(), config=cfg.to_dict(), source_domains=domains,
                        classes=list(data.classes), surgery=surgery, dam=dam)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc=cfg.method,
               dynamic_ncols=True, leave=False)
    try:
        for it in range(start, cfg.iterations):
            _step(run, recorder, syn, opt, it, chunks)
            bar.update(1)
            done = it + 1
            if done % cfg.log_every == 0:
                recorder.flush(bar)
            if ckpt_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                    and done < cfg.iterations:
                checkpoint(done)
        recorder.flush(bar)
        if ckpt_path is not None and cfg.checkpoint_every:
            checkpoint(cfg.iterations)  # a later resume with the same config returns at once
    finally:
        bar.close()
    images = world.gather_rows(syn.detach()).cpu().clone()
    return DistillResult(images, labels, recorder.history, cfg, time.perf_counter() - t0)


def _prepare(data, domains, cfg: DistillConfig, device, world: World, log) -> tuple[_Run, list[tuple[int, int]]]:
    """The run's fixed parts (network, streams, this process's classes) and its chunks of classes
    (:func:`~sgs_cuda.dm.memory.plan_memory`: refused here when even one class cannot fit)."""
    K, D = len(data.classes), len(domains)
    n_real = max(1, cfg.batch_real // D)  # per domain: equal sizes make mean_d g_d the pooled gradient
    surgery = cfg.method == "dm_sgs"
    check_shardable(cfg, K, world)
    mine = world.shard(K)
    streams = RandomStreams(cfg.seed, device)
    net = build_convnet(data.image_shape, K, cfg.width, cfg.depth, cfg.norm, device=device)
    net.set_compute(cfg.precision, cfg.channels_last)
    net.train()  # batch norm (if chosen) uses the batch statistics, as in the reference
    for p in net.parameters():
        p.requires_grad_(False)
    present = class_domains(data, domains)
    if all(len(p) == D for p in present):
        present = None
    else:
        gaps = [f"{data.classes[c]} (in {len(p)}/{D})" for c, p in enumerate(present) if len(p) < D]
        warnings.warn(f"some source domains lack classes {gaps}: their terms use the pooled class mean",
                      RuntimeWarning, stacklevel=4)
    plan = plan_memory(data.image_shape, ipc=cfg.ipc, classes=len(mine), num_domains=D, n_real=n_real,
                       width=cfg.width, depth=cfg.depth, num_classes=K, surgery=surgery, device=device,
                       precision=cfg.precision, chunk_classes=cfg.class_chunk, memory_gib=cfg.memory_gib,
                       splittable=cfg.norm != "batchnorm", contrast=surgery and cfg.sgs.agree_on == "contrast",
                       ema=surgery and cfg.sgs.ema > 0, amplitude_floor=surgery and cfg.sgs.amp_decay > 0,
                       dam=cfg.method == "dm_dam")
    log(plan.describe())
    # check_finite off: a non-finite loss stops the run at the next flush (HistoryRecorder)
    helper = SpectralGradientSurgery(cfg.sgs, check_finite=False, images_per_class=cfg.ipc) if surgery else None
    run = _Run(data, domains, cfg, device, mine, present, net, streams, n_real,
               cfg.dsa_strategy if cfg.dsa else "none", helper)
    return run, plan.chunks


def _step(run: _Run, recorder: HistoryRecorder, syn: torch.Tensor, opt, it: int, chunks) -> None:
    """One iteration: a fresh embedding network, every chunk's gradient, one optimizer step."""
    cfg = run.cfg
    run.net.reinitialize(run.streams.net)
    assign = None
    if run.surgery is not None:
        assign = run.streams.assignment(it, run.mine, cfg.ipc, len(run.domains), cfg.sgs.assignment)
    recorder.start(it)
    opt.zero_grad(set_to_none=True)
    grad = torch.empty_like(syn)
    if run.dam_logits is not None:
        run.dam_logits.grad = torch.empty_like(run.dam_logits)  # filled chunk by chunk, like grad
    for lo, hi in chunks:
        _chunk_gradient(run, recorder, syn, grad, it, run.mine[lo:hi], slice(lo * cfg.ipc, hi * cfg.ipc), assign)
    syn.grad = grad
    opt.step()
    recorder.end()


def _chunk_gradient(run: _Run, recorder: HistoryRecorder, syn, grad, it: int, classes: range, rows: slice,
                    assign) -> None:
    """The gradient of a chunk of classes' synthetic images (``grad[rows]``), and its records."""
    cfg, present = run.cfg, run.present
    part = syn[rows]  # a view: its gradient is the chunk's rows only
    real, params = draw_class_batches(run.data, run.domains, classes, run.n_real, run.strategy, run.streams, it,
                                      run.device, present)
    contrast = run.surgery is not None and cfg.sgs.agree_on == "contrast"
    logits = None if run.dam_logits is None else run.dam_logits[rows]
    losses, pooled, *extra = matching_losses(
        run.net, real, part, params, pool_all=cfg.norm == "batchnorm",
        present=None if present is None else [present[c] for c in classes], num_domains=len(run.domains),
        matching=cfg.matching, contrast=contrast,
        views=None if logits is None else domain_views(part, logits, cfg.dam_temperature))
    if logits is not None:
        grad[rows], run.dam_logits.grad[rows] = torch.autograd.grad(pooled + cfg.dam_weight * extra[0], (part, logits))
        recorder.add_dm(pooled)
        return
    if run.surgery is None:
        (grad[rows],) = torch.autograd.grad(pooled, part)
        recorder.add_dm(pooled)
        return
    grads = domain_gradients(losses, part, "auto")
    source = domain_gradients(extra[0], part, "auto") if contrast else None
    grad[rows] = run.surgery(grads, assign[rows], images=part.detach(), rows=rows, num_images=len(run.mine) * cfg.ipc,
                             return_parts=recorder.needs_parts, agree_source=source)
    recorder.add_surgery(pooled, losses, grads, run.surgery.last, run.surgery.last_agree_on, classes)


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
