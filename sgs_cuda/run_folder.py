"""A run folder: where :class:`~sgs_cuda.experiment.Experiment` keeps everything it makes.

``<run>/config.json`` (the resolved configuration, its ``format_version`` and what the data
resolved to), ``metrics.json`` (the comparison of the methods) and ``curves.png`` (every
distilled set's loss); per method and seed ``<run>/<method>/seed<k>/`` with ``synthetic.pt``
(images, labels, class names, mean/std, history), ``synthetic.png``, ``curves.png``,
``metrics.json`` and ``checkpoint.pt`` (:mod:`sgs_cuda.dm.checkpoint`); ``bad_images.txt`` when
the data source skipped unreadable images. Every file is written atomically
(:mod:`sgs_cuda._io`); derived files (metrics, plots) that are missing or damaged are rebuilt.

:class:`RunFolder` owns the paths, the sets in and out, the checks that decide whether a
finished set or evaluation can be reused, the metrics files and the plots. It runs on rank 0.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable

import torch

from . import _io
from ._io import RunFolderError
from .config import FORMAT_VERSION, check_format
from .dm.checkpoint import relevant_settings
from .evaluate import EvalConfig, same_eval_config

BAD_IMAGES_NAME = "bad_images.txt"
SET_NAME = "synthetic.pt"
METRICS_NAME = "metrics.json"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(text)).strip("-") or "run"


def default_run_dir(cfg: dict, target: str, preset: str | None, resume: bool) -> Path:
    """``runs/<dataset>-<target>-<preset>``; a fresh run never reuses a folder (suffix -2, -3 ...),
    ``resume`` takes the latest one."""
    base = Path("runs") / _slug(f"{Path(str(cfg['dataset'])).name}-{target}-{preset or 'custom'}")
    candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    existing = [p for p in candidates if p.exists()]
    if resume:
        return existing[-1] if existing else base
    return next(p for p in candidates if not p.exists())


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().numpy().tobytes())
    return h.hexdigest()


class RunFolder:
    """The run folder at ``path``; ``log`` receives its one-line messages."""

    def __init__(self, path, log: Callable[[str], None]):
        self.path, self.log = Path(path), log

    def set_dir(self, method: str, seed: int) -> Path:
        return self.path / method / f"seed{seed}"

    # --- opening ----------------------------------------------------------------------------

    def open(self, config: dict, bad_files=()) -> None:
        """Create the folder (refusing one of another format), remove temporary files of killed
        writes, and write ``config.json`` (``config`` with the format version) and
        ``bad_images.txt``."""
        _io.check_writable_dir(self.path)
        if (self.path / "config.json").is_file():  # (a damaged one is rewritten)
            existing = _io.try_load_json(self.path / "config.json")
            if existing is not None:
                check_format(existing, self.path / "config.json")
        created = not self.path.exists()
        _io.ensure_dir(self.path)
        stale = _io.clean_stale_temporaries(self.path)
        if stale:
            self.log(f"removed {len(stale)} temporary file(s) left in {self.path} by interrupted writes")
        try:
            _io.write_json(self.path / "config.json", {"format_version": FORMAT_VERSION, **config})
        except RunFolderError:
            if created:  # leave no empty folder behind
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        self.write_bad_images(bad_files)
        self.log(f"run folder: {self.path}")

    def write_bad_images(self, bad_files) -> Path | None:
        """``bad_images.txt`` (one ``path<TAB>reason`` per line) when the data source skipped
        unreadable images, and one line with their count."""
        bad = list(bad_files or [])
        if not bad:
            return None
        path = self.path / BAD_IMAGES_NAME
        _io.write_text(path, "".join(f"{file}\t{reason}\n" for file, reason in bad))
        self.log(f"skipped {len(bad)} unreadable image(s): listed in {path}")
        return path

    # --- sets -------------------------------------------------------------------------------

    def set_path(self, method: str, seed: int) -> Path:
        return self.set_dir(method, seed) / SET_NAME

    def load_set(self, method: str, seed: int, hint: str | None = None) -> dict:
        """The finished set ``<method>/seed<k>/synthetic.pt`` as saved (``images`` None when
        they were not stored)."""
        path = self.set_path(method, seed)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `sgs-dgdd distill` for {method} first")
        payload = _io.load_torch(path, hint or f"delete it and run `sgs-dgdd distill --resume` for {method} "
                                               "to make it again")
        if not isinstance(payload, dict) or not {"images", "labels", "method", "seed"} <= set(payload):
            raise RunFolderError(f"{path} is not a synthetic set of this package; delete it to make it again")
        return payload

    def save_set(self, payload: dict, store_images: bool = True) -> None:
        stored = payload if store_images else {**payload, "images": None, "labels": None}
        _io.save_torch(stored, self.set_path(payload["method"], payload["seed"]))

    def reusable_set(self, payload: dict, wanted: dict, sources: list, distill_domains: list,
                     baseline: bool) -> bool:
        """Whether a finished set can be reused for a set configured as ``wanted``. A distilled set
        whose settings differ only in ``iterations`` (or checkpointing) is continued from its
        checkpoint instead; any other difference is an error, so a resumed folder never mixes
        settings silently."""
        method, seed = payload["method"], payload["seed"]
        # a set depends on its sources (in leave-one-domain-out they fix the target), not on the
        # OOD targets it is tested on: an ImageNet set is reused when a target is added
        where = (payload.get("source_domains"), payload.get("distill_domains"))
        if where != (sources, distill_domains):
            raise ValueError(f"{method} seed {seed} in {self.path} was made from sources/distillation domains "
                             f"{where} (target {payload.get('target')}), not {(sources, distill_domains)}")
        saved = payload.get("config") or {}
        if baseline:
            return wanted == saved  # cheap to redo when anything differs
        if relevant_settings(wanted) == relevant_settings(saved):
            # other iterations: distill() continues from the checkpoint (or says why it cannot)
            return wanted["iterations"] == saved.get("iterations")
        wanted, saved = relevant_settings(wanted), relevant_settings(saved)
        diff = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
        raise ValueError(f"{method} seed {seed} in {self.path} was distilled with other settings for {diff} "
                         f"({[saved.get(k) for k in diff]} there, {[wanted.get(k) for k in diff]} now): "
                         "use another --run-dir, or drop --resume to start it again")

    # --- evaluations ------------------------------------------------------------------------

    def metrics_path(self, method: str, seed: int) -> Path:
        return self.set_dir(method, seed) / METRICS_NAME

    def finished_metrics(self, method: str, seed: int, ecfg: EvalConfig, targets: list, digest: str,
                         log: Callable[[str], None]) -> dict | None:
        """The saved evaluation of a set when it is of this exact set (``digest``), settings and
        targets; ``None`` when it is to be made (a damaged one is said and redone)."""
        path = self.metrics_path(method, seed)
        if not path.is_file():
            return None
        saved = _io.try_load_json(path)
        if saved is None:
            log(f"{path} is damaged: evaluating again")
        elif (same_eval_config(saved.get("config"), ecfg)
              and saved.get("target_domains") == targets and saved.get("synthetic_sha1") == digest):
            log(f"reusing {path}")
            return saved
        return None

    def write_metrics(self, method: str, seed: int, metrics: dict) -> None:
        _io.write_json(self.metrics_path(method, seed), metrics)

    def write_summary(self, metrics: dict, target: str) -> dict:
        """The comparison in the top-level ``metrics.json``, keeping methods that earlier commands
        evaluated on this folder (a damaged earlier file is rebuilt from this command's), and
        the earlier file's ``sgs_backend`` when ``metrics`` has none."""
        path = self.path / METRICS_NAME
        old = None
        if path.exists():
            old = _io.try_load_json(path)
            if old is None:
                self.log(f"{path} was damaged: rebuilt from this command's results")
        if metrics.get("sgs_backend") is None:
            metrics["sgs_backend"] = (old or {}).get("sgs_backend") or {"implementation": "not used by this command"}
        if old is not None and old.get("target") == target and isinstance(old.get("methods"), dict):
            metrics["methods"] = {**{k: v for k, v in old["methods"].items() if k not in metrics["methods"]},
                                  **metrics["methods"]}
        _io.write_json(path, metrics)
        return metrics

    # --- plots ------------------------------------------------------------------------------

    def write_set_plots(self, payload: dict, force: bool = False) -> None:
        """``synthetic.png`` and ``curves.png`` of a set: always with ``force``, else only when
        missing or damaged (a run killed after ``synthetic.pt`` was written)."""
        from .dm.plots import save_curves, save_image_grid

        out = self.set_dir(payload["method"], payload["seed"])
        if force or not _io.is_complete_png(out / "synthetic.png"):
            save_image_grid(payload["images"], payload["labels"], out / "synthetic.png", payload["mean"],
                            payload["std"], payload["classes"])
        history = payload.get("history") or {}
        if history.get("loss") and (force or not _io.is_complete_png(out / "curves.png")):
            save_curves({payload["method"]: history}, out / "curves.png")

    def write_curves(self, methods) -> None:
        """The run's ``curves.png``: the loss (and surgery diagnostics) of every set of ``methods``."""
        histories = self._histories(methods)
        if histories:
            from .dm.plots import save_curves
            save_curves(histories, self.path / "curves.png")

    def _histories(self, methods) -> dict:
        out = {}
        for method in methods:
            for p in sorted((self.path / method).glob(f"seed*/{SET_NAME}")):
                try:
                    payload = _io.load_torch(p, "it is left out of curves.png")
                    h = (payload.get("history") if isinstance(payload, dict) else None) or {}
                except RunFolderError as exc:
                    self.log(str(exc))
                    continue
                if h.get("loss"):
                    out[f"{method} {p.parent.name}"] = h
        return out
