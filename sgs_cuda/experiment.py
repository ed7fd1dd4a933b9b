"""The pipeline as a Python API: data, run folders, reuse and resume, distillation and evaluation
(:class:`Experiment`). The configuration is :mod:`sgs_cuda.config`, the comparison of finished run
folders :mod:`sgs_cuda.compare`. ``sgs-dgdd`` (:mod:`sgs_cuda.cli`) only parses arguments and
calls these modules. Evaluation is
leave-one-domain-out for multi-domain sets (the target is one domain, the others are the
sources), and for an ImageNet subset the sets are distilled from ImageNet train and tested on
every OOD set given (ImageNet-Sketch, -R, -A, -V2) and on ImageNet val in one evaluation
(:func:`prepare_data`, :func:`sgs_cuda.evaluate.evaluate_synthetic`).

>>> from sgs_cuda.compare import format_table
>>> from sgs_cuda.config import resolve_config
>>> from sgs_cuda.experiment import Experiment
>>> cfg = resolve_config({"target": "photo", "distill.iterations": 50}, preset="quick")
>>> exp = Experiment(cfg, "runs/photo")          # device, data, run folder, config.json
>>> metrics = exp.run()                           # every method and seed: distil, evaluate, compare
>>> print(format_table(metrics))

What a run folder holds, and the checks that decide what of it is reused, is
:mod:`sgs_cuda.run_folder`: with ``resume=True`` finished sets and evaluations are reused,
interrupted distillations continue from their checkpoint, and derived files (metrics, plots)
that are missing or damaged are rebuilt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import _io
from . import distributed
from .dm.loop import DistillConfig, distill
from .evaluate import EvalConfig, evaluation_metrics, merge_scores, score_networks, target_label
from .compare import _first, summarize
from .config import DISTILLED, distill_config, parse_targets
from .methods import base_method, get_method
from .run_folder import RunFolder, default_run_dir, fingerprint

PHASES = {"extension": "SGS op load/build", "data": "data", "select": "lr selection", "distill": "distillation",
          "evaluate": "evaluation"}

__all__ = ["Experiment", "resolve_device", "prepare_data", "PreparedData", "check_data_kwargs", "data_source",
           "DATA_FLAGS"]


# --- device ---------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available (use --device auto or cpu)")
    return device


# --- data -----------------------------------------------------------------------------------

def load_data(name: str, root=None, **kwargs):
    """The dataset by name or path (tests replace this function with a tiny in-memory one)."""
    from .data import load_dataset  # lazy: the data stack is only needed when running
    return load_dataset(name, root=root, **kwargs)


def _registered(name):
    """The registry entry of a dataset name (``sgs_cuda.data.registry``), or None."""
    from .data.registry import find  # lazy: the data stack is only needed when running

    found = find(name)
    return found[0] if found is not None else None


def _preset_needing_root(name) -> str | None:
    """The dataset's name when it is a registered folder dataset (it needs ``--data-root``)."""
    entry = _registered(name)
    return entry.name if entry is not None and entry.root is not None and entry.kind != "imagenet" else None


# data_kwargs keys that have their own sgs-dgdd flag (named in errors); any other key: --data-option KEY=VALUE
DATA_FLAGS = {"sketch_root": "--sketch-root", "r_root": "--imagenet-r-root", "a_root": "--imagenet-a-root",
              "v2_root": "--imagenet-v2-root", "resolution": "--resolution", "crop": "--crop",
              "num_workers": "--decode-workers", "train_per_class": "--train-per-class"}
NOT_DATA_OPTIONS = {"root", "classes", "preset", "pseudo_domains", "self"}  # set by the pipeline itself


