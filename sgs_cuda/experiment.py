"""The pipeline as a Python API: configuration, data, run folders, reuse and resume, distillation,
leave-one-domain-out evaluation and the comparison. ``sgs-dgdd`` (:mod:`sgs_cuda.cli`) only
parses arguments and calls this module.

>>> from sgs_cuda.experiment import Experiment, resolve_config
>>> cfg = resolve_config({"target": "photo", "distill.iterations": 50}, preset="quick")
>>> exp = Experiment(cfg, "runs/photo")          # device, data, run folder, config.json
>>> metrics = exp.run()                           # every method and seed: distil, evaluate, compare
>>> print(format_table(metrics))

Configuration: built-in defaults (the paper's) <- ``preset`` (``sgs_cuda/configs/*.yaml``) <-
``config_file`` (YAML or JSON) <- ``overrides`` (``{"section.key": value}``, in order). With
``saved`` (a resumed run folder's ``config.json``) the saved configuration replaces the defaults.

A run folder holds ``config.json`` (the resolved configuration), ``metrics.json`` (the comparison,
with the time of each phase of the last command) and ``curves.png`` (all methods), one folder per
method and seed, ``<method>/seed<k>/``, with ``synthetic.pt`` (images, labels, class names,
mean/std, history), ``synthetic.png``, ``curves.png``, ``metrics.json`` and ``checkpoint.pt``
(with ``checkpoint_every > 0``), and ``bad_images.txt`` when the data source skipped unreadable
images. Every file is written atomically (:mod:`sgs_cuda._io`); with ``resume=True`` finished
sets and evaluations are reused, interrupted distillations continue from their checkpoint, and
derived files (metrics, plots) that are missing or damaged are rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import _io
from ._io import RunFolderError
from .dm.distill import DistillConfig, distill, relevant_settings
from .evaluate import BASELINES, EvalConfig, evaluate_synthetic
from .surgery import SGSConfig

PRESET_DIR = Path(__file__).resolve().parent / "configs"
DISTILLED = ("dm", "dm_sgs")
METHOD_ALIASES = {"both": ["dm", "dm_sgs"], "all": ["random", "herding", "dm", "dm_sgs"]}
ALL_METHODS = (*BASELINES, *DISTILLED)
PHASES = {"extension": "SGS op load/build", "data": "data", "distill": "distillation",
          "evaluate": "evaluation"}
BAD_IMAGES_NAME = "bad_images.txt"

__all__ = ["Experiment", "RunRecord", "RunFolderError", "resolve_config", "default_config", "available_presets",
           "load_config_file", "parse_assignment", "parse_methods", "distill_config", "resolve_device",
           "prepare_data", "PreparedData", "load_run", "load_saved_config", "summarize", "format_table",
           "describe_run", "DISTILLED", "ALL_METHODS", "METHOD_ALIASES"]


# --- configuration --------------------------------------------------------------------------

def default_config() -> dict:
    distill_cfg = DistillConfig().to_dict()
    sgs = distill_cfg.pop("sgs")
    for key in ("method", "seed"):
        distill_cfg.pop(key)
    return {"dataset": "fmnist-styles", "data_root": None, "data_kwargs": {}, "pseudo_domains": None,
            "target": None, "methods": ["dm", "dm_sgs"], "seeds": [0], "device": "auto",
            "progress": True, "distill": distill_cfg, "sgs": sgs, "eval": EvalConfig().to_dict()}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config_file(path) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON file holding a (partial) configuration mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError("reading YAML configs needs PyYAML (pip install pyyaml), or use JSON") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
    return load_config_file(path)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(name: str, default, value) -> None:
    """A leaf option keeps the type of its default (an int is a number too), so that a value of
    the wrong type is refused here, naming the option, instead of deep inside a config class."""
    if default is None or isinstance(default, list):
        return  # free-form (None) or normalised later (methods, seeds)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, (str, os.PathLike))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        return
    if not ok:
        kind = "a mapping" if isinstance(default, dict) else _TYPE_NAMES[type(default)]
        raise ValueError(f"config option {name!r} must be {kind}, got {value!r}")


def merge_config(base: dict, override: Mapping, where: str = "") -> dict:
    """Recursive update of ``base`` by ``override``; unknown keys and values of the wrong type
    are errors that name the option (typos surface)."""
    for key, value in override.items():
        name = f"{where}{key}"
        if key not in base:
            raise ValueError(f"unknown config option {name!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and key != "data_kwargs":
            if not isinstance(value, dict):
                raise ValueError(f"config option {name!r} must be a mapping, got {value!r}")
            merge_config(base[key], value, where=f"{name}.")
        else:
            _check_type(name, base[key], value)
            base[key] = value
    return base


def set_option(cfg: dict, path: str, value) -> None:
    """``cfg[section][key] = value`` for ``path = "section.key"`` (checked like :func:`merge_config`)."""
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ValueError(f"unknown config section {p!r} in {path!r}")
        node = node[p]
    merge_config(node, {leaf: value}, where=".".join(parents) + "." if parents else "")


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``, the value read as YAML
    (``3`` -> int, ``0.5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, else a string)."""
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE (e.g. distill.iterations=100), got {item!r}")
    key, text = item.split("=", 1)
    try:
        import yaml
        value = yaml.safe_load(text)
    except ImportError:
        try:
            value = json.loads(text)
        except ValueError:
            value = text
    except Exception:  # not YAML (e.g. "a: b: c"): take the text as it is
        value = text
    return key.strip(), value


