"""Results: a run's comparison table (:func:`summarize`, :func:`format_table`), reading finished
run folders (:func:`load_run`, :func:`describe_run`) and paired comparisons across them
(``sgs-dgdd compare``: :func:`compare_runs`, :func:`selection_table`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from . import _io
from ._io import RunFolderError
from .config import ALL_METHODS, DISTILLED, read_saved_config
from .methods import METHODS
from .stats import mean_sd
from .options import SGSConfig


# --- results --------------------------------------------------------------------------------

def summarize(per_seed: dict[str, dict[int, dict]]) -> dict:
    """Pool the per-net accuracies of every seed of a method: mean and sample std; with several
    targets, also per target (``targets``: ``{target: {"ood_acc_mean", "ood_acc_std"}}``)."""
    out = {}
    for method, seeds in per_seed.items():
        ood = [a for m in seeds.values() for a in m["ood_acc"]]
        ind = [a for m in seeds.values() for a in m["in_domain_acc"]]
        row = {"seeds": sorted(seeds), "num_nets": len(ood)}
        for key, vals in (("ood_acc", ood), ("in_domain_acc", ind)):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_sd(vals)
        targets = [m.get("targets") or {} for m in seeds.values()]
        names = [t for t in targets[0] if all(t in ts for ts in targets)]
        if len(names) > 1:
            row["targets"] = {t: dict(zip(("ood_acc_mean", "ood_acc_std"),
                                          mean_sd([a for ts in targets for a in ts[t]["ood_acc"]])))
                              for t in names}
        row["distill_seconds"] = sum(m.get("distill_seconds") or 0.0 for m in seeds.values())
        row["eval_seconds"] = sum(m.get("seconds") or 0.0 for m in seeds.values())
        row["per_seed"] = {str(s): {"ood_acc_mean": m["ood_acc_mean"], "in_domain_acc_mean": m["in_domain_acc_mean"]}
                           for s, m in seeds.items()}
        out[method] = row
    return out


def _first(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _short(target: str) -> str:
    """A column title: ``imagenet-sketch`` -> ``sketch``."""
    return target[len("imagenet-"):] if target.startswith("imagenet-") else target


def format_table(metrics: dict) -> str:
    """The comparison of a run folder: one row per method; with several OOD targets a column per
    target, then their mean (each target weighted equally), in-domain and the costs."""
    targets = metrics.get("target_domains") or [metrics["target"]]
    multi = len(targets) > 1 and all("targets" in row for row in metrics["methods"].values())
    where = (f"targets (OOD): {', '.join(targets)}" if len(targets) > 1 else f"target (OOD): {metrics['target']}")
    lines = [f"{where}   sources: {', '.join(metrics['source_domains'])}   dataset: {metrics['dataset']}"]
    cols = [(_short(t), 16) for t in targets] + [("OOD mean %", 16)] if multi else [("OOD acc %", 16)]
    mw = max(10, *(len(m) + 2 for m in metrics["methods"]))
    lines.append(f"{'method':<{mw}}" + "".join(f"{name:>{w}}" for name, w in cols)
                 + f"{'in-domain acc %':>18}{'nets':>6}{'distil s':>10}{'eval s':>9}")

    def cell(mean, std, width=16):
        return f"{100 * mean:>{width - 7}.2f} ± {100 * std:<4.2f}"

    for method, row in metrics["methods"].items():
        per_target = "".join(cell(row["targets"][t]["ood_acc_mean"], row["targets"][t]["ood_acc_std"])
                             for t in targets) if multi else ""
        lines.append(f"{method:<{mw}}{per_target}{cell(row['ood_acc_mean'], row['ood_acc_std'])}"
                     f"{100 * row['in_domain_acc_mean']:>11.2f} ± {100 * row['in_domain_acc_std']:<4.2f}"
                     f"{row['num_nets']:>6}{row['distill_seconds']:>10.1f}{row['eval_seconds']:>9.1f}")
    lines.append("(mean ± sample std over all evaluation nets of all seeds; per-seed means in metrics.json)")
    for t, lacking in (metrics.get("missing_classes") or {}).items():
        lines.append(f"{t} lacks {len(lacking)} class(es) ({_first(lacking)}): scored on the classes it has, "
                     "predictions restricted to them (the ImageNet-R/A protocol)")
    if metrics.get("lr_selection"):
        rule = {r.get("validation", "images") for r in metrics["lr_selection"].values()}
        on = "each source domain left out" if rule == {"domain"} else "held-out source images"
        lines.append(f"lr_img selected on {on}: "
                     + ", ".join(f"{m} {r['selected_lr_img']:g}" for m, r in metrics["lr_selection"].items()))
    return "\n".join(lines)


def format_selection(records: Mapping[str, dict]) -> str:
    """The validation accuracy of every grid point and the choice, one line per method."""
    lines = []
    for method, r in records.items():
        scores = "  ".join(f"{lr}: {100 * a:.1f}%" for lr, a in r["validation_acc"].items())
        on = "left-out domain accuracy" if r.get("holdout", {}).get("validation") == "domain" else "validation accuracy"
        lines.append(f"{method:<8} lr_img {r['selected_lr_img']:g} selected   ({on}  {scores})")
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
    return RunRecord(run_dir, read_saved_config(run_dir), metrics)


def describe_run(record: RunRecord) -> str:
    """The settings line (when the config is there) and the comparison table of a run folder."""
    lines = []
    if record.config is not None:
        try:
            d, s, e = record.config["distill"], record.config["sgs"], record.config["eval"]
            normalize = s.get("normalize", "none")
            lines.append(f"ipc {d['ipc']}, {d['iterations']} iterations, real batch {d['batch_real']}, "
                         f"width {d['width']}, lr_img {d['lr_img']:g}, {d.get('matching', 'dm')} matching; "
                         f"SGS tau {s['tau']} rho {s['rho']} alpha {s['alpha']} beta {s['beta']} "
                         f"{s['mask']} {s['assignment']}{' spatial' if s.get('space') == 'spatial' else ''}"
                         f"{'' if normalize == 'none' else f' normalize {normalize}'}; "
                         f"eval {e['num_eval']} nets x {e['epochs']} epochs ({e.get('arch', 'convnet')})")
            data = [f"{v} px" if k == "resolution" else f"{k} {v}"
                    for k, v in (record.config.get("data_kwargs") or {}).items()
                    if k in ("resolution", "crop", "train_per_class")]
            if record.config.get("pseudo_domains"):
                data.append(f"{record.config['pseudo_domains']} pseudo-domains")
            if data:
                lines[-1] += f"; data: {', '.join(data)}, ConvNet depth {d['depth']}"
        except (KeyError, TypeError) as exc:
            raise RunFolderError(f"{record.run_dir / 'config.json'} is damaged (no {exc}); fix or delete it") from exc
    lines.append(format_table(record.metrics))
    return "\n".join(lines)


# --- comparisons across run folders (sgs-dgdd compare) ----------------------------------------

MATCHING_NAMES = {"dm": "DM", "m3d": "M3D"}


def arm_name(config: Mapping | None, method: str, methods_in_folder: int = 1) -> str:
    """The name of one method of one run folder in a comparison: the folder's ``label`` when it
    has one (followed by the method when the folder holds several), else the method as DM / DM+SGS
    (M3D / M3D+SGS with ``m3d`` matching), with the surgery settings that differ from
    :class:`~sgs_cuda.options.SGSConfig`'s defaults in brackets."""
    config = config or {}
    if METHODS[method].kind == "real":
        name = method
    elif METHODS[method].set_of:  # another method's set, evaluated differently
        name = METHODS[method].label
    else:
        matching = (config.get("distill") or {}).get("matching", "dm")
        name = MATCHING_NAMES.get(matching, matching) + ("+SGS" if method == "dm_sgs" else "")
        if method == "dm_sgs" and isinstance(config.get("sgs"), Mapping):
            defaults = dataclasses.asdict(SGSConfig())
            diffs = [f"{k}={v}" for k, v in config["sgs"].items() if k in defaults and v != defaults[k]]
            if diffs:
                name += f" ({', '.join(diffs)})"
    label = config.get("label")
    if label:
        return label if methods_in_folder == 1 else f"{label}: {name}"
    return name


