"""Leave-one-domain-out study and hyper-parameter sweep of DM vs DM+SGS (the evidence in
``docs/RESULTS.md``). Each cell is one ``sgs-dgdd run`` in its own run folder, resumable: run the
same command again after an interruption and finished cells are reused.

    python benchmarks/dgdd_study.py loo   --preset quick --seeds 0 1 2 --out runs/study-loo
    python benchmarks/dgdd_study.py baselines --preset quick --seeds 0 1 2 --out runs/study-loo
    python benchmarks/dgdd_study.py sweep --preset quick --targets cartoon --seeds 0 --out runs/study-sweep

``loo`` runs DM and DM+SGS for every target domain; ``baselines`` adds random real images and
herding at the same IPC next to them (same ``--out``); ``sweep`` runs DM once and DM+SGS for each
one-at-a-time variation of the defaults (``VARIANTS``). Each prints a markdown table (accuracy
mean ± std over seeds, each seed being the mean over its evaluation networks) and writes
``summary.json`` (``baselines.json``) in ``--out``; ``sweep`` over several targets adds a table
pooled over targets and seeds. ``--report`` runs nothing and tabulates the finished cells.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

from sgs_cuda.options import SGSConfig
from sgs_cuda.stats import mean_sd

# Every DM+SGS cell starts from the spec's initial settings, passed explicitly so that the study
# does not move when the op's defaults do (since the sweep, the op's rho default is 0: the
# "sign only" row).
INITIAL = SGSConfig(tau=1, rho=0.25, alpha=1, beta=0.25).flags()
# name -> CLI flags; each changes one thing from INITIAL ("defaults")
VARIANTS = {
    "defaults": [],
    "shared only (beta=0)": ["--beta", "0"],
    "diversity only (alpha=0)": ["--alpha", "0"],
    "beta=0.5": ["--beta", "0.5"],
    "alpha=0.5": ["--alpha", "0.5"],
    "alpha=2": ["--alpha", "2"],
    "sign only (rho=0)": ["--rho", "0"],
    "rho=0.5": ["--rho", "0.5"],
    "magnitude only (tau=0)": ["--tau", "0"],
    "soft mask": ["--mask", "soft"],
    "fixed assignment": ["--assignment", "fixed"],
    "spatial mask": ["--space", "spatial"],
    "no mask (tau=0, rho=0)": ["--tau", "0", "--rho", "0"],  # every component shared: (1 + alpha) x DM
    # against "no mask": does the surgery add anything to DM with a doubled step?
    "sign only at lr 2 (rho=0, lr_img=2)": ["--rho", "0", "--lr-img", "2"],
}


def run_cell(args, out: Path, target: str, methods, flags) -> None:
    """One ``sgs-dgdd run`` (resumed: finished sets and evaluations are reused); nothing with ``--report``."""
    if args.report:
        return
    cmd = [sys.executable, "-m", "sgs_cuda.cli", "run", "--preset", args.preset, "--target", target,
           "--seeds", *map(str, args.seeds), "--method", *methods, "--run-dir", str(out), "--resume",
           "--no-progress", *flags, *args.extra]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def seed_metrics(run_dir: Path, method: str, seeds) -> dict:
    """Per-seed mean accuracies (over that seed's evaluation networks)."""
    out = {"ood": [], "in": []}
    for s in seeds:
        m = json.loads((run_dir / method / f"seed{s}" / "metrics.json").read_text())
        out["ood"].append(100 * m["ood_acc_mean"])
        out["in"].append(100 * m["in_domain_acc_mean"])
    return out


def finished_metrics(run_dir: Path, method: str, seeds) -> dict | None:
    """:func:`seed_metrics`, or None while some seed has not finished (``--report``)."""
    try:
        return seed_metrics(run_dir, method, seeds)
    except FileNotFoundError:
        return None


def fmt(values) -> str:
    mean, std = mean_sd(values)
    return f"{mean:.1f} ± {std:.1f}"


def paired_delta(a, b) -> str:
    d = [y - x for x, y in zip(a, b)]
    mean, std = mean_sd(d)
    return f"{mean:+.1f} ± {std:.1f}"


def machine() -> str:
    import torch

    return f"{platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def cmd_loo(args) -> None:
    from sgs_cuda.data import load_dataset

    targets = args.targets or list(load_dataset(args.dataset).domains)
    rows, summary = [], {}
    for t in targets:
        cell = Path(args.out) / t
        run_cell(args, cell, t, ["dm", "dm_sgs"], INITIAL)
        dm, sgs = seed_metrics(cell, "dm", args.seeds), seed_metrics(cell, "dm_sgs", args.seeds)
        summary[t] = {"dm": dm, "dm_sgs": sgs}
        rows.append(f"| {t} | {fmt(dm['ood'])} | {fmt(sgs['ood'])} | {paired_delta(dm['ood'], sgs['ood'])} "
                    f"| {fmt(dm['in'])} | {fmt(sgs['in'])} | {paired_delta(dm['in'], sgs['in'])} |")
    header = ["| target (unseen) | DM OOD % | DM+SGS OOD % | Δ OOD | DM in-domain % | DM+SGS in-domain % | Δ in-domain |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    finish(args, header + rows, summary)


def cmd_baselines(args) -> None:
    """Random real images and herding at the same IPC, next to the ``loo`` cells in ``--out``."""
    from sgs_cuda.data import load_dataset

    targets = args.targets or list(load_dataset(args.dataset).domains)
    rows, summary = [], {}
    for t in targets:
        cell = Path(args.out) / "baselines" / t
        run_cell(args, cell, t, ["random", "herding"], [])
        summary[t] = {m: seed_metrics(cell, m, args.seeds) for m in ("random", "herding")}
        loo = Path(args.out) / t
        for m in ("dm", "dm_sgs"):
            if (found := finished_metrics(loo, m, args.seeds)) is not None:
                summary[t][m] = found
        cells = [fmt(summary[t][m][key]) if m in summary[t] else "not run"
                 for key in ("ood", "in") for m in ("random", "herding", "dm", "dm_sgs")]
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    header = ["| target (unseen) | random real OOD % | herding OOD % | DM OOD % | DM+SGS OOD % "
              "| random real in-domain % | herding in-domain % | DM in-domain % | DM+SGS in-domain % |",
              "| --- " * 9 + "|"]
    finish(args, header + rows, summary, name="baselines.json")


def cmd_sweep(args) -> None:
    rows, summary = [], {}
    header = ["| target | variant | OOD % | Δ OOD vs DM | in-domain % | Δ in-domain vs DM |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in args.targets:
        base = Path(args.out) / t / "dm"
        run_cell(args, base, t, ["dm"], [])
        dm = seed_metrics(base, "dm", args.seeds)
        rows.append(f"| {t} | DM (no surgery) | {fmt(dm['ood'])} | | {fmt(dm['in'])} | |")
        summary[t] = {"dm": dm}
        for name in args.variants or list(VARIANTS):
            cell = Path(args.out) / t / name.split(" (")[0].replace(" ", "_").replace("=", "")
            run_cell(args, cell, t, ["dm_sgs"], INITIAL + VARIANTS[name])
            m = finished_metrics(cell, "dm_sgs", args.seeds)
            if m is None:
                rows.append(f"| {t} | {name} | not finished | | | |")
                continue
            summary[t][name] = m
            rows.append(f"| {t} | {name} | {fmt(m['ood'])} | {paired_delta(dm['ood'], m['ood'])} "
                        f"| {fmt(m['in'])} | {paired_delta(dm['in'], m['in'])} |")
    if len(args.targets) > 1:
        rows += ["", pooled_table(summary, args)]
    finish(args, header + rows, summary)


def pooled_table(summary: dict, args) -> str:
    """Each variant's paired differences to DM pooled over every target and seed (only variants
    finished on every target): mean ± standard error, and on how many targets the mean is > 0."""
    lines = ["| variant (all targets) | pairs | Δ OOD vs DM | targets with Δ OOD > 0 | Δ in-domain vs DM |",
             "| --- | --- | --- | --- | --- |"]
    for name in args.variants or list(VARIANTS):
        if not all(name in summary[t] for t in args.targets):
            continue
        cells = [(summary[t]["dm"], summary[t][name]) for t in args.targets]
        cols = []
        for key in ("ood", "in"):
            d = [b - a for dm, m in cells for a, b in zip(dm[key], m[key])]
            mean, std = mean_sd(d)
            cols.append(f"{mean:+.2f} ± {std / math.sqrt(len(d)):.2f}")
        wins = sum(mean_sd([b - a for a, b in zip(dm["ood"], m["ood"])])[0] > 0 for dm, m in cells)
        lines.append(f"| {name} | {len(cells) * len(args.seeds)} | {cols[0]} | {wins} of {len(cells)} | {cols[1]} |")
    return "\n".join(lines)


def finish(args, lines, summary, name: str = "summary.json") -> None:
    table = "\n".join(lines)
    meta = {"command": " ".join(sys.argv), "machine": machine(), "preset": args.preset, "seeds": args.seeds,
            "date": time.strftime("%Y-%m-%d")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps({**meta, "results": summary, "table": table}, indent=1))
    print(f"<!-- {meta['command']} | {meta['machine']} | {meta['date']} -->")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("loo", cmd_loo), ("baselines", cmd_baselines), ("sweep", cmd_sweep)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--preset", default="quick")
        s.add_argument("--dataset", default="fmnist-styles")
        s.add_argument("--targets", nargs="+", required=name == "sweep")
        s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        s.add_argument("--out", required=True)
        s.add_argument("--report", action="store_true", help="run nothing: the table of the finished cells")
        s.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for sgs-dgdd run")
        if name == "sweep":
            s.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
