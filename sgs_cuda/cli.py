"""``sgs-dgdd``: distil, evaluate and compare DM and DM+SGS under leave-one-domain-out.

    sgs-dgdd run --preset quick                       # DM and DM+SGS on one target, then a table
    sgs-dgdd run --preset paper --target sketch --seeds 0 1 2
    sgs-dgdd distill --config my.yaml --method dm_sgs --alpha 1 --beta 0
    sgs-dgdd evaluate --run-dir runs/X --method random herding dm dm_sgs
    sgs-dgdd show runs/X

Configuration: built-in defaults (the paper's), then ``--preset`` (``sgs_cuda/configs/*.yaml``),
then ``--config FILE`` (YAML or JSON), then the flags; ``--set section.key=value`` reaches any
option. With ``--resume`` the run folder's ``config.json`` is the starting point instead of the
defaults, so ``sgs-dgdd run --resume --run-dir R`` continues R exactly.

A run folder holds ``config.json`` (the resolved configuration), ``metrics.json`` (the
comparison) and ``curves.png`` (all methods), and one folder per method and seed,
``<method>/seed<k>/``, with ``synthetic.pt`` (images, labels, class names, mean/std, history),
``synthetic.png``, ``curves.png``, ``metrics.json`` and ``checkpoint.pt`` (with
``checkpoint_every > 0``: it lets ``--resume`` continue an interrupted run, or extend a finished
one to more iterations).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .dm.distill import DistillConfig, distill, relevant_settings, save_atomic
from .evaluate import BASELINES, EvalConfig, evaluate_synthetic
from .surgery import SGSConfig

PRESET_DIR = Path(__file__).resolve().parent / "configs"
DISTILLED = ("dm", "dm_sgs")
METHOD_ALIASES = {"both": ["dm", "dm_sgs"], "all": ["random", "herding", "dm", "dm_sgs"]}
ALL_METHODS = (*BASELINES, *DISTILLED)


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
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
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


def merge_config(base: dict, override: dict, where: str = "") -> dict:
    """Recursive update of ``base`` by ``override``; unknown keys are an error (typos surface)."""
    for key, value in override.items():
        name = f"{where}{key}"
        if key not in base:
            raise ValueError(f"unknown config option {name!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and key != "data_kwargs":
            if not isinstance(value, dict):
                raise ValueError(f"config option {name!r} must be a mapping, got {value!r}")
            merge_config(base[key], value, where=f"{name}.")
        else:
            base[key] = value
    return base


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


def _parse_value(text: str):
    try:
        import yaml
        return yaml.safe_load(text)
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


# (flag attribute, config path) for the flags that map one-to-one onto an option.
FLAG_PATHS = [
    ("dataset", "dataset"), ("data_root", "data_root"), ("target", "target"), ("device", "device"),
    ("pseudo_domains", "pseudo_domains"),
    ("ipc", "distill.ipc"), ("iterations", "distill.iterations"), ("batch_real", "distill.batch_real"),
    ("lr_img", "distill.lr_img"), ("init", "distill.init"), ("width", "distill.width"),
    ("checkpoint_every", "distill.checkpoint_every"),
    ("tau", "sgs.tau"), ("rho", "sgs.rho"), ("alpha", "sgs.alpha"), ("beta", "sgs.beta"),
    ("mask", "sgs.mask"), ("assignment", "sgs.assignment"), ("space", "sgs.space"),
    ("eval_epochs", "eval.epochs"), ("num_eval", "eval.num_eval"), ("eval_width", "eval.width"),
]


def _set_path(cfg: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ValueError(f"unknown config section {p!r} in {path!r}")
        node = node[p]
    merge_config(node, {leaf: value}, where=".".join(parents) + "." if parents else "")


def resolve_config(args, saved: dict | None = None) -> dict:
    """defaults (or a resumed run's saved config) <- preset <- config file <- flags."""
    cfg = default_config()
    if saved is not None:
        merge_config(cfg, {k: v for k, v in saved.items() if k in cfg})
    if getattr(args, "preset", None):
        merge_config(cfg, load_preset(args.preset))
    if getattr(args, "config", None):
        merge_config(cfg, load_config_file(args.config))
    for attr, path in FLAG_PATHS:
        value = getattr(args, attr, None)
        if value is not None:
            _set_path(cfg, path, value)
    if getattr(args, "method", None):
        cfg["methods"] = args.method
    if getattr(args, "seeds", None):
        cfg["seeds"] = args.seeds
    if getattr(args, "dsa", None) is not None:
        cfg["distill"]["dsa"] = cfg["eval"]["dsa"] = args.dsa
    if getattr(args, "progress", None) is not None:
        cfg["progress"] = args.progress
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. distill.iterations=100), got {item!r}")
        key, value = item.split("=", 1)
        _set_path(cfg, key.strip(), _parse_value(value))
    cfg["methods"] = parse_methods(cfg["methods"] if isinstance(cfg["methods"], list) else [cfg["methods"]])
    seeds = cfg["seeds"] if isinstance(cfg["seeds"], list) else [cfg["seeds"]]
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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available (use --device auto or cpu)")
    return device


