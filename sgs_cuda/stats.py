"""Paired statistics of per-seed accuracies, tables and plots built from run folders.

Two methods are *paired* when they ran on the same target with the same seed: the seed fixes
the real batches, embedding nets, augmentations and evaluation nets, so the per-seed difference
removes most of the seed-to-seed spread. For each comparison this module gives the paired
differences, their mean, sample standard deviation, standard error, a Student-t confidence
interval and the count of positive pairs, per target and pooled over targets (all pairs of all
targets as one sample: the seeds of different targets are different runs).

A run folder is what ``sgs-dgdd run`` writes: ``<run>/<method>/seed<k>/metrics.json`` with
``target_domain``, ``ood_acc_mean``, ``in_domain_acc_mean`` (fractions) and ``config``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

METRICS = {"ood_acc_mean": "OOD", "in_domain_acc_mean": "in-domain"}
Accuracies = Mapping[str, Mapping[int, float]]  # target -> seed -> accuracy


def metric_name(key: str) -> str:
    """``"ood_acc_mean"`` -> ``"OOD"``; ``"per_arch.vgg11.ood_acc_mean"`` -> ``"OOD (vgg11)"``."""
    *where, leaf = key.split(".")
    name = METRICS.get(leaf, leaf)
    return f"{name} ({where[-1]})" if where else name


@dataclass(frozen=True)
class PairedSummary:
    """Summary of paired differences ``other - baseline``; nan where ``n`` is too small."""
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1)
    se: float  # sd / sqrt(n)
    ci_low: float
    ci_high: float
    positive: int  # pairs with other > baseline
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 2) -> str:
        """``+0.47 ± 0.20 [+0.03, +0.91]``: mean ± standard error [confidence interval]."""
        if self.n == 0:
            return "no pairs"
        if self.n == 1:
            return f"{self.mean:+.{digits}f} (1 pair)"
        return (f"{self.mean:+.{digits}f} ± {self.se:.{digits}f} "
                f"[{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value (``t_{(1 + confidence) / 2, df}``)."""
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, df))