def data_source(name) -> tuple[str, type] | None:
    """``(kind, class)`` of the source that :func:`sgs_cuda.data.load_dataset` builds for ``name``
    (``kind``: the registry's, e.g. ``"imagenet"``, ``"folder"``, ``"fmnist-styles"``, ``"digits"``;
    ``"folder"`` for a path); None when it cannot tell."""
    entry = _registered(name)
    if entry is not None:
        return entry.kind, entry.cls
    if Path(str(name)).expanduser().exists():
        from .data import ImageFolderDomains
        return "folder", ImageFolderDomains
    return None


def _option_name(key: str) -> str:
    return f"{DATA_FLAGS[key]} (data option {key!r})" if key in DATA_FLAGS else f"data option {key!r}"


def check_data_kwargs(dataset, kwargs: Mapping) -> None:
    """Refuse, before anything is loaded, a data option the dataset does not take, naming the
    flag: ``--sketch-root`` with PACS, ``--resolution`` with fmnist-styles, a misspelt
    ``--data-option`` key."""
    source = data_source(dataset)
    if source is None or not kwargs:
        return
    kind, cls = source
    entry = _registered(dataset)
    fixed = entry.fixed if entry is not None else {}
    takes = [k for k in inspect.signature(cls.__init__).parameters if k not in NOT_DATA_OPTIONS and k not in fixed]
    for key in kwargs:
        if key not in takes:
            what = entry.about if entry is not None else "an image-folder dataset"
            raise ValueError(f"{_option_name(key)} does not apply to dataset {str(dataset)!r} ({what}); "
                             f"its data options: {', '.join(takes)}")
    for key in ("sketch_root", "r_root", "a_root", "v2_root"):
        if key in kwargs and kwargs[key] is not None and not Path(str(kwargs[key])).expanduser().is_dir():
            raise FileNotFoundError(f"{_option_name(key)}: {str(kwargs[key])!r} does not exist or is not a directory")


@dataclass
class PreparedData:
    """The data of a run. ``targets``: the unseen domain(s) the sets are tested on (one in
    leave-one-domain-out; ImageNet-Sketch/-R/-A/-V2 for an ImageNet subset); ``sources``: the
    domains the sets are made from. ``distill_data``/``distill_domains`` are what the
    distillation draws from: the sources, or pseudo-domains clustered from them."""
    data: Any
    targets: list[str]
    sources: list[str]
    distill_data: Any
    distill_domains: list[str]

    @property
    def target(self) -> str:
        """The target's name (several: ``a+b+c``), as run folders and metrics give it."""
        return target_label(self.targets)


def _needs_pseudo_domains(cfg: dict, dataset: str, sources: Sequence[str]) -> None:
    if "dm_sgs" in cfg["methods"] and len(sources) < 2 and not cfg["pseudo_domains"]:
        raise ValueError(f"DM+SGS needs at least two source domains, and {dataset} trains on {len(sources)} "
                         f"({', '.join(sources)}): add --pseudo-domains K (K >= 2) to split it into K "
                         "pseudo-domains by image style, or run --method dm only")