# --- data -----------------------------------------------------------------------------------

def load_data(name: str, root=None, **kwargs):
    """The dataset by name or path (tests replace this function with a tiny in-memory one)."""
    from .data import load_dataset  # lazy: the data stack is only needed when running
    return load_dataset(name, root=root, **kwargs)


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


def prepare_data(cfg: dict):
    """``(data, target, source_domains, distill_data, distill_domains)``.

    With ``pseudo_domains = k`` the source domains are pooled and re-split into ``k``
    pseudo-domains for the distillation; evaluation still uses the real target and sources.
    """
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
        return data, target, sources, pseudo, list(pseudo.domains)
    return data, target, sources, data, sources


# --- run folder -----------------------------------------------------------------------------

def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(text)).strip("-") or "run"


def default_run_dir(cfg: dict, target: str, preset: str | None, resume: bool) -> Path:
    """``runs/<dataset>-<target>-<preset>``; a fresh run never reuses a folder (suffix -2, -3 ...),
    ``--resume`` takes the latest one."""
    base = Path("runs") / _slug(f"{Path(str(cfg['dataset'])).name}-{target}-{preset or 'custom'}")
    candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    existing = [p for p in candidates if p.exists()]
    if resume:
        return existing[-1] if existing else base
    return next(p for p in candidates if not p.exists())


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tag(method: str, seed: int) -> Path:
    return Path(method) / f"seed{seed}"


def set_config(method: str, seed: int, cfg: dict) -> dict:
    """What determines a training set: the distillation config, or a baseline's settings."""
    if method in DISTILLED:
        return distill_config(cfg, method, seed).to_dict()
    d = cfg["distill"]
    return {"method": method, "seed": seed, "ipc": d["ipc"],
            **({"width": d["width"], "depth": d["depth"], "norm": d["norm"]} if method == "herding" else {})}


def _reusable(payload: dict, method: str, seed: int, cfg: dict, ctx: dict) -> bool:
    """Whether a finished set can be reused by ``--resume``. A distilled set whose settings differ
    only in ``iterations`` (or checkpointing) is continued from its checkpoint instead; any other
    difference is an error, so a resumed folder never mixes settings silently."""
    where = (payload.get("target"), payload.get("source_domains"), payload.get("distill_domains"))
    if where != (ctx["target"], ctx["sources"], ctx["distill_domains"]):
        raise ValueError(f"{method} seed {seed} in {ctx['run_dir']} was made for target/sources/distillation "
                         f"domains {where}, not {(ctx['target'], ctx['sources'], ctx['distill_domains'])}")
    wanted, saved = set_config(method, seed, cfg), payload.get("config") or {}
    if method in BASELINES:
        return wanted == saved  # cheap to redo when anything differs
    if relevant_settings(wanted) == relevant_settings(saved):
        # other iterations: distill() continues from the checkpoint (or says why it cannot)
        return wanted["iterations"] == saved.get("iterations")
    wanted, saved = relevant_settings(wanted), relevant_settings(saved)
    diff = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
    raise ValueError(f"{method} seed {seed} in {ctx['run_dir']} was distilled with other settings for {diff} "
                     f"({[saved.get(k) for k in diff]} there, {[wanted.get(k) for k in diff]} now): "
                     "use another --run-dir, or drop --resume to start it again")