def _folder_methods(run_dir: Path) -> list[str]:
    return [m for m in ALL_METHODS if any((run_dir / m).glob("seed*/metrics.json"))]


def collect_arms(run_dirs: Sequence) -> dict[str, dict]:
    """``{arm name: {"method": m, "dirs": [run folders]}}`` over every evaluated method of every
    run folder (:func:`arm_name`), in the order met. An arm spans folders (one per target, or
    seeds spread over folders); one name for two different methods is an error."""
    arms: dict[str, dict] = {}
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist")
        config = read_saved_config(run)
        methods = _folder_methods(run)
        for method in methods:
            name = arm_name(config, method, len(methods))
            arm = arms.setdefault(name, {"method": method, "dirs": []})
            if arm["method"] != method:
                raise ValueError(f"the name {name!r} is given to {arm['method']} (in {arm['dirs'][0]}) and to "
                                 f"{method} (in {run}): give the folders different labels (--label)")
            arm["dirs"].append(run)
    if not arms:
        raise FileNotFoundError(f"no evaluated set (<method>/seed<k>/metrics.json) in {[str(r) for r in run_dirs]}")
    return arms


def _common_archs(seed_metrics: Mapping) -> list[str]:
    """The architectures every per-seed metrics of an arm was evaluated on (``per_arch``)."""
    names = None
    for seeds in seed_metrics.values():
        for m in seeds.values():
            have = list((m.get("per_arch") or {}).keys()) or [parse_first_arch(m)]
            names = have if names is None else [n for n in names if n in have]
    return names or []


