"""The tuned study: DM+SGS against a DM with a tuned step, at a matched step, on M3D and across
evaluation architectures, at the ``medium`` preset (the evidence in ``docs/RESULTS.md``).

    python benchmarks/tuned_study.py run    --out runs/tuned          # resumable; two jobs at most
    python benchmarks/tuned_study.py report --out runs/tuned --results docs/RESULTS.md

Per target domain (leave-one-domain-out on ``fmnist-styles``), in this order, so that what
finishes first is a complete target, and within a target the main comparison (DM, DM+SGS, the
matched step) on every seed before the other arms:

A. ``lr_img`` for DM and for DM+SGS (the op's defaults), each picked from ``GRID`` on 20 % of the
   source training images held out (selection seed 10, apart from the test seeds; the target is
   never read): ``sgs-dgdd select-lr`` in the arm's run folder. Where the pick is the grid's first
   or last value, one more step past that end (the same ratio: 0.25 or 16) is scored the same way
   in ``<arm>-edge`` after the other arms, to show whether the curve still rises beyond the grid;
   where that moves the pick, the arm runs again at it (``<arm>_longer``, 3 seeds, ConvNet only).
B. per seed (0, 1, 2), the first three arms first: DM and DM+SGS at their selected steps; DM+SGS with the matched step
   (``--normalize dm_norm``: every image's update rescaled to the norm of its DM gradient) at
   DM's step; the spatial mask at DM+SGS's step; M3D at DM's step and M3D+SGS at DM+SGS's step
   (M3D's loss is in DM units; its steps are DM's, an approximation); last, if time allows,
   ``--normalize kept_fraction`` at DM's step (after every target).
C. the DM and DM+SGS sets of B are also evaluated by AlexNet:32, VGG-11:16 and ResNet-18:16
   (2 nets each, like the ConvNet).

Every cell is one ``sgs-dgdd`` command (logged with its output under ``<out>/logs``) in the arm's
run folder ``<out>/<target>/<arm>``; the job for seed k runs seeds 0..k with ``--resume``, so the
finished seeds are reused and the folder's ``metrics.json`` covers them all. Jobs run under
``nice -n 10`` with one thread, at most two at once, and a second only while the 1-minute load
average is under ``--max-load`` (other work on the machine comes first). Restarting the command
skips finished cells; ``<out>/STOP`` makes it finish the running jobs and exit; ``<out>/CODE``
(a folder holding ``sgs_cuda``) is put first on the jobs' ``PYTHONPATH`` when present, so the
study's code can stay fixed while the working tree changes.

``report`` runs nothing: it builds every table (``sgs-dgdd compare``'s statistics: paired
differences, 95 % Student-t intervals, positive pairs, per target and pooled), the per-seed pairs
plot and the per-band figure from the finished cells, writes the numbers to
``docs/results/tuned-medium.json``, and with ``--results`` replaces the generated blocks
(``<!-- tuned:NAME -->`` ... ``<!-- /tuned:NAME -->``) of that markdown file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sgs_cuda.options import SGSConfig  # noqa: E402  (the flags a study passes: every option, explicit)
TARGETS = ["photo", "cartoon", "sketch", "painting"]
SEEDS = [0, 1, 2]
GRID = "0.5,1,2,4,8"
SELECT = ["--select-lr", GRID, "--select-seeds", "10", "--holdout-fraction", "0.2"]
XARCH = "convnet,alexnet:32,vgg11:16,resnet18:16"
# The op's defaults, passed explicitly so the study does not move when they do.
SGS_DEFAULTS = SGSConfig(tau=1, rho=0, alpha=1, beta=0.25).flags()


def with_flag(flags, name: str, value: str) -> tuple:
    """``flags`` with ``name``'s value replaced."""
    i = flags.index(name)
    return (*flags[:i + 1], value, *flags[i + 2:])


@dataclass(frozen=True)
class Arm:
    key: str  # run folder name
    label: str  # arm name in the tables (sgs-dgdd --label)
    method: str
    flags: tuple = ()
    lr_from: str | None = None  # None: selects its own lr_img; else the arm whose selection it uses
    late: bool = False  # after every target's other cells
    core: bool = False  # the main question (DM, DM+SGS, matched step): all seeds before the other arms
    longer: bool = False  # runs at lr_from's pick on the grid extended past its end, where that pick moved