def produce_set(method: str, seed: int, cfg: dict, ctx: dict, resume: bool) -> dict:
    """Distil (or select, for a baseline) one training set; writes synthetic.pt/png, curves.png."""
    out = ctx["run_dir"] / _tag(method, seed)
    syn_path = out / "synthetic.pt"
    if resume and syn_path.is_file():
        payload = torch.load(syn_path, map_location="cpu", weights_only=False)
        if _reusable(payload, method, seed, cfg, ctx):
            _log(f"[{method} seed {seed}] reusing {syn_path}")
            return payload
    out.mkdir(parents=True, exist_ok=True)
    data, device = ctx["data"], ctx["device"]
    t0 = time.perf_counter()
    history, config = {}, set_config(method, seed, cfg)
    if method in DISTILLED:
        dcfg = distill_config(cfg, method, seed)
        _log(f"[{method} seed {seed}] distilling {dcfg.ipc} img/class from {ctx['distill_domains']} "
             f"for {dcfg.iterations} iterations on {device}")
        result = distill(ctx["distill_data"], ctx["distill_domains"], dcfg, device=device, run_dir=out,
                         resume=resume, progress=cfg["progress"])
        images, labels, history = result.images, result.labels, result.history
    elif method == "random":
        images, labels = BASELINES["random"](data, ctx["sources"], cfg["distill"]["ipc"], seed)
    else:
        images, labels = BASELINES["herding"](data, ctx["sources"], cfg["distill"]["ipc"], seed,
                                              width=cfg["distill"]["width"], depth=cfg["distill"]["depth"],
                                              norm=cfg["distill"]["norm"], device=device)
    payload = {"images": images, "labels": labels, "classes": list(data.classes), "mean": list(data.mean),
               "std": list(data.std), "method": method, "seed": seed, "target": ctx["target"],
               "source_domains": ctx["sources"], "distill_domains": ctx["distill_domains"],
               "config": config, "history": history, "seconds": time.perf_counter() - t0}
    save_atomic(payload, syn_path)
    from .dm.plots import save_curves, save_image_grid
    save_image_grid(images, labels, out / "synthetic.png", data.mean, data.std, data.classes)
    if history.get("loss"):
        save_curves({method: history}, out / "curves.png")
    _log(f"[{method} seed {seed}] done in {payload['seconds']:.1f} s")
    return payload


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().numpy().tobytes())
    return h.hexdigest()