def parse_methods(values: Sequence[str]) -> list[str]:
    methods: list[str] = []
    for v in values:
        for m in str(v).replace(",", " ").split():
            for x in METHOD_ALIASES.get(m, [m]):
                if x not in ALL_METHODS:
                    raise ValueError(f"unknown method {x!r}; choose from {list(ALL_METHODS)} or {list(METHOD_ALIASES)}")
                if x not in methods:
                    methods.append(x)
    if not methods:
        raise ValueError("no method given")
    return methods


def resolve_config(overrides: Mapping[str, Any] | None = None, *, preset: str | None = None,
                   config_file=None, saved: dict | None = None) -> dict:
    """defaults (or ``saved``, a resumed run's config) <- ``preset`` <- ``config_file`` <-
    ``overrides`` (``{"section.key": value}``, applied in order); validated."""
    cfg = default_config()
    if saved is not None:
        merge_config(cfg, {k: v for k, v in saved.items() if k in cfg})
    if preset:
        merge_config(cfg, load_preset(preset))
    if config_file:
        merge_config(cfg, load_config_file(config_file))
    for path, value in (overrides or {}).items():
        set_option(cfg, path, value)
    cfg["methods"] = parse_methods(cfg["methods"] if isinstance(cfg["methods"], list) else [cfg["methods"]])
    seeds = cfg["seeds"] if isinstance(cfg["seeds"], list) else [cfg["seeds"]]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"config option 'seeds' must be integers, got {cfg['seeds']!r}")
    cfg["seeds"] = [int(s) for s in seeds]
    distill_config(cfg, cfg["methods"][0] if cfg["methods"][0] in DISTILLED else "dm", 0)  # validates
    EvalConfig.from_dict(cfg["eval"])
    return cfg


def distill_config(cfg: dict, method: str, seed: int) -> DistillConfig:
    return DistillConfig.from_dict({**cfg["distill"], "method": method, "seed": seed,
                                    "sgs": SGSConfig(**cfg["sgs"])})


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


def _preset_needing_root(name) -> str | None:
    """The preset's name when ``name`` is a dataset preset (they all live in a folder)."""
    try:
        from .data import get_preset
        return get_preset(str(name)).name
    except (ImportError, ValueError):
        return None


