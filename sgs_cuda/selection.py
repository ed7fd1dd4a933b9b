"""Selecting ``lr_img`` without peeking at the target, by one of DomainBed's two rules.

- ``validation="images"`` (training-domain validation): for each learning rate of a grid, distil
  from the training part of the source domains (:func:`~sgs_cuda.data.holdout.hold_out`), train
  evaluation networks on the synthetic set and measure their accuracy on the held-out images of
  the source domains.
- ``validation="domain"`` (leave-one-domain-out): for each source domain in turn, distil from the
  other sources and measure the accuracy on that domain's test split, a domain the set never saw.
  It costs one distillation per source domain, and it does not reward what only the sources share
  with their own held-out images (a source domain's cue): the shift it scores is a real one.

The best mean accuracy wins (ties: the first in the grid). The result is a JSON-able record of
the grid, the scores and the choice, to be stored in the run folder. With ``run_dir`` every
finished grid point (and fold) is saved to ``run_dir/lr_selection.json`` as soon as it is done,
and a rerun with the same settings reuses them (an interrupted selection resumes).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import _io
from .data.holdout import hold_out
from .dm.loop import DistillConfig, distill
from .evaluate import EvalConfig, _seed_for, iter_batches, predict, split_size, train_classifier

DEFAULT_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)
SELECTION_NAME = "lr_selection.json"
VALIDATIONS = ("images", "domain")


def validation_accuracy(images: torch.Tensor, labels: torch.Tensor, view, domains: Sequence[str],
                        cfg: EvalConfig, device="cpu", seed: int = 0) -> list[float]:
    """Accuracy of ``cfg.num_eval`` fresh networks (the first architecture of ``cfg.arch``),
    trained on ``(images, labels)``, on the pooled ``test`` split of ``domains`` of ``view``."""
    domains = list(domains)
    total = split_size(view, domains, "test")
    if total == 0:
        raise ValueError(f"no validation images in {domains}")
    cfg = next(iter(cfg.per_arch().values()))
    accs = []
    for k in range(cfg.num_eval):
        net, _ = train_classifier(images, labels, len(view.classes), cfg, device, seed=_seed_for(seed, k + 1))
        hits = sum(int((predict(net, x, device, cfg.test_batch) == y).sum())
                   for x, y in iter_batches(view, domains, "test", cfg.test_batch))  # streamed: never held whole
        accs.append(hits / total)
    return accs


def select_lr(data, source_domains: Sequence[str], distill_cfg: DistillConfig, eval_cfg: EvalConfig,
              grid: Sequence[float] = DEFAULT_GRID, seeds: Sequence[int] = (0,), fraction: float = 0.2,
              holdout_seed: int = 0, device="cpu", run_dir=None, progress: bool = False,
              log: Callable[[str], None] | None = None, validation: str = "images") -> dict:
    """Pick ``lr_img`` for ``distill_cfg`` (its method, matching and surgery) on the held-out part
    of ``source_domains`` (``validation="images"``) or on each source domain left out in turn
    (``"domain"``; ``fraction`` and ``holdout_seed`` unused); ``distill_cfg.lr_img`` and ``seed``
    are replaced by the grid and ``seeds``.

    Returns ``{"selected_lr_img", "grid", "validation_acc" {lr: mean over seeds, held-out domains
    and nets}, "per_seed" {lr: {seed: [acc per net]}} ("domain": {lr: {seed: {domain: [acc per
    net]}}}), "seeds", "holdout" {...}, "settings" {...}, "seconds"}`` (learning rates as strings
    in the JSON keys). ``log`` receives one line per grid point, seed (and held-out domain).
    """
    grid = [float(lr) for lr in grid]
    if not grid or any(not lr > 0 for lr in grid):
        raise ValueError(f"the lr_img grid needs positive values, got {grid}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"the lr_img grid lists a value twice: {grid}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("select_lr needs at least one seed")
    source_domains = list(source_domains)
    if validation not in VALIDATIONS:
        raise ValueError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
    if validation == "domain" and len(source_domains) < 2:
        raise ValueError(f"leave-one-domain-out validation needs at least 2 source domains, got {source_domains}")
    if validation == "images":
        view = hold_out(data, source_domains, fraction, holdout_seed)
        holdout = {"fraction": fraction, "seed": holdout_seed, "train_images": split_size(view, source_domains, "train"),
                   "validation_images": split_size(view, source_domains, "test")}
        folds = [(None, source_domains, view, source_domains)]  # (held out, distil from, data, validate on)
    else:
        holdout = {"validation": "domain", "validation_images": {d: split_size(data, [d], "test")
                                                                for d in source_domains}}
        folds = [(d, [s for s in source_domains if s != d], data, [d]) for d in source_domains]
    settings = {"source_domains": source_domains, "fraction": fraction, "holdout_seed": holdout_seed,
                "distill": {k: v for k, v in distill_cfg.to_dict().items()
                            if k not in ("lr_img", "seed", "checkpoint_every", "log_every")},
                "eval": eval_cfg.to_dict()}
    if validation != "images":  # (absent for training-domain validation: earlier selections resume)
        settings["validation"] = validation
    path = Path(run_dir) / SELECTION_NAME if run_dir is not None else None
    per_seed = _load_finished(path, settings)
    t0 = time.perf_counter()
    for lr in grid:
        for seed in seeds:
            for held, train, fold_data, validate in folds:
                done = per_seed.get(str(lr), {}).get(str(seed))
                if done is not None and (held is None or held in done):
                    continue
                cfg = dataclasses.replace(distill_cfg, lr_img=lr, seed=seed, checkpoint_every=0)
                result = distill(fold_data, train, cfg, device=device, progress=progress)
                accs = validation_accuracy(result.images, result.labels, fold_data, validate, eval_cfg, device, seed)
                if held is None:
                    per_seed.setdefault(str(lr), {})[str(seed)] = accs
                else:
                    per_seed.setdefault(str(lr), {}).setdefault(str(seed), {})[held] = accs
                if log is not None:
                    on = "" if held is None else f" on {held} (left out)"
                    log(f"lr_img {lr:g} seed {seed}: validation accuracy{on} {100 * _mean(accs):.1f}%")
                if path is not None:
                    _save(path, {"settings": settings, "per_seed_all": per_seed})
    scores = {str(lr): _mean([a for s in seeds for a in _accuracies(per_seed[str(lr)][str(s)])]) for lr in grid}
    best = max(grid, key=lambda lr: (scores[str(lr)], -grid.index(lr)))
    record = {"selected_lr_img": best, "grid": grid, "validation_acc": scores,
              "per_seed": {str(lr): {str(s): per_seed[str(lr)][str(s)] for s in seeds} for lr in grid},
              "seeds": seeds, "holdout": holdout, "settings": settings, "seconds": time.perf_counter() - t0}
    if path is not None:
        _save(path, {**record, "per_seed_all": per_seed})
    return record


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _accuracies(entry: list | dict) -> list[float]:
    """Every network's accuracy of one seed: a list, or per held-out domain (equal counts, so the
    pooled mean is the mean over the domains)."""
    return [a for accs in entry.values() for a in accs] if isinstance(entry, dict) else list(entry)


def _load_finished(path: Path | None, settings: dict) -> dict:
    """Grid points finished by an earlier call with the same settings (``{}`` when none)."""
    if path is None or not path.is_file():
        return {}
    saved = _io.load_json(path, "delete it to select again")
    if saved.get("settings") != json.loads(json.dumps(settings)):
        raise ValueError(f"{path} holds a learning-rate selection with other settings; "
                         "use another run folder or delete it to start again")
    return saved.get("per_seed_all", {})


def _save(path: Path, obj: dict) -> None:
    _io.ensure_dir(path.parent)
    _io.write_json(path, obj)
