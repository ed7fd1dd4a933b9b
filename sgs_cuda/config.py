"""Configuration: the built-in defaults, the presets, config files and ``section.key`` overrides,
resolved into one validated configuration mapping (:func:`resolve_config`).

>>> from sgs_cuda.config import resolve_config
>>> cfg = resolve_config({"target": "photo", "distill.iterations": 50}, preset="quick")

Configuration: built-in defaults (the paper's) <- ``preset`` (``sgs_cuda/configs/*.yaml``) <-
``config_file`` (YAML or JSON) <- ``overrides`` (``{"section.key": value}``, in order). With
``saved`` (a resumed run folder's ``config.json``) the saved configuration replaces the defaults.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from . import _io
from .dm.loop import DistillConfig
from .evaluate import EvalConfig
from .methods import ALIASES as METHOD_ALIASES
from .methods import DISTILLED, METHODS
from .options import SGSConfig
from .selection import VALIDATIONS

PRESET_DIR = Path(__file__).resolve().parent / "configs"
ALL_METHODS = tuple(METHODS)


def default_config() -> dict:
    distill_cfg = DistillConfig().to_dict()
    sgs = distill_cfg.pop("sgs")
    for key in ("method", "seed"):
        distill_cfg.pop(key)
    return {"dataset": "fmnist-styles", "data_root": None, "data_kwargs": {}, "pseudo_domains": None,
            "target": None, "methods": ["dm", "dm_sgs"], "seeds": [0], "device": "auto",
            "progress": True, "label": None, "distill": distill_cfg, "sgs": sgs, "eval": EvalConfig().to_dict(),
            "select": dict(SELECT_DEFAULTS)}


# lr_img selection (sgs_cuda.selection): off while lr_grid is empty; per distilled method, pick
# lr_img on `fraction` of the source training images held out (split seed `holdout_seed`;
# validation "images") or on each source domain left out in turn (validation "domain"),
# distilling with `seeds` (keep them apart from the test seeds).
SELECT_DEFAULTS = {"lr_grid": [], "seeds": [10], "fraction": 0.2, "holdout_seed": 0, "validation": "images"}


def check_select(select: dict) -> None:
    """Refuse a malformed ``select`` section with one line naming the option."""
    grid = select["lr_grid"]
    if not isinstance(grid, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                             for v in grid):
        raise ValueError(f"config option 'select.lr_grid' must be a list of positive numbers, got {grid!r}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"config option 'select.lr_grid' lists a value twice: {grid!r}")
    seeds = select["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ValueError(f"config option 'select.seeds' must be a non-empty list of integers, got {seeds!r}")
    if not 0 < float(select["fraction"]) < 1:
        raise ValueError(f"config option 'select.fraction' must lie in (0, 1), got {select['fraction']!r}")
    if select["validation"] not in VALIDATIONS:
        raise ValueError(f"config option 'select.validation' must be 'images' (held-out source images) or "
                         f"'domain' (leave one source domain out), got {select['validation']!r}")


def parse_grid(text) -> list[float]:
    """``"0.5,1,2"`` (or a list) -> ``[0.5, 1.0, 2.0]`` (the ``--select-lr`` grid)."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
    try:
        return [float(v) for v in items]
    except ValueError:
        raise ValueError(f"--select-lr expects comma-separated learning rates (e.g. 0.5,1,2,4,8), got {text!r}") from None


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


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """A preset's mapping; ``extends: other`` in a preset starts from that preset (the named
    ImageNet-subset presets extend ``imagenet-128`` with their dataset)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
    data = load_config_file(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if base in (*_seen, name):
        raise ValueError(f"preset {name!r} extends {base!r}, which extends it again")
    return _deep_update(load_preset(str(base), (*_seen, name)), data)


def _deep_update(base: dict, override: Mapping) -> dict:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
AUTO_OPTIONS = ("distill.depth", "distill.precision", "distill.channels_last", "eval.depth")  # "auto" or a value


def _check_type(name: str, default, value) -> None:
    """A leaf option keeps the type of its default (an int is a number too), so that a value of
    the wrong type is refused here, naming the option, instead of deep inside a config class."""
    if default is None or isinstance(default, list) or name in AUTO_OPTIONS:
        return  # free-form (None), normalised later (methods, seeds), or "auto" or a value (checked later)
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
    if parents == ["data_kwargs"]:  # free-form keyword arguments of the data source (checked when loading)
        if not isinstance(cfg.get("data_kwargs"), dict):
            cfg["data_kwargs"] = {}
        cfg["data_kwargs"][leaf] = value
        return
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
        value = yaml.safe_load(text)
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


def parse_targets(spec) -> list[str] | None:
    """``--target``: one domain, several as ``a,b`` (or ``a+b``, or a list); None: the default."""
    if spec is None:
        return None
    items = spec if isinstance(spec, (list, tuple)) else str(spec).replace("+", ",").split(",")
    if not all(isinstance(t, str) for t in items):
        raise ValueError(f"config option 'target' must be a domain name or a list of them, got {spec!r}")
    targets = [t.strip() for t in items if t.strip()]
    if not targets:
        raise ValueError(f"config option 'target' names no domain: {spec!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"config option 'target' lists a domain twice: {spec!r}")
    return targets


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
    k = cfg["pseudo_domains"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k == 1 or k < 0):
        raise ValueError(f"config option 'pseudo_domains' (--pseudo-domains) must be an integer >= 2 "
                         f"(0: none), got {k!r}")
    cfg["pseudo_domains"] = k or None
    if cfg["data_kwargs"] is None:
        cfg["data_kwargs"] = {}
    parse_targets(cfg["target"])  # validates
    if cfg["label"] is not None and not isinstance(cfg["label"], str):
        raise ValueError(f"config option 'label' must be a string, got {cfg['label']!r}")
    if isinstance(cfg["select"]["seeds"], int) and not isinstance(cfg["select"]["seeds"], bool):
        cfg["select"]["seeds"] = [cfg["select"]["seeds"]]
    check_select(cfg["select"])
    distill_config(cfg, cfg["methods"][0] if cfg["methods"][0] in DISTILLED else "dm", 0)  # validates
    EvalConfig.from_dict(cfg["eval"])
    return cfg


def distill_config(cfg: dict, method: str, seed: int) -> DistillConfig:
    return DistillConfig.from_dict({**cfg["distill"], "method": method, "seed": seed,
                                    "sgs": SGSConfig.from_dict(cfg["sgs"])})


# --- a run folder's saved configuration (resolve_config's ``saved``) ----------------------------

# What this version writes into a run folder (config.json's ``format_version``). A folder of another
# format is not continued or reused, rather than half-read: its options, sets and checkpoints may
# mean something else now. Its finished results can still be shown and compared.
FORMAT_VERSION = 1


def load_saved_config(run_dir, required: bool = False) -> dict | None:
    """A run folder's ``config.json`` (None when absent and not ``required``) to continue or reuse
    the folder: refused when it is of another format (:func:`check_format`)."""
    saved = read_saved_config(run_dir, required)
    if saved is not None:
        check_format(saved, Path(run_dir) / "config.json")
    return saved


def read_saved_config(run_dir, required: bool = False) -> dict | None:
    """A run folder's ``config.json`` as it is, of any format: what showing and comparing finished
    results read (None when absent and not ``required``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"no config.json in {run_dir}: is it a run folder?")
        return None
    return _io.load_json(path, "fix or delete it (then give the run's options again), or use another --run-dir")


def check_format(saved: dict, path: Path) -> None:
    """Refuse, in one line that says how to redo it, a run folder written in another format."""
    found = saved.get("format_version")
    if found == FORMAT_VERSION:
        return
    if isinstance(found, int) and found > FORMAT_VERSION:
        raise _io.RunFolderError(f"{path} is of run-folder format {found}, written by a newer sgs_cuda than this one "
                                 f"(format {FORMAT_VERSION}): use that version")
    raise _io.RunFolderError(f"{path.parent} was written by an older sgs_cuda (run-folder format "
                             f"{found if found is not None else 'unversioned'}; this version reads format "
                             f"{FORMAT_VERSION}): run it again into a new --run-dir with the options its config.json "
                             "lists")