def prepare_data(cfg: dict, data=None) -> PreparedData:
    """Load ``cfg["dataset"]`` (or take ``data``), pick the target(s) and the sources.

    A source with ``train_domains`` / ``target_domains`` (an ImageNet subset) is distilled from
    its training domain(s) and tested on every target domain given (``cfg["target"]`` may pick
    some of them); for any other source, ``cfg["target"]`` (default: the first domain) is left
    out and every other domain is a source (leave-one-domain-out). With ``pseudo_domains = k``
    the sources are pooled and re-split into ``k`` pseudo-domains for the distillation, while
    evaluation still uses the real targets and sources. DM+SGS on a single source domain needs
    pseudo-domains: that is said before anything is loaded when the dataset's name tells it.
    """
    wanted = parse_targets(cfg["target"])
    if data is None:
        preset = _preset_needing_root(cfg["dataset"])
        if preset is not None and cfg["data_root"] is None:
            raise ValueError(f"dataset {preset!r} needs its folder: pass --data-root DIR (data_root in a config "
                             f"file), the {_registered(preset).root}")
        kwargs = dict(cfg["data_kwargs"] or {})
        check_data_kwargs(cfg["dataset"], kwargs)
        source = data_source(cfg["dataset"])
        if source is not None and source[0] == "imagenet":
            if cfg["data_root"] is None:
                raise ValueError(f"dataset {cfg['dataset']!r} needs the ImageNet folder: pass --data-root DIR "
                                 "(the folder holding train/<wnid>/ and val/<wnid>/)")
            _needs_pseudo_domains(cfg, str(cfg["dataset"]), ["imagenet"])
        if source is not None and "progress" in inspect.signature(source[1].__init__).parameters:
            kwargs.setdefault("progress", bool(cfg["progress"]))  # the decode progress bar
        data = load_data(cfg["dataset"], cfg["data_root"], **kwargs)
    train_domains = getattr(data, "train_domains", None)
    if train_domains is not None and getattr(data, "target_domains", None) is not None:
        sources, available = list(train_domains), list(data.target_domains)
        if not available:
            raise ValueError(f"dataset {cfg['dataset']} has no out-of-distribution target: give at least one of "
                             "--sketch-root, --imagenet-r-root, --imagenet-a-root, --imagenet-v2-root")
        targets = wanted or available
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ValueError(f"unknown target domain(s) {unknown}; the targets given are {available}")
    else:
        groups = getattr(data, "target_groups", None) or {}  # named target sets: CORe50's "outdoor"
        targets = [t for w in wanted or [] for t in groups.get(w, [w])] or [data.domains[0]]
        unknown = [t for t in targets if t not in data.domains]
        if unknown:
            missing = getattr(data, "missing_domains", None) or {}
            named = f" and the named sets {list(groups)}" if groups else ""
            why = "".join(f"; {t}: {missing[t]}" for t in unknown if t in missing)
            raise ValueError(f"unknown target domain {', '.join(map(repr, unknown))}; "
                             f"the dataset has {list(data.domains)}{named}{why}")
        sources = [d for d in data.domains if d not in targets]
        check_targets = getattr(data, "check_targets", None)  # a source's own rule (DataSource.check_targets)
        if check_targets is not None:
            check_targets(targets)
        if not sources:
            raise ValueError("leave-one-domain-out needs at least two domains")
    _needs_pseudo_domains(cfg, str(cfg["dataset"]), sources)
    if cfg["pseudo_domains"]:
        from .data import PseudoDomainDataset
        pseudo = PseudoDomainDataset(data, int(cfg["pseudo_domains"]), domains=sources,  # cached beside the decodes
                                     cache_dir=(cfg["data_kwargs"] or {}).get("cache_dir"))
        return PreparedData(data, targets, sources, pseudo, list(pseudo.domains))
    return PreparedData(data, targets, sources, data, sources)


# --- training sets --------------------------------------------------------------------------

def training_set_config(method: str, seed: int, cfg: dict) -> dict:
    """What determines a training set, as the run's configuration gives it: the distillation
    config, or a baseline's settings (:meth:`Experiment.resolved_set_config` resolves it)."""
    method = base_method(method)
    if method in DISTILLED:
        return distill_config(cfg, method, seed).to_dict()
    d = cfg["distill"]
    return {"method": method, "seed": seed, "ipc": d["ipc"],
            **({"width": d["width"], "depth": d["depth"], "norm": d["norm"]} if method == "herding" else {})}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 120 else f"{int(t // 60)} min {t % 60:.0f} s"


