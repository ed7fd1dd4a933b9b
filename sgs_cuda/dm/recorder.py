"""The distillation's history: what :class:`HistoryRecorder` records per iteration.

Every iteration: the loss, and for DM+SGS the mean domain loss, the mask fraction and the shared
energy. Every ``log_every`` iterations of a spectral DM+SGS run: the band diagnostics
(:mod:`sgs_cuda.dm.bands`) and, on a benchmark that knows where its domain cue lives
(fmnist-cues' ``cue_bins``), the mask against that truth.

A record is a float64 vector of sums, so chunks of classes and processes add up: for DM+SGS the
losses and (numerator, denominator) pairs of the two ratios. One pass over the whole set on one
process records the op's own ratios over 1, so the history is then exactly what the op said. The
records stay on the device and are read back every ``log_every`` iterations (one host sync).
"""
from __future__ import annotations

import math

import torch

from ..distributed import World
from ..options import SGSConfig
from .bands import (BAND_EDGES, BAND_KEYS, TRUTH_GROUPS, band_diagnostics, band_index, chance_keep_rate,
                    truth_mask_sums)


def new_history(method: str) -> dict:
    keys = ["iteration", "loss"] + (["domain_loss", "mask_fraction", "shared_energy"] if method == "dm_sgs" else [])
    return {k: [] for k in keys}


class HistoryRecorder:
    """Sums each iteration's records chunk by chunk (:meth:`start`, :meth:`add_dm` or
    :meth:`add_surgery` per chunk, :meth:`end`) and appends them to ``history`` at :meth:`flush`.

    ``one_pass``: the whole set in one pass on one process, where the op's own diagnostics are the
    whole set's; otherwise they are weighted by their denominators so that the sums add up."""

    def __init__(self, cfg, num_domains: int, world: World, one_pass: bool, history: dict | None = None,
                 cue_bins: torch.Tensor | None = None, class_cue_bins: torch.Tensor | None = None):
        self.sgs: SGSConfig = cfg.sgs
        self.num_domains, self.world, self.one_pass = num_domains, world, one_pass
        self.history = history if history is not None else new_history(cfg.method)
        self.bands_every = cfg.log_every if cfg.method == "dm_sgs" and cfg.sgs.space == "spectral" else 0
        self.cue_bins = cue_bins if self.bands_every else None
        self.class_cue_bins = class_cue_bins if self.cue_bins is not None else None  # [K, H, W // 2 + 1]
        self.ipc = cfg.ipc
        self._pending: list[tuple[int, torch.Tensor]] = []  # (iteration, summed record) not yet read back
        self._pending_bands: list[tuple[int, torch.Tensor]] = []  # (iteration, [2, keys, bands] sums)
        self._pending_truth: list[tuple[int, torch.Tensor]] = []  # (iteration, [2, 3] sums: kept, components)
        self._iteration, self._with_bands = -1, False  # (set by start)
        self._record = self._bands = self._truth = None  # this iteration's sums over its chunks

    def start(self, iteration: int) -> None:
        """Begin the records of ``iteration``."""
        self._iteration = iteration
        self._with_bands = bool(self.bands_every) and (iteration + 1) % self.bands_every == 0
        self._record = self._bands = self._truth = None

    @property
    def needs_parts(self) -> bool:
        """Whether the op must return its parts this iteration (else it takes its fastest path)."""
        return self._with_bands or not self.one_pass

    def add_dm(self, pooled: torch.Tensor) -> None:
        self._record = _added(self._record, pooled.detach().double().view(1))

    def add_surgery(self, pooled: torch.Tensor, losses: torch.Tensor, grads: torch.Tensor, parts,
                    agree_on: torch.Tensor | None = None, classes: range | None = None) -> None:
        """One chunk's records; ``agree_on``: what the agreement test read (None: ``grads``);
        ``classes``: the chunk's classes (its rows hold ``ipc`` images of each, in order)."""
        row = _surgery_record(pooled, losses, parts, self.sgs.space, self.one_pass)
        if self._with_bands:
            args = self.sgs.kernel_args(self.num_domains)
            options = dict(agree_on=agree_on, equalize=args.equalize, combine=args.combine)
            self._bands = _added(self._bands, _band_sums(grads, parts, args, self.one_pass, options))
            if self.cue_bins is not None:
                own = None
                if self.class_cue_bins is not None and classes is not None:
                    own = self.class_cue_bins[list(classes)].repeat_interleave(self.ipc, dim=0)
                self._truth = _added(self._truth, truth_mask_sums(grads, args.tau, args.rho, args.mask, self.cue_bins,
                                                                  own, **options))
        self._record = _added(self._record, row)

    def end(self) -> None:
        """The iteration's sums wait to be read back."""
        self._pending.append((self._iteration, self._record))
        if self._bands is not None:
            self._pending_bands.append((self._iteration, self._bands))
        if self._truth is not None:
            self._pending_truth.append((self._iteration, self._truth))

    def flush(self, bar=None) -> None:
        """Read the pending records back (summed over the processes) into the history; show the
        last loss (and mask fraction) on ``bar``. A non-finite loss stops the run here."""
        if not self._pending:
            return
        world, history = self.world, self.history
        its = [i for i, _ in self._pending]
        rows = world.all_sum(torch.stack([v for _, v in self._pending]).double()).cpu().tolist()  # the one host sync
        self._pending.clear()
        rows = [_record_values(r) for r in rows]
        keys = [k for k in history if k not in ("iteration", "bands", "truth")]
        history["iteration"] += its
        for j, k in enumerate(keys):
            history[k] += [r[j] for r in rows]
        last = dict(zip(keys, rows[-1]))
        if self._pending_bands:
            _append_bands(history, [i for i, _ in self._pending_bands],
                          world.all_sum(torch.stack([b for _, b in self._pending_bands])).cpu())
            self._pending_bands.clear()
        if self._pending_truth:
            args = self.sgs.kernel_args(self.num_domains)
            chance = None if args.combine != "mask" else chance_keep_rate(self.num_domains, args.tau, args.rho, args.mask)
            _append_truth(history, [i for i, _ in self._pending_truth],
                          world.all_sum(torch.stack([t for _, t in self._pending_truth])).cpu(),
                          chance, int(self.cue_bins.sum()))
            self._pending_truth.clear()
        bad = next((i for i, r in zip(its, rows) if not math.isfinite(r[0])), None)
        if bad is not None:
            raise FloatingPointError(f"the DM loss became non-finite at iteration {bad}; "
                                     "lower lr_img or check the data normalisation")
        if bar is not None:
            post = {"loss": f"{last['loss']:.4g}"}
            if "mask_fraction" in last:
                post["mask"] = f"{last['mask_fraction']:.3f}"
            bar.set_postfix(post)  # redraws: once per log_every iterations


