"""A distillation's checkpoint: ``checkpoint.pt`` in its run folder, written by rank 0 with the
whole gathered set, and what may change when a run resumes from it.

A checkpoint holds every state of the loop (images, optimizer momentum, iteration, history, the
random streams), so a resumed run ends with the same images as an uninterrupted one, with any
number of processes. It is written atomically (:func:`sgs_cuda._io.save_torch`); a damaged one is
refused in one line naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .. import _io
from ..distributed import World

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


# Settings only some methods read: left out of the others' comparison (and so also absent from
# checkpoints written before they existed).
METHOD_SETTINGS = {"sgs": ("dm_sgs",), "dam_weight": ("dm_dam",), "dam_temperature": ("dm_dam",)}


def relevant_settings(config: dict) -> dict:
    """The settings that shape a run's trajectory: a config dict without the resumable fields and
    without the settings of other methods (:data:`METHOD_SETTINGS`)."""
    method = config.get("method")
    out = {k: v for k, v in config.items()
           if k not in RESUMABLE_CHANGES and method in METHOD_SETTINGS.get(k, (method,))}
    if isinstance(out.get("sgs"), dict):  # options added since the folder was written take their defaults
        from ..options import SGSConfig
        out["sgs"] = SGSConfig.from_dict(out["sgs"]).to_dict()
    return out


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, ``fsync``, then rename (:func:`sgs_cuda._io.save_torch`):
    neither a kill nor a power cut leaves a torn or empty checkpoint."""
    _io.save_torch(obj, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`~sgs_cuda.dm.distill`; a damaged one is one line naming it."""
    hint = "delete it to start this set again from iteration 0, or run without --resume"
    saved = _io.load_torch(path, hint)
    missing = CHECKPOINT_KEYS - set(saved) if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise _io.RunFolderError(f"{path} is not a checkpoint of this package (no {sorted(missing)}); {hint}")
    return saved


def resumable_checkpoint(path: Path | None, cfg, domains, classes) -> dict | None:
    """The checkpoint at ``path`` to resume ``cfg`` from (``None``: there is none), checked
    against this run: its settings, source domains and classes."""
    if path is None or not path.exists():
        return None
    saved = load_checkpoint(path)
    now, then = relevant_settings(cfg.to_dict()), relevant_settings(saved["config"])
    diff = sorted(k for k in set(now) | set(then) if then.get(k) != now.get(k))
    if diff:
        raise ValueError(f"cannot resume: the checkpoint was written with different settings for {diff} "
                         f"(checkpoint: {[then.get(k) for k in diff]}, now: {[now.get(k) for k in diff]})")
    if list(saved["source_domains"]) != list(domains) or list(saved["classes"]) != list(classes):
        raise ValueError(f"cannot resume: checkpoint source domains/classes {saved['source_domains']}/"
                         f"{saved['classes']} differ from {list(domains)}/{list(classes)}")
    if saved["iteration"] > cfg.iterations:
        raise ValueError(f"cannot resume: the checkpoint is at iteration {saved['iteration']}, "
                         f"beyond iterations={cfg.iterations}")
    return saved


def say_resumed(saved: dict, cfg, path: Path, log: Callable[[str], None]) -> None:
    """Where the run continues, and the compute settings when they differ from the checkpoint's."""
    log(f"resuming from iteration {saved['iteration']} of {cfg.iterations} ({path})")
    then = {k: saved["config"].get(k) for k in COMPUTE_SETTINGS}
    now = {k: getattr(cfg, k) for k in COMPUTE_SETTINGS}
    if then != now:
        log(f"the checkpoint was computed with {then}, this run continues with {now}")


def optimizer_rows(state: dict, rows: slice) -> dict:
    """An optimizer state of the whole set cut to this process's image rows."""
    return {**state, "state": {i: {k: v[rows].clone() if torch.is_tensor(v) and v.dim() > 0 else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}


def save_checkpoint(path: Path, world: World, syn: torch.Tensor, opt: torch.optim.Optimizer, **state) -> None:
    """Gather every process's rows of the images and of the optimizer's momentum (a collective:
    every rank calls it) and write them with ``state`` (labels, iteration, history, rng, config,
    source domains, classes) on rank 0."""
    opt_state = opt.state_dict()
    opt_state["state"] = {i: {k: world.gather_rows(v).cpu() if torch.is_tensor(v) and v.dim() > 0 else v
                              for k, v in s.items()} for i, s in opt_state["state"].items()}
    payload = {"images": world.gather_rows(syn.detach()).cpu(), "optimizer": opt_state, **state}
    world.on_main(lambda: save_atomic(payload, path))