class Experiment:
    """One leave-one-domain-out experiment: the resolved configuration, its data, the device and
    the run folder.

    Creating it resolves the device, loads and splits the data, creates the run folder (and
    checks it can be written before the data is built), removes temporary files of killed
    writes, and writes ``config.json`` (and ``bad_images.txt``). Then :meth:`produce_set` and
    :meth:`evaluate_set` make and score one training set, and :meth:`run` /
    :meth:`produce_sets` do every method and seed. ``timings`` holds the seconds of each phase
    (``extension``, ``data``, ``distill``, ``evaluate``); ``log`` receives every progress line.

    Args:
        cfg: a configuration from :func:`resolve_config`.
        run_dir: the run folder (default: ``runs/<dataset>-<target>-<preset>``, see
            :func:`default_run_dir`).
        resume: reuse finished sets and evaluations, continue interrupted distillations.
        preset: the preset's name, for the default run folder's name.
        data: a data source to use instead of loading ``cfg["dataset"]``.
        log: where progress lines go (default: stderr).

    Under torchrun (:mod:`sgs_cuda.distributed`) every process creates the Experiment: they
    share each distillation by class and each evaluation by network, rank 0 alone reads and
    writes the run folder and logs, and every rank returns the same results.
    """

    def __init__(self, cfg: dict, run_dir=None, *, resume: bool = False, preset: str | None = None,
                 data=None, log: Callable[[str], None] | None = None):
        self.world, device = distributed.init_from_env(cfg["device"])
        self.cfg, self.resume = cfg, resume
        self.log = (log or _stderr) if self.world.is_main else (lambda msg: None)
        # the selection phase only in runs that select lr_img
        self.timings = {phase: 0.0 for phase in PHASES if phase != "select" or cfg["select"]["lr_grid"]}
        self.backend: dict | None = None  # backend_info() once the op is loaded for a distillation
        self._made: dict[tuple[str, int], dict] = {}  # (method, seed) -> the set this command made
        self._logged_verdicts: set[str] = set()  # self-check verdicts already in the log
        self.selections: dict[str, dict] = {}  # method -> its lr_img selection record (select_lr)
        self._t0 = time.perf_counter()
        self.device = device or resolve_device(cfg["device"])
        if self.world.sharded:
            self.log(f"{self.world.world_size} processes ({self.world.backend}), rank 0 on {self.device}")
        if run_dir is not None:  # before the (maybe long) data build
            self.world.on_main(lambda: _io.check_writable_dir(run_dir))
        with self.phase("data"):  # a node's first process builds the caches the others then read
            prepared = self.world.local_first(lambda: prepare_data(cfg, data))
        self.data, self.targets, self.sources = prepared.data, prepared.targets, prepared.sources
        self.target = prepared.target  # the targets' name (a+b+c for several)
        self.log(f"data ready in {_seconds(self.timings['data'])}: {len(self.data.classes)} classes, "
                 f"target{'s' if len(self.targets) > 1 else ''} {', '.join(self.targets)}, "
                 f"sources {', '.join(self.sources)}{self._missing_note()}")
        self.distill_data, self.distill_domains = prepared.distill_data, prepared.distill_domains
        cfg["target"] = self.targets[0] if len(self.targets) == 1 else list(self.targets)
        self.folder = RunFolder(run_dir if run_dir is not None else self.world.on_main(
            lambda: default_run_dir(cfg, self.target, preset, resume)), self.log)
        self.world.on_main(lambda: self.folder.open(self._config_record(), getattr(self.data, "bad_files", None)))

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def missing_classes(self) -> dict[str, list[str]]:
        """``{target: classes it lacks}`` for the targets lacking some (left out of their score)."""
        missing = getattr(self.data, "missing_classes", None) or {}
        return {t: list(missing[t]) for t in self.targets if missing.get(t)}

    def _missing_note(self) -> str:
        k = len(self.data.classes)
        return "".join(f"; {t} lacks {len(m)} of the {k} classes ({_first(m)}): scored on the others"
                       for t, m in self.missing_classes.items())

    def _config_record(self) -> dict:
        """``config.json``: the configuration and what it resolved to on this data and device."""
        return {**self.cfg, "resolved": {
            "device": str(self.device), "target_domains": self.targets, "missing_classes": self.missing_classes,
            "source_domains": self.sources, "distill_domains": self.distill_domains,
            "classes": list(self.data.classes), "image_shape": list(self.data.image_shape),
            "distill": {k: getattr(self.compute_settings(), k) for k in ("depth", "precision", "channels_last")},
            "processes": self.world.world_size, "torch": torch.__version__}}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the block to ``timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - t0

    def _set_log(self, method: str, seed: int) -> Callable[[str], None]:
        return lambda msg: self.log(f"[{method} seed {seed}] {msg}")

    def load_extension(self) -> dict:
        """Load (building it the first time) the SGS op's extension now, so that the compile is
        neither inside a distillation's progress bar nor in its iteration times."""
        if self.backend is None:
            from . import backend_info
            with self.phase("extension"):
                self.backend = self.world.local_first(lambda: backend_info(self.device))
            self.log(f"SGS op: {self.backend.get('implementation')} ({_seconds(self.timings['extension'])})")
            if "self_check" in self.backend:  # CUDA: the fused paths check themselves on first use
                self.log(f"SGS op self-check: {self.backend['self_check']['mode']}")
        return self.backend

    def backend_record(self) -> dict | None:
        """``backend_info`` as loaded, with the CUDA self-check's verdicts as they are now (they
        come with the first calls), so that a result says which kernel produced it."""
        if self.backend and "self_check" in self.backend:
            from . import selfcheck
            self.backend["self_check"] = selfcheck.report()
            for name, verdict in self.backend["self_check"]["verdicts"].items():
                if name not in self._logged_verdicts:
                    self._logged_verdicts.add(name)
                    self.log(f"SGS op self-check: {name}: {verdict}")
        return self.backend

    # --- lr_img selection ---------------------------------------------------------------------

    def select_lr(self, method: str) -> dict | None:
        """Pick ``lr_img`` for ``method`` on held-out source images (:func:`sgs_cuda.selection.select_lr`)
        when ``select.lr_grid`` is set (None otherwise, and for baselines). The grid, the validation
        accuracies and the choice go to ``<method>/lr_selection.json``; finished grid points are
        reused, so an interrupted selection resumes."""
        sel = self.cfg["select"]
        if not sel["lr_grid"] or method not in DISTILLED:
            return None
        if method in self.selections:
            return self.selections[method]
        if self.world.sharded:
            raise ValueError("--select-lr runs in one process: select with `sgs-dgdd select-lr` (no torchrun), "
                             "then run with --lr-img")
        if self.cfg["pseudo_domains"]:
            raise ValueError("--select-lr holds out images of the real source domains: it does not combine "
                             "with --pseudo-domains")
        from .selection import select_lr

        if method == "dm_sgs":
            self.load_extension()
        log = lambda msg: self.log(f"[{method} lr selection] {msg}")  # noqa: E731
        on = (f"on {100 * sel['fraction']:g}% of the source training images held out" if sel["validation"] == "images"
              else "on each source domain left out in turn")
        log(f"selecting lr_img from {sel['lr_grid']} {on} (seeds {sel['seeds']})")
        with self.phase("select"):
            record = select_lr(self.data, self.sources, distill_config(self.cfg, method, sel["seeds"][0]),
                               EvalConfig.from_dict(self.cfg["eval"]), grid=sel["lr_grid"], seeds=sel["seeds"],
                               fraction=sel["fraction"], holdout_seed=sel["holdout_seed"], device=self.device,
                               run_dir=self.run_dir / method, progress=self.cfg["progress"], log=log,
                               validation=sel["validation"])
        log(f"selected lr_img {record['selected_lr_img']:g} (validation accuracy "
            + ", ".join(f"{lr}: {100 * a:.1f}%" for lr, a in record["validation_acc"].items()) + ")")
        self.selections[method] = record
        return record

    def compute_settings(self, method: str = "dm", seed: int = 0) -> DistillConfig:
        """:func:`distill_config` with its ``"auto"`` settings (depth, precision, layout) resolved
        for this run's data and device: what a set records."""
        return distill_config(self.cfg, method, seed).resolved(self.distill_data.image_shape, self.device)

    def selected_distill_config(self, method: str, seed: int) -> DistillConfig:
        """:meth:`compute_settings`, with ``lr_img`` the selected one when the run selects it: the
        config a distillation runs with."""
        dcfg = self.compute_settings(method, seed)
        record = self.select_lr(method)
        return dcfg if record is None else dataclasses.replace(dcfg, lr_img=float(record["selected_lr_img"]))

    def resolved_set_config(self, method: str, seed: int) -> dict:
        """What determines a training set of this run (:func:`training_set_config`, with the
        selected ``lr_img`` and the network depth resolved): what a set records."""
        if method in DISTILLED:
            return self.selected_distill_config(method, seed).to_dict()
        config = training_set_config(method, seed, self.cfg)
        if "depth" in config:
            config["depth"] = self.compute_settings().depth
        return config

    def select_all(self) -> dict[str, dict]:
        """The selection of every distilled method of the run (the ``select-lr`` command)."""
        if not self.cfg["select"]["lr_grid"]:
            raise ValueError("no lr_img grid to select from: give --select-lr (e.g. 0.5,1,2,4,8)")
        return {m: self.select_lr(m) for m in self.cfg["methods"] if m in DISTILLED}

    # --- one training set -------------------------------------------------------------------

    def load_set(self, method: str, seed: int, hint: str | None = None) -> dict:
        """The finished set ``<method>/seed<k>/synthetic.pt``."""
        if get_method(method).set_of:
            base = get_method(method).set_of
            return {**self.load_set(base, seed, hint), "method": method, "set_of": base}
        payload = self.folder.load_set(method, seed, hint)
        if payload["images"] is None:  # not stored (the whole sources): rebuilt from the data
            payload["images"], payload["labels"] = get_method(method).select(
                self.data, self.sources, seed, self.resolved_set_config(method, seed), self.device)
        return payload

    def produce_set(self, method: str, seed: int, reuse: bool | None = None) -> dict:
        """Distil (or select, for a baseline) one training set, or reuse a finished one (``reuse``,
        default: ``resume``); writes ``synthetic.pt``, ``synthetic.png`` and ``curves.png`` in
        :meth:`RunFolder.set_dir`."""
        if get_method(method).set_of:  # another method's set, evaluated differently
            return self._set_of(method, seed, reuse)
        out, log = self.folder.set_dir(method, seed), self._set_log(method, seed)
        if self.resume if reuse is None else reuse:
            payload = self.world.on_main(lambda: self._finished_set(method, seed))
            if payload is not None:
                return payload
        if method == "dm_sgs":
            self.load_extension()
        data, device, cfg = self.data, self.device, self.cfg
        history, config = {}, self.resolved_set_config(method, seed)
        with self.phase("distill"):
            t0 = time.perf_counter()
            if method in DISTILLED:
                dcfg = self.selected_distill_config(method, seed)
                log(f"distilling {dcfg.ipc} img/class from {self.distill_domains} for {dcfg.iterations} "
                    f"iterations on {device} (lr_img {dcfg.lr_img:g}, {dcfg.matching} matching)")
                result = distill(self.distill_data, self.distill_domains, dcfg, device=device, run_dir=out,
                                 resume=self.resume, progress=cfg["progress"], log=log, world=self.world)
                images, labels, history = result.images, result.labels, result.history
            else:  # real images, chosen as the method's registry entry says
                images, labels = self.world.on_main(
                    lambda: get_method(method).select(data, self.sources, seed, config, device))
            payload = {"images": images, "labels": labels, "classes": list(data.classes), "mean": list(data.mean),
                       "std": list(data.std), "method": method, "seed": seed, "target": self.target,
                       "source_domains": self.sources, "distill_domains": self.distill_domains,
                       "config": config, "history": history, "seconds": time.perf_counter() - t0}
            if method == "dm_sgs":
                payload["sgs_backend"] = self.backend_record()
            self.world.on_main(lambda: self.folder.save_set(payload, get_method(method).store_images))
        self.world.on_main(lambda: self.folder.write_set_plots(payload, force=True))
        log(f"done in {payload['seconds']:.1f} s")
        self._made[method, seed] = payload
        return payload

    def _set_of(self, method: str, seed: int, reuse: bool | None) -> dict:
        """The set that ``method`` evaluates: its base method's, made in this command, or made
        (or reused, as ``reuse`` says) now."""
        base = get_method(method).set_of
        payload = self._made.get((base, seed))
        if payload is None:
            payload = self.produce_set(base, seed, reuse)
        return {**payload, "method": method, "set_of": base}

    def _finished_set(self, method: str, seed: int) -> dict | None:
        """The set of ``method`` and ``seed`` when the run folder holds it finished with these
        settings (its plots rebuilt if missing); ``None`` when it is to be made."""
        syn_path = self.folder.set_path(method, seed)
        if not syn_path.is_file():
            return None
        payload = self.load_set(method, seed, hint="delete it to make it again (a distillation continues "
                                                    "from its checkpoint.pt), or drop --resume")
        if not self.folder.reusable_set(payload, self.resolved_set_config(method, seed), self.sources,
                                        self.distill_domains, baseline=get_method(method).kind == "real"):
            return None
        self._set_log(method, seed)(f"reusing {syn_path}")
        self.folder.write_set_plots(payload)
        return payload

    def evaluate_set(self, payload: dict) -> dict:
        """Train the evaluation networks on a set and test them on the target and the sources
        (reused with ``resume`` when the saved metrics are for this exact set and settings);
        writes ``<method>/seed<k>/metrics.json``."""
        method, seed = payload["method"], payload["seed"]
        log = self._set_log(method, seed)
        digest = fingerprint(payload["images"], payload["labels"])
        ecfg = self.eval_config(method)
        if self.resume:
            saved = self.world.on_main(lambda: self.folder.finished_metrics(method, seed, ecfg, self.targets, digest,
                                                                             log))
            if saved is not None:
                return saved
        if payload.get("source_domains") != self.sources:
            raise ValueError(f"{method} seed {seed} was distilled from {payload.get('source_domains')} "
                             f"(target {payload.get('target')!r}), not from {self.sources} (target {self.target!r})")
        archs = ", ".join(ecfg.per_arch())
        log(f"training {ecfg.num_eval} network(s) of each of {archs} for {ecfg.epochs} epochs, testing on "
            f"{', '.join(self.targets)} and {', '.join(self.sources)} (in-domain)")
        with self.phase("evaluate"):
            metrics = shared_evaluation(lambda cfg, s, nets: score_networks(
                payload["images"], payload["labels"], self.data, self.sources, self.targets, cfg, device=self.device,
                seed=s, nets=nets), ecfg, seed, self.world)
        metrics["distill_seconds"] = payload.get("seconds")
        if method in DISTILLED:
            metrics["lr_img"] = (payload.get("config") or {}).get("lr_img")
        metrics["synthetic_sha1"] = digest  # ties the numbers to the exact set they were measured on
        self.world.on_main(lambda: self.folder.write_metrics(method, seed, metrics))
        per_target = "" if len(self.targets) == 1 else " (" + ", ".join(
            f"{t} {100 * r['ood_acc_mean']:.1f}%" for t, r in metrics["targets"].items()) + ")"
        log(f"OOD {100 * metrics['ood_acc_mean']:.1f}%{per_target}  "
            f"in-domain {100 * metrics['in_domain_acc_mean']:.1f}%  ({metrics['seconds']:.1f} s)")
        return metrics

    def eval_config(self, method: str) -> EvalConfig:
        """The run's evaluation settings with the method's own (:mod:`sgs_cuda.methods`)."""
        return EvalConfig.from_dict({**self.cfg["eval"], **get_method(method).eval_options(self.cfg["eval"])})

    # --- every method and seed --------------------------------------------------------------

    def produce_sets(self) -> list[dict]:
        """Every method and seed's set (the ``distill`` command), then the run's ``curves.png``."""
        payloads = [self.produce_set(method, seed) for seed in self.cfg["seeds"] for method in self.cfg["methods"]]
        self.world.on_main(self.write_curves)
        self.report_timings()
        return payloads

    def run(self, distil: bool = True) -> dict:
        """Every method and seed: make (``distil``; baselines always) or load the set, evaluate
        it, then write and return the comparison (top-level ``metrics.json``)."""
        per_seed: dict[str, dict[int, dict]] = {}
        for seed in self.cfg["seeds"]:
            for method in self.cfg["methods"]:
                if distil or get_method(method).kind == "real":  # evaluate-only: a baseline there is reused
                    payload = self.produce_set(method, seed, reuse=self.resume or not distil)
                else:
                    payload = self.world.on_main(lambda: self.load_set(method, seed))
                per_seed.setdefault(method, {})[seed] = self.evaluate_set(payload)
        self.world.on_main(self.write_curves)
        return self.world.on_main(lambda: self.write_summary(per_seed))

    def write_curves(self) -> None:
        """The run's ``curves.png``: the loss (and surgery diagnostics) of every distilled set."""
        self.folder.write_curves(DISTILLED)

    def write_summary(self, per_seed: dict[str, dict[int, dict]]) -> dict:
        """The comparison of this command's sets, written to the top-level ``metrics.json`` with
        the methods earlier commands evaluated on this folder (:meth:`RunFolder.write_summary`)."""
        cfg = self.cfg
        self.timings["total"] = time.perf_counter() - self._t0
        metrics = {"dataset": str(cfg["dataset"]), "target": self.target, "target_domains": self.targets,
                   "missing_classes": self.missing_classes, "source_domains": self.sources,
                   "ipc": cfg["distill"]["ipc"], "iterations": cfg["distill"]["iterations"],
                   "methods": summarize(per_seed)}
        metrics["sgs_backend"] = self.backend_record()  # (None: the folder's earlier one)
        selections = {m: {**{k: r[k] for k in ("selected_lr_img", "grid", "validation_acc", "seeds")},
                          "validation": r["holdout"].get("validation", "images")}
                      for m, r in self.selections.items() if m in metrics["methods"]}
        if selections:
            metrics["lr_selection"] = selections
        metrics["phase_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        metrics = self.folder.write_summary(metrics, self.target)
        self.report_timings()
        return metrics

    def report_timings(self) -> None:
        """One line (rank 0): the wall time of each phase of this command."""
        total = time.perf_counter() - self._t0
        parts = [f"{PHASES[k]} {_seconds(self.timings[k])}" for k in PHASES if k in self.timings]
        self.log(f"time: {', '.join(parts)}; total {_seconds(total)}")


# --- evaluation networks shared by the processes ---------------------------------------------

def shared_evaluation(score: Callable[[EvalConfig, int, Sequence[int]], dict], ecfg: EvalConfig, seed: int,
                      world: distributed.World) -> dict:
    """The metrics of ``score(ecfg, seed, nets)`` (:func:`~sgs_cuda.evaluate.score_networks` of the
    networks ``nets``), its ``num_eval`` networks shared by ``world``'s processes: each scores a
    consecutive block of them (a network's seed does not depend on which others are trained),
    and rank 0 merges their raw counts (:func:`~sgs_cuda.evaluate.merge_scores`) into the metrics
    one process would compute; every rank returns them."""
    if not world.sharded:
        return evaluation_metrics(score(ecfg, seed, range(ecfg.num_eval)))
    block = world.shard(ecfg.num_eval)
    part = score(ecfg, seed, block) if len(block) else None
    parts = world.gather(part)
    return world.on_main(lambda: evaluation_metrics(merge_scores([p for p in parts if p is not None])))