def _common_targets(seed_metrics: Mapping) -> list[str]:
    """The OOD targets that every per-seed metrics of an arm was tested on, when they were tested
    on several at once (ImageNet subsets); [] for single-target (leave-one-domain-out) runs."""
    names = None
    for seeds in seed_metrics.values():
        for m in seeds.values():
            have = list((m.get("targets") or {}).keys())
            names = have if names is None else [n for n in names if n in have]
    return names if names and len(names) > 1 else []


def parse_first_arch(metrics: Mapping) -> str:
    from .dm.architectures import parse_archs
    return parse_archs((metrics.get("config") or {}).get("arch", "convnet"))[0][0]


def compare_runs(run_dirs: Sequence, baseline: str | None = None, arms: Sequence[str] | None = None,
                 confidence: float = 0.95, plot=None) -> dict:
    """Paired comparison of the arms found in ``run_dirs`` (:func:`collect_arms`) with
    ``baseline`` (default: the arm named ``DM`` if there is one, else the first), per target and
    pooled: accuracy mean ± sd over seeds, paired differences with their standard error, Student-t
    ``confidence`` interval and positive pairs (:mod:`sgs_cuda.stats`), OOD and in-domain, first
    for the first evaluation architecture, then for every further architecture that the baseline
    and some other arm were both evaluated on. ``arms`` picks and orders the arms.

    With several OOD targets per run (ImageNet subsets) the main table's OOD is their mean and
    the ``targets`` section has a column per target (keys ``targets.<target>.ood_acc_mean``).

    Returns ``{"markdown": tables, "sections" {"main", "targets", "arch:<name>", "selection": each table}, "baseline",
    "arms" {name: {"method", "dirs", "accuracy" {key:
    {target: {seed: %}}}, "lr_img" {target: {seed: lr}}}}, "comparisons" {key: {arm: {"per_target"
    {target: {"differences", "summary"}}, "pooled"}}}, "selection": selection_table rows}``; with
    ``plot`` also the per-seed pairs plot of OOD accuracy (PNG).
    """
    from . import stats

    found = collect_arms(run_dirs)
    if arms:
        missing = [a for a in arms if a not in found]
        if missing:
            raise ValueError(f"no arm named {missing} in these folders; found {list(found)}")
        found = {a: found[a] for a in arms}
    baseline = baseline or ("DM" if "DM" in found else next(iter(found)))
    if baseline not in found:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {list(found)}")
    seed_metrics = {name: stats.load_seed_metrics(a["dirs"], a["method"]) for name, a in found.items()}
    archs = {name: _common_archs(sm) for name, sm in seed_metrics.items()}
    targets = {name: _common_targets(sm) for name, sm in seed_metrics.items()}
    keys = list(stats.METRICS)
    out_arms = {}
    for name, a in found.items():
        acc = {k: stats.accuracies(seed_metrics[name], k) for k in keys}
        for t in targets[name]:
            acc[f"targets.{t}.ood_acc_mean"] = stats.accuracies(seed_metrics[name], f"targets.{t}.ood_acc_mean")
        for arch in archs[name]:
            for k in keys:
                with contextlib.suppress(KeyError):
                    acc[f"per_arch.{arch}.{k}"] = stats.accuracies(seed_metrics[name], f"per_arch.{arch}.{k}")
        lrs = {t: {s: m.get("lr_img") for s, m in seeds.items()} for t, seeds in seed_metrics[name].items()}
        out_arms[name] = {"method": a["method"], "dirs": [str(d) for d in a["dirs"]], "accuracy": acc, "lr_img": lrs}
    comparisons = {}
    for key in out_arms[baseline]["accuracy"]:
        for name, arm in out_arms.items():
            if name != baseline and key in arm["accuracy"]:
                c = stats.compare(out_arms[baseline]["accuracy"][key], arm["accuracy"][key], confidence)
                comparisons.setdefault(key, {})[name] = {
                    "per_target": {t: {"differences": r["differences"], "summary": r["summary"].to_dict()}
                                   for t, r in c["per_target"].items()},
                    "pooled": c["pooled"].to_dict()}
    sections = {"main": stats.markdown_tables({n: (found[n]["dirs"], found[n]["method"]) for n in found}, baseline,
                                              confidence=confidence)}
    per_target = [t for t in targets[baseline] if any(t in targets[n] for n in found if n != baseline)]
    if per_target:  # several OOD targets per run: a column per target (the main table has their mean)
        with_all = [n for n in found if all(t in targets[n] for t in per_target)]
        sections["targets"] = "Per OOD target (the main table's OOD is their mean, each weighted equally):\n\n" + \
            stats.markdown_tables({n: (found[n]["dirs"], found[n]["method"]) for n in with_all}, baseline,
                                  keys=[f"targets.{t}.ood_acc_mean" for t in per_target], confidence=confidence)
    first = archs[baseline][0] if archs[baseline] else None
    for arch in archs[baseline]:
        if arch == first:
            continue
        with_arch = [n for n in found if arch in archs[n]]
        if len(with_arch) < 2:
            continue
        sections[f"arch:{arch}"] = f"Evaluated by {arch}:\n\n" + stats.markdown_tables(
            {n: (found[n]["dirs"], found[n]["method"]) for n in with_arch}, baseline,
            keys=[f"per_arch.{arch}.{k}" for k in keys], confidence=confidence)
    selection = selection_table([d for a in found.values() for d in a["dirs"]])
    if selection["rows"]:
        sections["selection"] = selection["markdown"]
    result = {"markdown": "\n\n".join(sections.values()), "sections": sections, "baseline": baseline,
              "arms": out_arms, "comparisons": comparisons, "selection": selection["rows"], "confidence": confidence}
    if plot is not None:
        stats.save_pairs_plot({n: a["accuracy"]["ood_acc_mean"] for n, a in out_arms.items()}, plot)
        result["plot"] = str(plot)
    return result