def _added(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _surgery_record(pooled, losses, parts, space: str, one_pass: bool) -> torch.Tensor:
    d = parts.diagnostics
    if one_pass:
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


def _band_sums(grads: torch.Tensor, parts, args, one_pass: bool, options: dict) -> torch.Tensor:
    """``[2, len(BAND_KEYS), bands]``: numerators and denominators of this chunk's band
    diagnostics (:mod:`sgs_cuda.dm.bands`), so that chunks and processes add up."""
    values = band_diagnostics(grads, parts.diversity, args.tau, args.rho, args.mask, **options)
    num = torch.stack([values[k] for k in BAND_KEYS])
    if one_pass:
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
    """Append the mask-against-truth fractions of ``iterations`` (``sums``: ``[n, 2, 3]``): the
    share of the cue bins' components the mask kept, of the other bins', of each image's own
    class's cue bins (nan when unknown), and the chance rate."""
    truth = history.setdefault("truth", {"iteration": [], **{g: [] for g in TRUTH_GROUPS}, "chance": chance,
                                         "cue_bins": cue_bins})
    for g in TRUTH_GROUPS:  # a history begun before a group existed (a resumed run): unknown there
        truth.setdefault(g, [float("nan")] * len(truth["iteration"]))
    for it, (kept, total) in zip(iterations, sums.tolist()):
        truth["iteration"].append(it)
        for g, k, n in zip(TRUTH_GROUPS, kept, total):
            truth[g].append(k / n if n else float("nan"))