class DomainSubset:
    """A view of a protocol dataset restricted to some of its domains (so pseudo-domains are
    found among the source domains only, and the target stays unseen)."""

    def __init__(self, base, domains: Sequence[str]):
        self.base, self.domains = base, list(domains)
        self.classes, self.image_shape, self.mean, self.std = base.classes, base.image_shape, base.mean, base.std

    def _check(self, domains):
        bad = [d for d in domains if d not in self.domains]
        if bad:
            raise ValueError(f"domain(s) {bad} are outside this view {self.domains}")

    def real_batch(self, domain, label, n, generator=None, split="train"):
        self._check([domain])
        return self.base.real_batch(domain, label, n, generator=generator, split=split)

    def split_tensors(self, domains, split="test"):
        self._check(domains)
        return self.base.split_tensors(domains, split)

    def count(self, domain, label, split="train"):
        self._check([domain])
        return self.base.count(domain, label, split)


@dataclass
class PreparedData:
    """The data of a leave-one-domain-out run. ``distill_data``/``distill_domains`` are what the
    distillation draws from: the source domains, or pseudo-domains clustered from them."""
    data: Any
    target: str
    sources: list[str]
    distill_data: Any
    distill_domains: list[str]


def prepare_data(cfg: dict, data=None) -> PreparedData:
    """Load ``cfg["dataset"]`` (or take ``data``), pick the target and the sources; with
    ``pseudo_domains = k`` the sources are pooled and re-split into ``k`` pseudo-domains for the
    distillation, while evaluation still uses the real target and sources."""
    if data is None:
        preset = _preset_needing_root(cfg["dataset"])
        if preset is not None and cfg["data_root"] is None:
            raise ValueError(f"dataset {preset!r} needs its folder: pass --data-root DIR (data_root in a config "
                             f"file), the folder holding {preset}'s domain folders")
        data = load_data(cfg["dataset"], cfg["data_root"], **(cfg["data_kwargs"] or {}))
    target = cfg["target"] or data.domains[0]
    if target not in data.domains:
        raise ValueError(f"unknown target domain {target!r}; the dataset has {list(data.domains)}")
    sources = [d for d in data.domains if d != target]
    if not sources:
        raise ValueError("leave-one-domain-out needs at least two domains")
    if cfg["pseudo_domains"]:
        from .data import PseudoDomainDataset
        pseudo = PseudoDomainDataset(DomainSubset(data, sources), int(cfg["pseudo_domains"]))
        return PreparedData(data, target, sources, pseudo, list(pseudo.domains))
    return PreparedData(data, target, sources, data, sources)


# --- run folders ----------------------------------------------------------------------------

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