def write_comparison(result: dict, path) -> Path:
    """:func:`compare_runs`' numbers as JSON (atomically; the markdown included)."""
    path = Path(path)
    _io.ensure_dir(path.parent)
    return _io.write_json(path, result)


def selection_table(run_dirs: Sequence) -> dict:
    """The lr_img selections (``<run>/<method>/lr_selection.json``) of ``run_dirs``: ``{"rows":
    [{"target", "arm", "grid", "validation_acc" {lr: %}, "selected_lr_img", "seeds", "dir"}],
    "markdown": a table}``."""
    from .selection import SELECTION_NAME

    rows = []
    for run in dict.fromkeys(Path(r) for r in run_dirs):
        config = read_saved_config(run) or {}
        methods = [m for m in DISTILLED if (run / m / SELECTION_NAME).is_file()]
        for method in methods:
            path = run / method / SELECTION_NAME
            rec = _io.load_json(path, "delete it to select again")
            if "selected_lr_img" not in rec:
                continue  # an interrupted selection
            rows.append({"target": config.get("target"), "arm": arm_name(config, method, len(_folder_methods(run))),
                         "grid": rec["grid"], "selected_lr_img": rec["selected_lr_img"], "seeds": rec["seeds"],
                         "validation_acc": {lr: 100 * a for lr, a in rec["validation_acc"].items()}, "dir": str(run)})
    grid = list(dict.fromkeys(str(lr) for r in rows for lr in r["validation_acc"]))
    head = ["target", "method"] + [f"lr {float(lr):g}" for lr in grid] + ["selected lr_img"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        best = str(float(r["selected_lr_img"]))
        cells = [f"**{r['validation_acc'][lr]:.1f}**" if lr == best else
                 (f"{r['validation_acc'][lr]:.1f}" if lr in r["validation_acc"] else "") for lr in grid]
        lines.append("| " + " | ".join([str(r["target"]), r["arm"], *cells, f"{r['selected_lr_img']:g}"]) + " |")
    note = "Validation accuracy % (held-out source training images) of each lr_img of the grid; bold: selected."
    return {"rows": rows, "markdown": "\n".join(lines) + "\n\n" + note if rows else ""}