ARMS = [
    Arm("dm", "DM", "dm", ("--eval-arch", XARCH), core=True),
    Arm("dm_sgs", "DM+SGS", "dm_sgs", (*SGS_DEFAULTS, "--eval-arch", XARCH), core=True),
    Arm("matched", "DM+SGS matched step", "dm_sgs", (*SGS_DEFAULTS, "--normalize", "dm_norm"), "dm", core=True),
    Arm("spatial", "spatial mask", "dm_sgs", with_flag(SGS_DEFAULTS, "--space", "spatial"), "dm_sgs"),
    Arm("m3d", "M3D", "dm", ("--matching", "m3d"), "dm"),
    Arm("m3d_sgs", "M3D+SGS", "dm_sgs", (*SGS_DEFAULTS, "--matching", "m3d"), "dm_sgs"),
    Arm("dm_longer", "DM, longer grid", "dm", (), "dm", longer=True),
    Arm("dm_sgs_longer", "DM+SGS, longer grid", "dm_sgs", SGS_DEFAULTS, "dm_sgs", longer=True),
    Arm("kept", "DM+SGS kept-fraction step", "dm_sgs", (*SGS_DEFAULTS, "--normalize", "kept_fraction"), "dm",
        late=True),
]
ARM = {a.key: a for a in ARMS}


# --- cells -----------------------------------------------------------------------------------

def selection_path(out: Path, target: str, arm: Arm) -> Path:
    return out / target / arm.key / arm.method / "lr_selection.json"