def load_saved_config(run_dir, required: bool = False) -> dict | None:
    """A run folder's ``config.json`` (None when absent and not ``required``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"no config.json in {run_dir}: is it a run folder?")
        return None
    return _io.load_json(path, "fix or delete it (then give the run's options again), or use another --run-dir")


def set_config(method: str, seed: int, cfg: dict) -> dict:
    """What determines a training set: the distillation config, or a baseline's settings."""
    if method in DISTILLED:
        return distill_config(cfg, method, seed).to_dict()
    d = cfg["distill"]
    return {"method": method, "seed": seed, "ipc": d["ipc"],
            **({"width": d["width"], "depth": d["depth"], "norm": d["norm"]} if method == "herding" else {})}


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().numpy().tobytes())
    return h.hexdigest()


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
    """

    def __init__(self, cfg: dict, run_dir=None, *, resume: bool = False, preset: str | None = None,
                 data=None, log: Callable[[str], None] | None = None):
        self.cfg, self.resume, self.log = cfg, resume, log or _stderr
        self.timings = {phase: 0.0 for phase in PHASES}
        self.backend: dict | None = None  # backend_info() once the op is loaded for a distillation
        self._t0 = time.perf_counter()
        self.device = resolve_device(cfg["device"])
        if run_dir is not None:
            _io.check_writable_dir(run_dir)  # before the (maybe long) data build
        with self.phase("data"):
            prepared = prepare_data(cfg, data)
        self.data, self.target, self.sources = prepared.data, prepared.target, prepared.sources
        self.log(f"data ready in {_seconds(self.timings['data'])}: {len(self.data.classes)} classes, "
                 f"target {self.target}, sources {', '.join(self.sources)}")
        self.distill_data, self.distill_domains = prepared.distill_data, prepared.distill_domains
        cfg["target"] = self.target
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, self.target, preset, resume)
        self._open_run_dir()

    # --- run folder -------------------------------------------------------------------------

    def _open_run_dir(self) -> None:
        _io.check_writable_dir(self.run_dir)
        created = not self.run_dir.exists()
        _io.ensure_dir(self.run_dir)
        stale = _io.clean_stale_temporaries(self.run_dir)
        if stale:
            self.log(f"removed {len(stale)} temporary file(s) left in {self.run_dir} by interrupted writes")
        try:
            _io.write_json(self.run_dir / "config.json", {**self.cfg, "resolved": {
                "device": str(self.device), "source_domains": self.sources, "distill_domains": self.distill_domains,
                "classes": list(self.data.classes), "image_shape": list(self.data.image_shape),
                "torch": torch.__version__}})
        except RunFolderError:
            if created:  # leave no empty folder behind
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        self.write_bad_images()
        self.log(f"run folder: {self.run_dir}")

    def write_bad_images(self) -> Path | None:
        """``bad_images.txt`` (one ``path<TAB>reason`` per line) when the data source skipped
        unreadable images (its ``bad_files``), and one line with their count."""
        bad = list(getattr(self.data, "bad_files", None) or [])
        if not bad:
            return None
        path = self.run_dir / BAD_IMAGES_NAME
        _io.write_text(path, "".join(f"{file}\t{reason}\n" for file, reason in bad))
        self.log(f"skipped {len(bad)} unreadable image(s): listed in {path}")
        return path

    def set_dir(self, method: str, seed: int) -> Path:
        return self.run_dir / method / f"seed{seed}"

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
                self.backend = backend_info(self.device)
            self.log(f"SGS op: {self.backend.get('implementation')} ({_seconds(self.timings['extension'])})")
        return self.backend

    # --- one training set -------------------------------------------------------------------

    def _reusable(self, payload: dict, method: str, seed: int) -> bool:
        """Whether a finished set can be reused. A distilled set whose settings differ only in
        ``iterations`` (or checkpointing) is continued from its checkpoint instead; any other
        difference is an error, so a resumed folder never mixes settings silently."""
        where = (payload.get("target"), payload.get("source_domains"), payload.get("distill_domains"))
        if where != (self.target, self.sources, self.distill_domains):
            raise ValueError(f"{method} seed {seed} in {self.run_dir} was made for target/sources/distillation "
                             f"domains {where}, not {(self.target, self.sources, self.distill_domains)}")
        wanted, saved = set_config(method, seed, self.cfg), payload.get("config") or {}
        if method in BASELINES:
            return wanted == saved  # cheap to redo when anything differs
        if relevant_settings(wanted) == relevant_settings(saved):
            # other iterations: distill() continues from the checkpoint (or says why it cannot)
            return wanted["iterations"] == saved.get("iterations")
        wanted, saved = relevant_settings(wanted), relevant_settings(saved)
        diff = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
        raise ValueError(f"{method} seed {seed} in {self.run_dir} was distilled with other settings for {diff} "
                         f"({[saved.get(k) for k in diff]} there, {[wanted.get(k) for k in diff]} now): "
                         "use another --run-dir, or drop --resume to start it again")

    def load_set(self, method: str, seed: int, hint: str | None = None) -> dict:
        """The finished set ``<method>/seed<k>/synthetic.pt``."""
        path = self.set_dir(method, seed) / "synthetic.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `sgs-dgdd distill` for {method} first")
        payload = _io.load_torch(path, hint or f"delete it and run `sgs-dgdd distill --resume` for {method} "
                                               "to make it again")
        if not isinstance(payload, dict) or not {"images", "labels", "method", "seed"} <= set(payload):
            raise RunFolderError(f"{path} is not a synthetic set of this package; delete it to make it again")
        return payload

    def produce_set(self, method: str, seed: int, reuse: bool | None = None) -> dict:
        """Distil (or select, for a baseline) one training set, or reuse a finished one (``reuse``,
        default: ``resume``); writes ``synthetic.pt``, ``synthetic.png`` and ``curves.png`` in
        :meth:`set_dir`."""
        out, log = self.set_dir(method, seed), self._set_log(method, seed)
        syn_path = out / "synthetic.pt"
        if (self.resume if reuse is None else reuse) and syn_path.is_file():
            payload = self.load_set(method, seed, hint="delete it to make it again (a distillation continues "
                                                        "from its checkpoint.pt), or drop --resume")
            if self._reusable(payload, method, seed):
                log(f"reusing {syn_path}")
                self.write_set_plots(payload)
                return payload
        if method == "dm_sgs":
            self.load_extension()
        data, device, cfg = self.data, self.device, self.cfg
        history, config = {}, set_config(method, seed, cfg)
        with self.phase("distill"):
            t0 = time.perf_counter()
            if method in DISTILLED:
                dcfg = distill_config(cfg, method, seed)
                log(f"distilling {dcfg.ipc} img/class from {self.distill_domains} for {dcfg.iterations} "
                    f"iterations on {device}")
                result = distill(self.distill_data, self.distill_domains, dcfg, device=device, run_dir=out,
                                 resume=self.resume, progress=cfg["progress"], log=log)
                images, labels, history = result.images, result.labels, result.history
            elif method == "random":
                images, labels = BASELINES["random"](data, self.sources, cfg["distill"]["ipc"], seed)
            else:
                images, labels = BASELINES["herding"](data, self.sources, cfg["distill"]["ipc"], seed,
                                                      width=cfg["distill"]["width"], depth=cfg["distill"]["depth"],
                                                      norm=cfg["distill"]["norm"], device=device)
            payload = {"images": images, "labels": labels, "classes": list(data.classes), "mean": list(data.mean),
                       "std": list(data.std), "method": method, "seed": seed, "target": self.target,
                       "source_domains": self.sources, "distill_domains": self.distill_domains,
                       "config": config, "history": history, "seconds": time.perf_counter() - t0}
            if method == "dm_sgs":
                payload["sgs_backend"] = self.backend
            _io.save_torch(payload, syn_path)
        self.write_set_plots(payload, force=True)
        log(f"done in {payload['seconds']:.1f} s")
        return payload

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

    def evaluate_set(self, payload: dict) -> dict:
        """Train the evaluation networks on a set and test them on the target and the sources
        (reused with ``resume`` when the saved metrics are for this exact set and settings);
        writes ``<method>/seed<k>/metrics.json``."""
        method, seed = payload["method"], payload["seed"]
        log = self._set_log(method, seed)
        path = self.set_dir(method, seed) / "metrics.json"
        digest = fingerprint(payload["images"], payload["labels"])
        ecfg = EvalConfig.from_dict(self.cfg["eval"])
        if self.resume and path.is_file():
            saved = _io.try_load_json(path)
            if saved is None:
                log(f"{path} is damaged: evaluating again")
            elif (saved.get("config") == ecfg.to_dict() and saved.get("target_domain") == self.target
                    and saved.get("synthetic_sha1", digest) == digest):
                log(f"reusing {path}")
                return saved
        if payload["target"] != self.target:
            raise ValueError(f"{method} seed {seed} was distilled for target {payload['target']!r}, "
                             f"not {self.target!r}")
        log(f"training {ecfg.num_eval} ConvNets for {ecfg.epochs} epochs")
        with self.phase("evaluate"):
            metrics = evaluate_synthetic(payload["images"], payload["labels"], self.data, self.sources,
                                         self.target, ecfg, device=self.device, seed=seed)
        metrics["distill_seconds"] = payload.get("seconds")
        metrics["synthetic_sha1"] = digest  # ties the numbers to the exact set they were measured on
        _io.write_json(path, metrics)
        log(f"OOD {100 * metrics['ood_acc_mean']:.1f}%  in-domain {100 * metrics['in_domain_acc_mean']:.1f}%  "
            f"({metrics['seconds']:.1f} s)")
        return metrics

    # --- every method and seed --------------------------------------------------------------

    def produce_sets(self) -> list[dict]:
        """Every method and seed's set (the ``distill`` command), then the run's ``curves.png``."""
        payloads = [self.produce_set(method, seed) for seed in self.cfg["seeds"] for method in self.cfg["methods"]]
        self.write_curves()
        self.report_timings()
        return payloads

    def run(self, distil: bool = True) -> dict:
        """Every method and seed: make (``distil``; baselines always) or load the set, evaluate
        it, then write and return the comparison (top-level ``metrics.json``)."""
        per_seed: dict[str, dict[int, dict]] = {}
        for seed in self.cfg["seeds"]:
            for method in self.cfg["methods"]:
                if distil or method in BASELINES:  # evaluate-only: a baseline there is reused
                    payload = self.produce_set(method, seed, reuse=self.resume or not distil)
                else:
                    payload = self.load_set(method, seed)
                per_seed.setdefault(method, {})[seed] = self.evaluate_set(payload)
        self.write_curves()
        return self.write_summary(per_seed)

    def _histories(self) -> dict:
        out = {}
        for method in DISTILLED:
            for p in sorted((self.run_dir / method).glob("seed*/synthetic.pt")):
                try:
                    payload = _io.load_torch(p, "it is left out of curves.png")
                    h = (payload.get("history") if isinstance(payload, dict) else None) or {}
                except RunFolderError as exc:
                    self.log(str(exc))
                    continue
                if h.get("loss"):
                    out[f"{method} {p.parent.name}"] = h
        return out

    def write_curves(self) -> None:
        """The run's ``curves.png``: the loss (and surgery diagnostics) of every distilled set."""
        histories = self._histories()
        if histories:
            from .dm.plots import save_curves
            save_curves(histories, self.run_dir / "curves.png")

    def write_summary(self, per_seed: dict[str, dict[int, dict]]) -> dict:
        """The comparison in the top-level ``metrics.json``, keeping methods that earlier commands
        evaluated on this folder (a damaged earlier file is rebuilt from this command's)."""
        cfg = self.cfg
        self.timings["total"] = time.perf_counter() - self._t0
        path = self.run_dir / "metrics.json"
        old = None
        if path.exists():
            old = _io.try_load_json(path)
            if old is None:
                self.log(f"{path} was damaged: rebuilt from this command's results")
        metrics = {"dataset": str(cfg["dataset"]), "target": self.target, "source_domains": self.sources,
                   "ipc": cfg["distill"]["ipc"], "iterations": cfg["distill"]["iterations"],
                   "methods": summarize(per_seed)}
        backend = self.backend or (old or {}).get("sgs_backend") or {"implementation": "not used by this command"}
        metrics["sgs_backend"] = backend
        metrics["phase_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        if old is not None and old.get("target") == self.target and isinstance(old.get("methods"), dict):
            metrics["methods"] = {**{k: v for k, v in old["methods"].items() if k not in metrics["methods"]},
                                  **metrics["methods"]}
        _io.write_json(path, metrics)
        self.report_timings()
        return metrics

    def report_timings(self) -> None:
        """One line: the wall time of each phase of this command."""
        total = time.perf_counter() - self._t0
        parts = [f"{PHASES[k]} {_seconds(self.timings[k])}" for k in PHASES]
        self.log(f"time: {', '.join(parts)}; total {_seconds(total)}")


# --- results --------------------------------------------------------------------------------

def summarize(per_seed: dict[str, dict[int, dict]]) -> dict:
    """Pool the per-net accuracies of every seed of a method: mean and sample std."""
    out = {}
    for method, seeds in per_seed.items():
        ood = [a for m in seeds.values() for a in m["ood_acc"]]
        ind = [a for m in seeds.values() for a in m["in_domain_acc"]]
        row = {"seeds": sorted(seeds), "num_nets": len(ood)}
        for key, vals in (("ood_acc", ood), ("in_domain_acc", ind)):
            mean = sum(vals) / len(vals)
            row[f"{key}_mean"] = mean
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            row[f"{key}_std"] = math.sqrt(var)
        row["distill_seconds"] = sum(m.get("distill_seconds") or 0.0 for m in seeds.values())
        row["eval_seconds"] = sum(m.get("seconds") or 0.0 for m in seeds.values())
        row["per_seed"] = {str(s): {"ood_acc_mean": m["ood_acc_mean"], "in_domain_acc_mean": m["in_domain_acc_mean"]}
                           for s, m in seeds.items()}
        out[method] = row
    return out


def format_table(metrics: dict) -> str:
    lines = [f"target (OOD): {metrics['target']}   sources: {', '.join(metrics['source_domains'])}   "
             f"dataset: {metrics['dataset']}",
             f"{'method':<10}{'OOD acc %':>16}{'in-domain acc %':>18}{'nets':>6}{'distil s':>10}{'eval s':>9}"]
    for method, row in metrics["methods"].items():
        lines.append(f"{method:<10}{100 * row['ood_acc_mean']:>9.2f} ± {100 * row['ood_acc_std']:<4.2f}"
                     f"{100 * row['in_domain_acc_mean']:>11.2f} ± {100 * row['in_domain_acc_std']:<4.2f}"
                     f"{row['num_nets']:>6}{row['distill_seconds']:>10.1f}{row['eval_seconds']:>9.1f}")
    lines.append("(mean ± sample std over all evaluation nets of all seeds; per-seed means in metrics.json)")
    return "\n".join(lines)


@dataclass
class RunRecord:
    """What a finished run folder says: its configuration (None if absent) and comparison."""
    run_dir: Path
    config: dict | None
    metrics: dict


_METRICS_KEYS = ("target", "source_domains", "dataset", "methods")


def load_run(run_dir) -> RunRecord:
    """Read a run folder's ``config.json`` and ``metrics.json`` (for ``show`` and comparisons)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {run_dir} (run `sgs-dgdd run` or `evaluate` first)")
    hint = f"rebuild it with `sgs-dgdd evaluate --run-dir {run_dir} --resume`"
    metrics = _io.load_json(path, hint)
    missing = [k for k in _METRICS_KEYS if k not in metrics]
    if missing:
        raise RunFolderError(f"{path} is damaged (no {missing}); {hint}")
    return RunRecord(run_dir, load_saved_config(run_dir), metrics)


def describe_run(record: RunRecord) -> str:
    """The settings line (when the config is there) and the comparison table of a run folder."""
    lines = []
    if record.config is not None:
        try:
            d, s, e = record.config["distill"], record.config["sgs"], record.config["eval"]
            lines.append(f"ipc {d['ipc']}, {d['iterations']} iterations, real batch {d['batch_real']}, "
                         f"width {d['width']}; SGS tau {s['tau']} rho {s['rho']} alpha {s['alpha']} beta {s['beta']} "
                         f"{s['mask']} {s['assignment']}{' spatial' if s.get('space') == 'spatial' else ''}; "
                         f"eval {e['num_eval']} nets x {e['epochs']} epochs")
        except (KeyError, TypeError) as exc:
            raise RunFolderError(f"{record.run_dir / 'config.json'} is damaged (no {exc}); fix or delete it") from exc
    lines.append(format_table(record.metrics))
    return "\n".join(lines)