def summarize_differences(diffs: Sequence[float], confidence: float = 0.95) -> PairedSummary:
    """Mean, sd, standard error, Student-t interval and positive count of paired differences."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = [float(x) for x in diffs]
    n = len(d)
    if any(not math.isfinite(x) for x in d):
        raise ValueError(f"paired differences must be finite, got {d}")
    nan = float("nan")
    if n == 0:
        return PairedSummary(0, nan, nan, nan, nan, nan, 0, confidence)
    mean, sd = mean_sd(d)
    positive = sum(x > 0 for x in d)
    if n == 1:
        return PairedSummary(1, mean, nan, nan, nan, nan, positive, confidence)
    se = sd / math.sqrt(n)
    half = t_quantile(confidence, n - 1) * se
    return PairedSummary(n, mean, sd, se, mean - half, mean + half, positive, confidence)


def paired_differences(baseline: Mapping[int, float], other: Mapping[int, float]) -> dict[int, float]:
    """``other[s] - baseline[s]`` for every seed ``s`` both have (sorted by seed)."""
    return {s: float(other[s]) - float(baseline[s]) for s in sorted(set(baseline) & set(other))}


def compare(baseline: Accuracies, other: Accuracies, confidence: float = 0.95) -> dict:
    """Paired comparison per target and pooled over the targets both have.

    Returns ``{"per_target": {target: {"differences": {seed: d}, "summary": PairedSummary}},
    "pooled": PairedSummary}``.
    """
    per_target = {}
    for target in [t for t in baseline if t in other]:
        diffs = paired_differences(baseline[target], other[target])
        per_target[target] = {"differences": diffs, "summary": summarize_differences(list(diffs.values()), confidence)}
    pooled = [d for row in per_target.values() for d in row["differences"].values()]
    return {"per_target": per_target, "pooled": summarize_differences(pooled, confidence)}


# --- run folders ----------------------------------------------------------------------------

def lookup(metrics: Mapping, key: str):
    """``metrics[key]``, where a dotted key reaches nested values (``per_arch.vgg11.ood_acc_mean``)."""
    value = metrics
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def load_seed_metrics(run_dirs: Iterable, method: str) -> dict[str, dict[int, dict]]:
    """``{target: {seed: metrics}}`` from ``<run>/<method>/seed<k>/metrics.json`` of every run
    folder (a folder per target, or several seeds of one target spread over folders)."""
    out: dict[str, dict[int, dict]] = {}
    where: dict[tuple[str, int], Path] = {}
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist")
        for path in sorted((run / method).glob("seed*/metrics.json")):
            try:
                seed = int(path.parent.name[len("seed"):])
                metrics = json.loads(path.read_text())
                target = metrics["target_domain"]
            except (ValueError, KeyError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: not a per-seed metrics.json of sgs-dgdd ({exc})") from None
            if (target, seed) in where:
                raise ValueError(f"{method} seed {seed} on target {target!r} twice: {where[target, seed]} and {path}")
            where[target, seed] = path
            out.setdefault(target, {})[seed] = metrics
    return out


def accuracies(seed_metrics: Mapping[str, Mapping[int, Mapping]], key: str = "ood_acc_mean",
               scale: float = 100.0) -> dict[str, dict[int, float]]:
    """``{target: {seed: scale * metrics[key]}}`` (percent by default)."""
    return {t: {s: scale * float(lookup(m, key)) for s, m in sorted(seeds.items())} for t, seeds in seed_metrics.items()}


def _format_mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "not run"
    m, sd = mean_sd(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f} ± {sd:.1f}"


def markdown_tables(arms: Mapping[str, tuple[Sequence, str]], baseline: str,
                    keys: Sequence[str] = ("ood_acc_mean", "in_domain_acc_mean"),
                    confidence: float = 0.95) -> str:
    """Two markdown tables comparing every arm with ``baseline`` (one of ``arms``).

    ``arms``: label -> ``(run folders, method)``, e.g. ``{"DM": (["runs/loo/photo", ...], "dm"),
    "DM+SGS": ([...], "dm_sgs")}``. Per target: accuracy mean ± sd over seeds and the paired
    difference to the baseline (mean ± standard error [95% CI], positive pairs / pairs). Pooled
    over targets: the same for all pairs. Accuracies in percent.
    """
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {list(arms)}")
    acc = {label: {key: accuracies(load_seed_metrics(dirs, method), key) for key in keys}
           for label, (dirs, method) in arms.items()}
    names = [metric_name(k) for k in keys]
    base = acc[baseline]
    targets = list(dict.fromkeys(t for a in acc.values() for t in a[keys[0]]))
    head = ["target", "method"] + [c for n in names for c in (f"{n} %", f"Δ {n} vs {baseline}", "pairs > 0")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in targets:
        for label in arms:
            cells = [t, label]
            for key in keys:
                mine = acc[label][key].get(t, {})
                cells.append(_format_mean_sd(list(mine.values())))
                if label == baseline or t not in base[key]:
                    cells += ["", ""]
                    continue
                s = summarize_differences(list(paired_differences(base[key][t], mine).values()), confidence)
                cells += [s.fmt(), f"{s.positive}/{s.n}"]
            lines.append("| " + " | ".join(cells) + " |")
    head = ["method (all targets)", "pairs"] + [c for n in names for c in (f"Δ {n} vs {baseline}", "pairs > 0")]
    pooled = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label in arms:
        if label == baseline:
            continue
        summaries = [compare(base[key], acc[label][key], confidence)["pooled"] for key in keys]
        pooled.append(f"| {label} | {summaries[0].n} | "
                      + " | ".join(f"{s.fmt()} | {s.positive}/{s.n}" for s in summaries) + " |")
    note = (f"Δ: paired difference (same target and seed), mean ± standard error "
            f"[{100 * confidence:.0f}% Student-t interval]; accuracy: mean ± sd over seeds.")
    return "\n".join(lines) + "\n\n" + "\n".join(pooled) + "\n\n" + note


def save_pairs_plot(arms: Mapping[str, Accuracies], path, ylabel: str = "OOD accuracy %") -> Path:
    """One panel per target; each seed is a line through its accuracies under every arm (in
    the order given), so paired differences show as slopes."""
    from matplotlib.figure import Figure

    targets = list(dict.fromkeys(t for a in arms.values() for t in a))
    if not targets:
        raise ValueError("nothing to plot: no accuracies")
    labels = list(arms)
    fig = Figure(figsize=(max(4.0, 1.2 * len(labels)) * min(len(targets), 4) / 1.6, 3.6), dpi=100)
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    for ax, t in zip(axes, targets):
        seeds = sorted({s for a in arms.values() for s in a.get(t, {})})
        for i, s in enumerate(seeds):
            xs = [j for j, lab in enumerate(labels) if s in arms[lab].get(t, {})]
            ys = [arms[labels[j]][t][s] for j in xs]
            ax.plot(xs, ys, marker="o", lw=1, color=f"C{i}", label=f"seed {s}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(t, fontsize=9)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