def evaluate_set(payload: dict, cfg: dict, ctx: dict, resume: bool) -> dict:
    method, seed = payload["method"], payload["seed"]
    path = ctx["run_dir"] / _tag(method, seed) / "metrics.json"
    digest = fingerprint(payload["images"], payload["labels"])
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if (saved.get("config") == EvalConfig.from_dict(cfg["eval"]).to_dict() and saved.get("target_domain") == ctx["target"]
                and saved.get("synthetic_sha1", digest) == digest):
            _log(f"[{method} seed {seed}] reusing {path}")
            return saved
    if payload["target"] != ctx["target"]:
        raise ValueError(f"{method} seed {seed} was distilled for target {payload['target']!r}, "
                         f"not {ctx['target']!r}")
    ecfg = EvalConfig.from_dict(cfg["eval"])
    _log(f"[{method} seed {seed}] training {ecfg.num_eval} ConvNets for {ecfg.epochs} epochs")
    metrics = evaluate_synthetic(payload["images"], payload["labels"], ctx["data"], ctx["sources"],
                                 ctx["target"], ecfg, device=ctx["device"], seed=seed)
    metrics["distill_seconds"] = payload.get("seconds")
    metrics["synthetic_sha1"] = digest  # ties the numbers to the exact set they were measured on
    _write_json(path, metrics)
    _log(f"[{method} seed {seed}] OOD {100 * metrics['ood_acc_mean']:.1f}%  in-domain "
         f"{100 * metrics['in_domain_acc_mean']:.1f}%  ({metrics['seconds']:.1f} s)")
    return metrics


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
            row[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
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


# --- commands -------------------------------------------------------------------------------

def _setup(args, need_run_dir_config: bool = False) -> dict:
    run_dir = Path(args.run_dir) if getattr(args, "run_dir", None) else None
    saved = None
    if run_dir is not None and (args.resume or need_run_dir_config) and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
    elif need_run_dir_config:
        raise FileNotFoundError(f"no config.json in {run_dir}: is it a run folder?")
    cfg = resolve_config(args, saved)
    device = resolve_device(cfg["device"])
    data, target, sources, distill_data, distill_domains = prepare_data(cfg)
    if run_dir is None:
        run_dir = default_run_dir(cfg, target, getattr(args, "preset", None), args.resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg["target"] = target
    _write_json(run_dir / "config.json", {**cfg, "resolved": {
        "device": str(device), "source_domains": sources, "distill_domains": distill_domains,
        "classes": list(data.classes), "image_shape": list(data.image_shape), "torch": torch.__version__}})
    _log(f"run folder: {run_dir}")
    return {"cfg": cfg, "device": device, "data": data, "target": target, "sources": sources,
            "distill_data": distill_data, "distill_domains": distill_domains, "run_dir": run_dir}


def _finish(ctx: dict, per_seed: dict) -> dict:
    cfg, run_dir = ctx["cfg"], ctx["run_dir"]
    metrics = {"dataset": str(cfg["dataset"]), "target": ctx["target"], "source_domains": ctx["sources"],
               "ipc": cfg["distill"]["ipc"], "iterations": cfg["distill"]["iterations"],
               "methods": summarize(per_seed)}
    try:
        from . import backend_info
        metrics["sgs_backend"] = backend_info(ctx["device"])
    except Exception as exc:  # provenance only: never fail a finished run over it
        metrics["sgs_backend"] = {"error": str(exc)}
    path = run_dir / "metrics.json"
    if path.is_file():  # keep methods evaluated by earlier commands on this folder
        old = json.loads(path.read_text())
        if old.get("target") == ctx["target"]:
            metrics["methods"] = {**{k: v for k, v in old.get("methods", {}).items() if k not in metrics["methods"]},
                                  **metrics["methods"]}
    _write_json(path, metrics)
    return metrics


def _histories(ctx: dict) -> dict:
    out = {}
    for method in DISTILLED:
        for p in sorted((ctx["run_dir"] / method).glob("seed*/synthetic.pt")):
            h = torch.load(p, map_location="cpu", weights_only=False).get("history") or {}
            if h.get("loss"):
                out[f"{method} {p.parent.name}"] = h
    return out


def cmd_distill(args) -> int:
    ctx = _setup(args)
    cfg = ctx["cfg"]
    for seed in cfg["seeds"]:
        for method in cfg["methods"]:
            produce_set(method, seed, cfg, ctx, args.resume)
    histories = _histories(ctx)
    if histories:
        from .dm.plots import save_curves
        save_curves(histories, ctx["run_dir"] / "curves.png")
    return 0


def _evaluate_all(ctx: dict, resume: bool, distil: bool) -> dict:
    cfg = ctx["cfg"]
    per_seed: dict[str, dict[int, dict]] = {}
    for seed in cfg["seeds"]:
        for method in cfg["methods"]:
            syn_path = ctx["run_dir"] / _tag(method, seed) / "synthetic.pt"
            if distil or method in BASELINES:
                payload = produce_set(method, seed, cfg, ctx, resume or not distil)
            elif syn_path.is_file():
                payload = torch.load(syn_path, map_location="cpu", weights_only=False)
            else:
                raise FileNotFoundError(f"{syn_path} not found: run `sgs-dgdd distill` for {method} first")
            per_seed.setdefault(method, {})[seed] = evaluate_set(payload, cfg, ctx, resume)
    histories = _histories(ctx)
    if histories:
        from .dm.plots import save_curves
        save_curves(histories, ctx["run_dir"] / "curves.png")
    return _finish(ctx, per_seed)


def cmd_run(args) -> int:
    ctx = _setup(args)
    metrics = _evaluate_all(ctx, args.resume, distil=True)
    print(format_table(metrics))
    print(f"run folder: {ctx['run_dir']}")
    return 0


def cmd_evaluate(args) -> int:
    ctx = _setup(args, need_run_dir_config=True)
    metrics = _evaluate_all(ctx, args.resume, distil=False)
    print(format_table(metrics))
    return 0


def cmd_show(args) -> int:
    run_dir = Path(args.run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {run_dir} (run `sgs-dgdd run` or `evaluate` first)")
    metrics = json.loads(path.read_text())
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        d, s, e = cfg["distill"], cfg["sgs"], cfg["eval"]
        print(f"ipc {d['ipc']}, {d['iterations']} iterations, real batch {d['batch_real']}, width {d['width']}; "
              f"SGS tau {s['tau']} rho {s['rho']} alpha {s['alpha']} beta {s['beta']} {s['mask']} "
              f"{s['assignment']}{' spatial' if s.get('space') == 'spatial' else ''}; eval {e['num_eval']} nets x {e['epochs']} epochs")
    print(format_table(metrics))
    return 0


# --- argument parsing -----------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", help=f"named configuration ({', '.join(available_presets())})")
    g.add_argument("--config", help="YAML or JSON config file (overrides the preset)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any option, e.g. --set distill.momentum=0.9 (repeatable; overrides everything)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="dataset name (fmnist-styles, PACS, VLCS, OfficeHome, DomainNet) or folder")
    g.add_argument("--data-root", help="where the dataset lives")
    g.add_argument("--target", help="the unseen target domain (default: the first domain)")
    g.add_argument("--pseudo-domains", type=int, metavar="K",
                   help="distil from K pseudo-domains clustered from the pooled source domains")
    g = p.add_argument_group("distillation")
    g.add_argument("--method", nargs="+", help=f"any of {list(ALL_METHODS)}, 'both' (dm dm_sgs) or 'all'")
    g.add_argument("--seeds", nargs="+", type=int, help="seeds (one run per method and seed)")
    g.add_argument("--ipc", type=int, help="images per class")
    g.add_argument("--iterations", type=int)
    g.add_argument("--batch-real", type=int, help="real images per class and iteration (split over domains)")
    g.add_argument("--lr-img", type=float)
    g.add_argument("--init", choices=["real", "noise"])
    g.add_argument("--width", type=int, help="width of the embedding ConvNet")
    g.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=None,
                   help="differentiable Siamese augmentation (distillation and evaluation)")
    g = p.add_argument_group("spectral gradient surgery")
    g.add_argument("--tau", type=float, help="sign-agreement threshold")
    g.add_argument("--rho", type=float, help="magnitude-agreement threshold (default 0: sign agreement only)")
    g.add_argument("--alpha", type=float, help="weight of the shared spectrum")
    g.add_argument("--beta", type=float, help="weight of the diversity spectrum")
    g.add_argument("--mask", choices=["hard", "soft"])
    g.add_argument("--assignment", choices=["random", "fixed"])
    g.add_argument("--space", choices=["spectral", "spatial"],
                   help="where agreement is measured: per frequency (SGS) or per pixel (ablation)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-epochs", type=int)
    g.add_argument("--num-eval", type=int, help="evaluation networks per synthetic set")
    g.add_argument("--eval-width", type=int, help="width of the evaluation ConvNet")
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="auto (cuda when available), cpu, cuda or cuda:N")
    g.add_argument("--run-dir", help="output folder (default: runs/<dataset>-<target>-<preset>)")
    g.add_argument("--resume", action="store_true", help="continue the run folder's checkpoints and results")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N iterations (0: never)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    parser = argparse.ArgumentParser(
        prog="sgs-dgdd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil, evaluate and compare DM and DM+SGS under leave-one-domain-out.",
        epilog=f"examples:\n{examples}\n\nsee `sgs-dgdd run --help` for every option")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "distil and evaluate, then print the comparison"),
                             ("distill", cmd_distill, "distil synthetic sets only"),
                             ("evaluate", cmd_evaluate, "evaluate the sets of a run folder (and baselines)")):
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
        p.set_defaults(func=func)
    p = sub.add_parser("show", help="print a run folder's metrics")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate" and not args.run_dir:
        build_parser().error("evaluate needs --run-dir (the folder written by `distill` or `run`)")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:  # user errors: no traceback
        print(f"sgs-dgdd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