def selected_lr(out: Path, target: str, arm_key: str) -> float | None:
    path = selection_path(out, target, ARM[arm_key])
    try:
        return float(json.loads(path.read_text())["selected_lr_img"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def beyond_edge(out: Path, target: str, arm: Arm) -> float | None:
    """The step one grid ratio past the grid's end when the arm's selection sits on that end (the
    validation curve may still rise past it), else None (also while the selection is missing)."""
    try:
        record = json.loads(selection_path(out, target, arm).read_text())
        grid, best = [float(v) for v in record["grid"]], float(record["selected_lr_img"])
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    return grid[0] ** 2 / grid[1] if best == grid[0] else grid[-1] ** 2 / grid[-2]


def edge_selection_path(out: Path, target: str, arm: Arm) -> Path:
    """Where the score of the step past the grid's end is kept (its own run folder, ``<arm>-edge``)."""
    return out / target / f"{arm.key}-edge" / arm.method / "lr_selection.json"


def longer_grid(out: Path, target: str, arm: Arm) -> dict | None:
    """The selection on the grid plus the step past its end: ``{"scores" {lr: acc}, "selected",
    "past", "pick"}`` (ties keep the grid's pick), or None until that step is scored."""
    past = edge_selection_path(out, target, arm)
    if not past.is_file():
        return None
    grid, extra = (json.loads(f.read_text()) for f in (selection_path(out, target, arm), past))
    scores = {float(v): a for v, a in {**grid["validation_acc"], **extra["validation_acc"]}.items()}
    selected = float(grid["selected_lr_img"])
    pick = max(sorted(scores), key=lambda v: (scores[v], v == selected))
    return {"scores": scores, "selected": selected, "past": float(extra["selected_lr_img"]), "pick": pick}


def moved_pick(out: Path, target: str, arm_key: str) -> float | None:
    """Arm ``arm_key``'s pick on the longer grid where it differs from the grid's, else None."""
    longer = longer_grid(out, target, ARM[arm_key])
    return longer["pick"] if longer and longer["pick"] != longer["selected"] else None


def seed_done(out: Path, target: str, arm: Arm, seed: int) -> bool:
    return (out / target / arm.key / arm.method / f"seed{seed}" / "metrics.json").is_file()


@dataclass
class Job:
    target: str
    arm: Arm
    seed: int | None  # None: the lr selection (A)
    edge: bool = False  # the selection's check one step past the grid's end (with seed None)
    failures: int = 0
    name: str = field(init=False)

    def __post_init__(self):
        kind = "edge" if self.edge else "select" if self.seed is None else f"seed{self.seed}"
        self.name = f"{self.target}-{self.arm.key}-{kind}"

    @property
    def folder(self) -> str:
        return f"{self.target}/{self.arm.key}" + ("-edge" if self.edge else "")

    def done(self, out: Path) -> bool:
        if self.edge:
            if selected_lr(out, self.target, self.arm.key) is None:
                return False
            return (beyond_edge(out, self.target, self.arm) is None
                    or edge_selection_path(out, self.target, self.arm).is_file())
        if self.seed is None:
            return selected_lr(out, self.target, self.arm.key) is not None
        if self.arm.longer:
            if not Job(self.target, ARM[self.arm.lr_from], None, edge=True).done(out):
                return False
            if moved_pick(out, self.target, self.arm.lr_from) is None:
                return True  # the pick stayed on the grid: nothing to run
        return seed_done(out, self.target, self.arm, self.seed)

    def command(self, out: Path, preset: str, extra=()) -> list[str] | None:
        """The ``sgs-dgdd`` command of this cell, or None while what it needs is missing."""
        arm, base = self.arm, ["--preset", preset, "--target", self.target, "--method", self.arm.method,
                               "--run-dir", str(out / self.folder), "--label", self.arm.label, *self.arm.flags,
                               "--resume", "--no-progress", *extra]
        if self.edge:
            lr = beyond_edge(out, self.target, self.arm)
            return None if lr is None else [sys.executable, "-m", "sgs_cuda.cli", "select-lr", *base,
                                            "--select-lr", f"{lr:g}", *SELECT[2:]]
        if self.seed is None:
            return [sys.executable, "-m", "sgs_cuda.cli", "select-lr", *base, *SELECT]
        if arm.lr_from is None:
            if selected_lr(out, self.target, arm.key) is None:
                return None
            lr = SELECT
        elif arm.longer:
            value = moved_pick(out, self.target, arm.lr_from)
            if value is None:
                return None
            lr = ["--lr-img", f"{value:g}"]
        else:
            value = selected_lr(out, self.target, arm.lr_from)
            if value is None:
                return None
            lr = ["--lr-img", f"{value:g}"]
        seeds = [str(s) for s in SEEDS[:SEEDS.index(self.seed) + 1]]
        return [sys.executable, "-m", "sgs_cuda.cli", "run", *base, *lr, "--seeds", *seeds]


def all_jobs(targets) -> list[Job]:
    """Every cell in priority order: the main question first on every target (the lr selections
    (A), then DM, DM+SGS and the matched step, target by target, seed by seed), then the other
    arms target by target, then the selections' edge checks, then the late arms. A study cut short
    still answers the main question on as many targets as it reached."""
    jobs = []
    for t in targets:
        jobs += [Job(t, a, None) for a in ARMS if a.lr_from is None]
        jobs += [Job(t, a, s) for s in SEEDS for a in ARMS if a.core]
    jobs += [Job(t, a, s) for t in targets for s in SEEDS for a in ARMS if not (a.late or a.core or a.longer)]
    jobs += [Job(t, a, None, edge=True) for t in targets for a in ARMS if a.lr_from is None]
    jobs += [Job(t, a, s) for t in targets for s in SEEDS for a in ARMS if a.longer]
    jobs += [Job(t, a, s) for t in targets for s in SEEDS for a in ARMS if a.late]
    return jobs


# --- the scheduler ---------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def job_env(out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = (out / "CODE").read_text().strip() if (out / "CODE").is_file() else str(REPO)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code, env.get("PYTHONPATH", "")) if p)
    return env


def cmd_run(args) -> None:
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [j for j in all_jobs(args.targets) if args.late or not j.arm.late]
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    log(f"{len(jobs)} cells, {sum(j.done(out) for j in jobs)} finished; machine: {machine()}")
    while True:
        for folder, (job, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[folder]
            ok = proc.returncode == 0 and job.done(out)
            if not ok:
                job.failures += 1
            log(f"{'done' if ok else f'FAILED (exit {proc.returncode}, see logs/{job.name}.log)'}: {job.name} "
                f"in {(time.time() - t0) / 60:.1f} min")
        pending = [j for j in jobs if not j.done(out) and j.failures < 2]
        if not pending and not running:
            log("every cell finished" if all(j.done(out) for j in jobs) else "stopped: some cells failed twice")
            return
        stop = (out / "STOP").is_file()
        if stop and not running:
            log("STOP file found: exiting")
            return
        load = os.getloadavg()[0]
        room = not stop and (not running or (len(running) < args.jobs and load < args.max_load))
        env = job_env(out)
        ready = [j for j in pending if j.command(out, args.preset) is not None]
        if not ready and not running:
            log(f"nothing left to run now; waiting: {[j.name for j in pending]}")
            return
        if room:
            for job in ready:
                if job.folder in running:
                    continue
                cmd = job.command(out, args.preset, args.extra)
                logfile = open(out / "logs" / f"{job.name}.log", "a")
                logfile.write(f"$ {' '.join(cmd)}\n")
                logfile.flush()
                proc = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=logfile, stderr=subprocess.STDOUT,
                                        env=env, cwd=REPO)
                running[job.folder] = (job, proc, time.time())
                log(f"started: {job.name} (load {load:.2f}, {len(running)} running)")
                break
        time.sleep(args.poll)


def machine() -> str:
    return f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --- the report ------------------------------------------------------------------------------

def cmd_report(args) -> None:
    sys.path.insert(0, str(REPO))
    from sgs_cuda.compare import compare_runs, selection_table

    out = Path(args.out)
    folders = {a.key: [out / t / a.key for t in args.targets if seed_done(out, t, a, 0)] for a in ARMS}
    have = {k: v for k, v in folders.items() if v}
    if "dm" not in have:
        sys.exit(f"no finished DM cell under {out} yet")
    blocks, numbers = {}, {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "preset": args.preset,
                           "command": " ".join(sys.argv), "comparisons": {}}

    def compare(name: str, keys: list[str], baseline: str, plot: Path | None = None, targets=None) -> None:
        dirs = {k: [d for d in have.get(k, []) if targets is None or d.parent.name in targets] for k in keys}
        keys = [k for k in keys if dirs[k]]
        if len(keys) < 2 or baseline not in keys:
            blocks[name] = "_not run yet_"
            return
        result = compare_runs([d for k in keys for d in dirs[k]], baseline=ARM[baseline].label,
                              arms=[ARM[k].label for k in keys], plot=plot)
        blocks[name] = result["sections"]["main"]  # the ConvNet (the distillation's architecture)
        if name == "xarch":  # the other evaluation architectures
            blocks[name] = "\n\n".join(v for k, v in result["sections"].items() if k.startswith("arch:"))
        numbers["comparisons"][name] = {k: result[k] for k in ("baseline", "arms", "comparisons", "confidence")}

    docs = Path(args.docs)
    compare("dm", ["dm", "dm_sgs", "matched", "kept", "spatial"], "dm", plot=docs / "tuned_pairs.png")
    compare("spectral_vs_spatial", ["dm_sgs", "spatial"], "dm_sgs")
    compare("m3d", ["m3d", "m3d_sgs"], "m3d")
    compare("m3d_vs_dm", ["dm", "m3d"], "dm")
    compare("xarch", ["dm", "dm_sgs"], "dm")
    # where DM's pick moved past the grid: DM at that pick against DM and DM+SGS as they ran
    compare("longer", ["dm_longer", "dm", "dm_sgs", "dm_sgs_longer"], "dm_longer",
            targets=[d.parent.name for d in have.get("dm_longer", [])])
    selection = selection_table([out / t / k for t in args.targets for k in ("dm", "dm_sgs")
                                 if selection_path(out, t, ARM[k]).is_file()])
    blocks["selection"] = selection["markdown"] or "_not run yet_"
    numbers["selection"] = selection["rows"]
    blocks["edges"], numbers["edges"] = edges_table(out, args.targets)
    blocks["steps"] = steps_table(out, args.targets)
    blocks["answers"] = answers_table(numbers["comparisons"])
    blocks["bands"], numbers["bands"] = bands_report(out, args.targets, docs / "tuned_bands.png")
    blocks["progress"] = progress_table(out, args.targets)
    blocks["quick"] = quick_block(REPO / "docs" / "results" / "sweep-4targets-quick-2026-11-28.json")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    for name, text in blocks.items():
        print(f"\n<!-- tuned:{name} -->\n{text}\n<!-- /tuned:{name} -->")
    if args.results:
        fill_blocks(Path(args.results), blocks)


def edges_table(out: Path, targets) -> tuple[str, list]:
    """Selections on a grid's end next to the validation score one step past it: would the pick move?"""
    lines = ["| target | arm | selected (grid) | its validation acc. | one step past | its validation acc. "
             "| pick on the longer grid |", "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for t in targets:
        for arm in ARMS:
            longer = longer_grid(out, t, arm) if arm.lr_from is None else None
            if longer is None:
                continue
            scores = longer.pop("scores")
            rows.append(row := {"target": t, "arm": arm.label, **longer, "selected_acc": scores[longer["selected"]],
                                "past_acc": scores[longer["past"]]})
            lines.append(f"| {t} | {arm.label} | {row['selected']:g} | {100 * row['selected_acc']:.2f} % | "
                         f"{row['past']:g} | {100 * row['past_acc']:.2f} % | {row['pick']:g} |")
    if not rows:
        return "_no selection on a grid's end checked yet_", rows
    return "\n".join(lines) + ("\n\nValidation accuracy on the held-out source images (selection seed 10, "
                               "ConvNet), as in the selection above; ties keep the grid's pick."), rows


def steps_table(out: Path, targets) -> str:
    """The lr_img each arm ran at, per target (from the sets' own configs)."""
    import torch

    head = ["arm"] + list(targets)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in ARMS:
        cells = []
        for t in targets:
            p = out / t / arm.key / arm.method / "seed0" / "synthetic.pt"
            cells.append(f"{torch.load(p, weights_only=False)['config']['lr_img']:g}" if p.is_file() else "")
        if any(cells):
            lines.append("| " + " | ".join([arm.label, *cells]) + " |")
    return "\n".join(lines)


QUESTIONS = [
    # (question, comparison block, arm label, metric key)
    ("DM+SGS (each at its selected step) vs DM (at its selected step)", "dm", "DM+SGS", "ood_acc_mean"),
    ("DM+SGS matched step (dm_norm, DM's step) vs DM", "dm", "DM+SGS matched step", "ood_acc_mean"),
    ("DM+SGS kept-fraction step (DM's step) vs DM", "dm", "DM+SGS kept-fraction step", "ood_acc_mean"),
    ("spatial mask vs DM+SGS (both at DM+SGS's step)", "spectral_vs_spatial", "spatial mask", "ood_acc_mean"),
    ("M3D+SGS (DM+SGS's step) vs M3D (DM's step)", "m3d", "M3D+SGS", "ood_acc_mean"),
    ("M3D vs DM (both at DM's step)", "m3d_vs_dm", "M3D", "ood_acc_mean"),
    ("DM+SGS vs DM, evaluated by AlexNet", "xarch", "DM+SGS", "per_arch.alexnet.ood_acc_mean"),
    ("DM+SGS vs DM, evaluated by VGG-11", "xarch", "DM+SGS", "per_arch.vgg11.ood_acc_mean"),
    ("DM+SGS vs DM, evaluated by ResNet-18", "xarch", "DM+SGS", "per_arch.resnet18.ood_acc_mean"),
]


def answers_table(comparisons: dict) -> str:
    """One row per question: the pooled paired difference (OOD and in-domain)."""
    lines = ["| comparison (pooled over targets and seeds) | pairs | Δ OOD | pairs > 0 | Δ in-domain | pairs > 0 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for question, block, label, key in QUESTIONS:
        comp = comparisons.get(block, {}).get("comparisons", {})
        ood = comp.get(key, {}).get(label)
        ind = comp.get(key.replace("ood_acc_mean", "in_domain_acc_mean"), {}).get(label)
        if ood is None:
            continue
        cells = []
        for s in (ood, ind):
            cells += [_fmt(s["pooled"]), f"{s['pooled']['positive']}/{s['pooled']['n']}"] if s else ["", ""]
        lines.append(f"| {question} | {ood['pooled']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nΔ: mean ± standard error [95% Student-t interval] of the paired differences "
                               "(percentage points), all targets and seeds pooled.")


def _fmt(s: dict) -> str:
    if s["n"] < 2:
        return f"{s['mean']:+.2f} (1 pair)" if s["n"] else "no pairs"
    return f"{s['mean']:+.2f} ± {s['se']:.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]"


def bands_report(out: Path, targets, png: Path) -> tuple[str, dict]:
    """The per-band diagnostics of every finished DM+SGS set (op defaults), averaged over sets:
    the figure over training, and a table of early (first 10 %) and late (second half) means."""
    import torch

    from sgs_cuda.dm.bands import band_labels
    from sgs_cuda.dm.plots import save_band_curves

    runs = []
    for t in targets:
        for s in SEEDS:
            p = out / t / "dm_sgs" / "dm_sgs" / f"seed{s}" / "synthetic.pt"
            if p.is_file():
                bands = (torch.load(p, weights_only=False).get("history") or {}).get("bands")
                if bands and bands.get("iteration"):
                    runs.append(bands)
    if not runs:
        return "_not run yet_", {}
    keys = ("mask_fraction", "shared_energy", "diversity_energy", "energy")
    its = runs[0]["iteration"]
    runs = [r for r in runs if r["iteration"] == its]
    mean = {k: [[sum(r[k][i][b] for r in runs) / len(runs) for b in range(len(runs[0][k][0]))]
                for i in range(len(its))] for k in keys}
    save_band_curves({f"mean of {len(runs)} DM+SGS sets": {"bands": {"iteration": its, **mean,
                                                                     "edges": runs[0]["edges"]}}}, png)
    names = band_labels(runs[0]["edges"])
    n = len(its)
    early, late = range(0, max(1, n // 10)), range(n // 2, n)

    def avg(k, b, rows):
        return sum(mean[k][i][b] for i in rows) / len(rows)

    lines = ["| radius band (1 = Nyquist) | mask fraction, first 10 % | mask fraction, second half "
             "| share of mean-gradient energy | shared energy / band energy | diversity energy / band energy |",
             "| --- | --- | --- | --- | --- | --- |"]
    table = {}
    for b, name in enumerate(names):
        row = {"mask_early": avg("mask_fraction", b, early), "mask_late": avg("mask_fraction", b, late),
               "energy": avg("energy", b, late), "shared": avg("shared_energy", b, late),
               "diversity": avg("diversity_energy", b, late)}
        table[name] = row
        lines.append(f"| {name} | {row['mask_early']:.3f} | {row['mask_late']:.3f} | {row['energy']:.3f} "
                     f"| {row['shared']:.3f} | {row['diversity']:.3f} |")
    every = its[1] - its[0] if len(its) > 1 else 1
    note = (f"Mean over {len(runs)} DM+SGS sets (op defaults; every finished target and seed), recorded every "
            f"{every} iterations; energies and the second-half mask fraction over iterations {its[n // 2]}-{its[-1]}.")
    return "\n".join(lines) + "\n\n" + note, {"runs": len(runs), "per_band": table}


def quick_block(path: Path) -> str:
    """The earlier quick-scale sweep (``benchmarks/dgdd_study.py sweep``'s JSON) with the same
    statistics as the tables above: every variant minus DM, pooled over targets and seeds."""
    from sgs_cuda.stats import summarize_differences

    if not path.is_file():
        return "_" + str(path) + " not found_"
    results = json.loads(path.read_text())["results"]
    variants = [v for v in next(iter(results.values())) if v != "dm"]
    lines = ["| variant (quick preset, lr_img 1 unless named) | pairs | Δ OOD vs DM | pairs > 0 | Δ in-domain vs DM "
             "| pairs > 0 |", "| --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        cells = []
        for key in ("ood", "in"):
            d = [b - a for r in results.values() if v in r for a, b in zip(r["dm"][key], r[v][key])]
            summary = summarize_differences(d).to_dict()
            cells += [_fmt(summary), f"{summary['positive']}/{summary['n']}"]
        lines.append(f"| {v} | {len(d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nFrom `{path.relative_to(REPO)}`; Δ as above (95% Student-t interval)."


def progress_table(out: Path, targets) -> str:
    """Which cells have finished (seeds per arm and target)."""
    head = ["arm"] + list(targets)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in ARMS:
        cells = [", ".join(str(s) for s in SEEDS if seed_done(out, t, arm, s))
                 or ("not needed" if arm.longer and Job(t, arm, SEEDS[0]).done(out) else "–") for t in targets]
        lines.append("| " + " | ".join([arm.label, *cells]) + " |")
    return "\n".join(lines) + "\n\nSeeds finished per arm and target."


def fill_blocks(path: Path, blocks: dict) -> None:
    text = path.read_text()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- tuned:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /tuned:{re.escape(name)} -->)", re.S)
        text, n = pattern.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        if n == 0:
            print(f"note: no block <!-- tuned:{name} --> in {path}", file=sys.stderr)
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("run", cmd_run), ("report", cmd_report)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--out", required=True, help="the study's folder (run folders, logs)")
        s.add_argument("--targets", nargs="+", default=TARGETS)
        s.add_argument("--preset", default="medium")
    r = sub.choices["run"]
    r.add_argument("--jobs", type=int, default=2, help="jobs at once at most")
    r.add_argument("--max-load", type=float, default=1.5, help="start a second job only under this load average")
    r.add_argument("--poll", type=float, default=30.0, help="seconds between checks")
    r.add_argument("--no-late", dest="late", action="store_false", help="skip the late arms (kept_fraction)")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more sgs-dgdd flags for every cell (e.g. --set distill.iterations=5 for a smoke test)")
    r = sub.choices["report"]
    r.add_argument("--docs", default=str(REPO / "docs"), help="where the figures go")
    r.add_argument("--json", default=str(REPO / "docs" / "results" / "tuned-medium.json"))
    r.add_argument("--results", help="markdown file whose <!-- tuned:NAME --> blocks are replaced")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
