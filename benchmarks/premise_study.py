"""Does SGS's premise hold? DM, DM+SGS and the alternatives a user would compare, on the premise
benchmark (``fmnist-cues``: a planted class-correlated cue per source domain, a cue-free target)
and on ``fmnist-styles``, at the ``quick`` preset (the evidence in ``docs/RESULTS.md``).

    python benchmarks/premise_study.py run    --out runs/premise            # resumable; two jobs at most
    python benchmarks/premise_study.py report --out runs/premise --results docs/RESULTS.md

Stages, in this order (what finishes first answers the first question):

1. ``sanity``: the whole-source line (ConvNets trained on every source image) on the premise
   benchmark at cue strengths 0, 0.5 and 1, both cue families: is the shortcut real?
2. ``premise``: per cue family at strengths 1 and 0.5, each with real and with noise
   initialisation (``PREMISE_SETTINGS``), target ``photo`` (the cue-free domain), seeds 0-2:
   DM, DM+SGS (the op's defaults), DM+MixStyle and DM+FACT (DM's set, post-hoc DG in the
   evaluators); with real initialisation also herding and M3D (``-m3d`` folders), and at
   strength 1 DM+DAM (``-dam``). ``lr_img`` of every distilled arm is selected from ``GRID`` on 20 % of the
   source training images held out (seed 10; the target is never read). The DM+SGS runs record
   the mask against the cue's ground truth.
3. ``grid``: DM+SGS's small tau/alpha grid (``SGS_GRID``) at strength 1, each point's ``lr_img``
   selected on the held-out images (``select-lr`` only); the point with the best held-out
   accuracy (``grid_choice``) then runs seeds 0-2 (``<setting>-best``) unless it is the defaults.
4. ``styles``: ``fmnist-styles``, every target, seeds 0 and 1, scored on the whole target
   domain: DM, DM+SGS (``-sgs`` folders), DM+MixStyle, DM+FACT and the whole-source line.
5. last, distillation only: DM+SGS with ``rho = 0.5`` (the magnitude test on) at the strong
   cues, seed 0, for the mask against the truth at a second setting.

The first two seeds of stage 2 and the first seed of stage 4 ran with the code of 7f14a10, the
rest with later code whose DM loop gives the same sets bit for bit (tests/test_loop.py); their
logged commands list the options of their day (``<out>/logs``).

Every cell is one ``sgs-dgdd`` command in its run folder ``<out>/<stage>/<name>`` (``--resume``:
the job for seed k runs seeds 0..k, finished ones are reused), logged under ``<out>/logs``. Jobs
run under ``nice -n 10`` with one thread each, at most ``--jobs`` at once, every folder's first
seed before any folder's second; ``<out>/STOP`` makes the scheduler finish the running jobs and
exit; restarting skips finished cells, and a running job's folder holds a lock (``RUNNING``, its
pid) that a second scheduler respects, so a study can be restarted without stopping its jobs.

``report`` runs nothing: it builds the tables from the finished cells (paired differences with
DM per setting and seed, 95 % Student-t intervals, pooled; :mod:`sgs_cuda.stats`), the
mask-against-truth figure, writes ``docs/results/premise-quick.json`` and, with ``--results``,
replaces the generated blocks (``<!-- premise:NAME -->`` ... ``<!-- /premise:NAME -->``).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sgs_cuda.options import SGSConfig  # noqa: E402  (the flags a study passes: every option, explicit)
PRESET = "quick"
GRID = "1,4"  # the quick default and the tuned study's usual pick (two points: a screening budget)
SELECT = ["--select-lr", GRID, "--select-seeds", "10", "--holdout-fraction", "0.2"]
SEEDS = [0, 1, 2]
CUES = ("grating", "patch")
SANITY_STRENGTHS = (0.0, 0.5, 1.0)
# (cue, strength, init), strongest first
PREMISE_SETTINGS = [("grating", 1.0, "real"), ("grating", 1.0, "noise"), ("patch", 1.0, "real"),
                    ("patch", 1.0, "noise"), ("grating", 0.5, "real"), ("patch", 0.5, "real"),
                    ("grating", 0.5, "noise"), ("patch", 0.5, "noise")]
STYLE_SEEDS = (0, 1)
STYLE_TARGETS = ("photo", "cartoon", "sketch", "painting")
WHOLE_EPOCHS = 5  # the whole-source networks see ~9,000 images an epoch (the distilled sets: 100)
# The op's defaults, passed explicitly so the study does not move when they do.
SPEC = SGSConfig(tau=1, rho=0, alpha=1, beta=0.25)
SGS_DEFAULTS = SPEC.flags()
# DM+SGS's small grid (besides the defaults, tau 1 and alpha 1), each point's lr_img selected on
# the held-out source images like every arm's; the best held-out accuracy picks the point per
# setting (at D = 3, tau 0.3 keeps every sign pattern: the agreement test off)
SGS_GRID = ((1.0, 3.0), (0.3, 1.0))
GRID_SETTINGS = [st for st in PREMISE_SETTINGS if st[1] == 1.0]
M3D_SETTINGS = [st for st in PREMISE_SETTINGS if st[2] == "real"]
DAM_SETTINGS = [st for st in PREMISE_SETTINGS if st[2] == "real" and st[1] == 1.0]


@dataclass(frozen=True)
class Arm:
    """One line of the OOD tables: ``method``'s results in the setting's folder + ``suffix``."""
    label: str
    method: str
    suffix: str = ""


# compared with DM, in the tables' order; "DM+SGS (grid)" is read through grid_choice
ARMS = (Arm("DM+SGS", "dm_sgs"), Arm("DM+SGS (grid)", "dm_sgs", "grid"), Arm("M3D", "dm", "-m3d"),
        Arm("DM+DAM", "dm_dam", "-dam"), Arm("DM+MixStyle", "dm_mixstyle"), Arm("DM+FACT", "dm_fact"),
        Arm("herding", "herding"))
STYLE_ARMS = (Arm("DM+SGS", "dm_sgs", "-sgs"), Arm("DM+MixStyle", "dm_mixstyle"), Arm("DM+FACT", "dm_fact"),
              Arm("whole sources", "whole"))


def cue_flags(cue: str, strength: float) -> list[str]:
    return ["--dataset", "fmnist-cues", "--data-option", f"cue={cue}", "--data-option", f"cue_strength={strength:g}"]


def setting_name(cue: str, strength: float, init: str) -> str:
    return f"{cue}-{strength:g}-{init}"


def setting_flags(cue: str, strength: float, init: str) -> tuple[str, ...]:
    return (*cue_flags(cue, strength), "--target", "photo", "--init", init)


def grid_flags(tau: float, alpha: float) -> list[str]:
    return SPEC.replace(tau=tau, alpha=alpha).flags()


@dataclass
class Cell:
    stage: str
    name: str  # run folder name within the stage
    methods: tuple[str, ...]
    flags: tuple[str, ...]
    seeds: tuple[int, ...] = tuple(SEEDS)
    command: str = "run"  # or "distill" (diagnostics only), "select-lr" (the held-out selection only)

    def folder(self, out: Path) -> Path:
        return out / self.stage / self.name

    def done(self, out: Path, seed: int) -> bool:
        f = self.folder(out)
        if self.command == "select-lr":
            return all(_selection(f / m) is not None for m in self.methods)
        leaf = "synthetic.pt" if self.command == "distill" else "metrics.json"
        return all((f / m / f"seed{seed}" / leaf).is_file() for m in self.methods)

    def argv(self, out: Path, seed: int) -> list[str]:
        seeds = [str(s) for s in self.seeds[:self.seeds.index(seed) + 1]]
        return [sys.executable, "-m", "sgs_cuda.cli", self.command, "--preset", PRESET, "--method", *self.methods,
                "--run-dir", str(self.folder(out)), "--seeds", *seeds, "--resume", "--no-progress", *self.flags]


def _selection(method_folder: Path) -> dict | None:
    path = method_folder / "lr_selection.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return record if "selected_lr_img" in record else None


def all_cells() -> list[Cell]:
    cells = [Cell("sanity", f"{cue}-{s:g}", ("whole",), (*cue_flags(cue, s), "--target", "photo",
                                                          "--set", f"eval.whole_epochs={WHOLE_EPOCHS}"), (0,))
             for cue in CUES for s in SANITY_STRENGTHS if not (s == 0 and cue == "patch")]  # 0: the same data
    for st in PREMISE_SETTINGS:
        # post-hoc DG on DM's set in every setting; herding (real images: no initialisation) once
        methods = ("dm", "dm_sgs", "dm_mixstyle", "dm_fact") + (("herding",) if st[2] == "real" else ())
        cells.append(Cell("premise", setting_name(*st), methods, (*setting_flags(*st), *SGS_DEFAULTS, *SELECT)))
    for st in GRID_SETTINGS:
        for tau, alpha in SGS_GRID:
            cells.append(Cell("grid", f"{setting_name(*st)}-tau{tau:g}-alpha{alpha:g}", ("dm_sgs",),
                              (*setting_flags(*st), *grid_flags(tau, alpha), *SELECT), (10,), command="select-lr"))
    cells += [Cell("premise", f"{setting_name(*st)}-m3d", ("dm",), (*setting_flags(*st), "--matching", "m3d", *SELECT))
              for st in M3D_SETTINGS]
    cells += [Cell("premise", f"{setting_name(*st)}-dam", ("dm_dam",), (*setting_flags(*st), *SELECT))
              for st in DAM_SETTINGS]
    for t in STYLE_TARGETS:
        styles = ("--dataset", "fmnist-styles", "--target", t, *SELECT)
        cells.append(Cell("styles", t, ("dm", "dm_mixstyle", "dm_fact", "whole"),
                          (*styles, "--set", f"eval.whole_epochs={WHOLE_EPOCHS}"), STYLE_SEEDS))
        cells.append(Cell("styles", f"{t}-sgs", ("dm_sgs",), (*styles, *SGS_DEFAULTS), STYLE_SEEDS))
    # the per-class truth (each image's own class's cue bins), recorded since it exists: the strong
    # grating with DM+SGS at its selected step (a patch's amplitude does not depend on its place)
    cells.append(Cell("premise", "grating-1-real-own", ("dm_sgs",),
                      (*setting_flags("grating", 1.0, "real"), *SGS_DEFAULTS, "--lr-img", "4"), (0, 1),
                      command="distill"))
    for cue in CUES:
        cells.append(Cell("premise", f"{cue}-1-real-rho0.5", ("dm_sgs",),
                          (*setting_flags(cue, 1.0, "real"), *with_flag(SGS_DEFAULTS, "--rho", "0.5")), (0,),
                          command="distill"))
    return cells


def grid_choice(out: Path, st) -> dict | None:
    """DM+SGS's grid point for setting ``st``: the (tau, alpha, selected lr_img) with the best
    held-out source accuracy, the defaults first on ties; None until every point is selected."""
    candidates = [(1.0, 1.0, _selection(out / "premise" / setting_name(*st) / "dm_sgs"))]
    candidates += [(tau, alpha, _selection(out / "grid" / f"{setting_name(*st)}-tau{tau:g}-alpha{alpha:g}" / "dm_sgs"))
                   for tau, alpha in SGS_GRID]
    if any(sel is None for *_, sel in candidates):
        return None
    scored = [(sel["validation_acc"][str(float(sel["selected_lr_img"]))], tau, alpha, sel["selected_lr_img"])
              for tau, alpha, sel in candidates]
    best = max(scored, key=lambda x: x[0])  # max keeps the first of equals: the defaults
    return {"tau": best[1], "alpha": best[2], "lr_img": best[3], "defaults": (best[1], best[2]) == (1.0, 1.0),
            "candidates": [{"tau": t, "alpha": a, "lr_img": lr, "validation": 100 * v} for v, t, a, lr in scored]}


def grid_best_cells(out: Path) -> list[Cell]:
    """The chosen grid point's runs, per setting where it is not the defaults (those are the
    premise cells' DM+SGS)."""
    cells = []
    for st in GRID_SETTINGS:
        choice = grid_choice(out, st)
        if choice is not None and not choice["defaults"]:
            cells.append(Cell("grid", f"{setting_name(*st)}-best", ("dm_sgs",),
                              (*setting_flags(*st), *grid_flags(choice["tau"], choice["alpha"]),
                               "--lr-img", f"{choice['lr_img']:g}")))
    return cells


def arm_folder(out: Path, setting: str, arm: Arm) -> Path | None:
    """Where ``arm``'s results for ``setting`` (a premise setting or a styles target) are."""
    stage = "premise" if setting in {setting_name(*st) for st in PREMISE_SETTINGS} else "styles"
    if arm.suffix != "grid":
        return out / stage / (setting + arm.suffix)
    st = next((st for st in GRID_SETTINGS if setting_name(*st) == setting), None)
    choice = None if st is None else grid_choice(out, st)
    if choice is None:
        return None
    return out / "premise" / setting if choice["defaults"] else out / "grid" / f"{setting}-best"


def with_flag(flags, name: str, value: str) -> list[str]:
    i = flags.index(name)
    return [*flags[:i + 1], value, *flags[i + 2:]]


# --- the scheduler ---------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def machine() -> str:
    return f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def job_order(cells: list[Cell]) -> list[tuple[Cell, int]]:
    """``(cell, seed)`` jobs, every folder's first seed before any folder's second (in the cells'
    order within a rank): a study cut short has whole seeds."""
    return sorted(((c, s) for c in cells for s in c.seeds), key=lambda job: job[0].seeds.index(job[1]))


LOCK = "RUNNING"  # in a run folder while a job runs there: the job's pid (another scheduler leaves it alone)


def folder_busy(folder: Path) -> bool:
    """Whether a live process (of this or another scheduler) holds ``folder``'s lock."""
    try:
        os.kill(int((folder / LOCK).read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def cmd_run(args, cells=None) -> None:
    """Run ``cells`` (default: this study's, of ``args.stage``) at most ``args.jobs`` at once.
    ``cells`` may be a function, called at every poll: cells that depend on finished ones (a run
    at a selected step) join when they can. A folder another scheduler's job holds (its lock) is
    skipped, and that job counts toward ``args.jobs``."""
    out = Path(args.out).resolve()  # the jobs run in the code's folder
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if cells is None:
        cells = [c for c in all_cells() if args.stage in ("all", c.stage)]
    current = cells if callable(cells) else (lambda: cells)
    code = str(Path(args.code).resolve()) if args.code else str(REPO)  # a snapshot keeps the study's code fixed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH", "")) if p)}
    running: dict[Path, tuple[Cell, int, subprocess.Popen, float]] = {}
    failures: dict[tuple[Path, int], int] = {}
    jobs = job_order(current())
    log(f"{len(jobs)} jobs, {sum(c.done(out, s) for c, s in jobs)} finished; machine: {machine()}")
    while True:
        for folder, (cell, seed, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[folder]
            (folder / LOCK).unlink(missing_ok=True)
            ok = proc.returncode == 0 and cell.done(out, seed)
            failures[folder, seed] = failures.get((folder, seed), 0) + (not ok)
            log(f"{'done' if ok else f'FAILED (exit {proc.returncode})'}: {cell.stage}/{cell.name} seed {seed} "
                f"in {(time.time() - t0) / 60:.1f} min")
        jobs = job_order(current())
        pending = [(c, s) for c, s in jobs if not c.done(out, s) and failures.get((c.folder(out), s), 0) < 2]
        stop = (out / "STOP").is_file()
        if (not pending or stop) and not running:
            log("stopped (STOP file)" if stop else "every job finished" if all(c.done(out, s) for c, s in jobs)
                else "stopped: some jobs failed twice")
            return
        # --jobs counts the other schedulers' jobs in these folders too: one machine's budget
        others = {c.folder(out) for c, _ in pending if c.folder(out) not in running and folder_busy(c.folder(out))}
        if not stop and len(running) + len(others) < args.jobs:
            # one job per run folder at a time; a folder's seeds in order
            free = [(c, s) for c, s in pending if c.folder(out) not in running and c.folder(out) not in others
                    and all(c.done(out, e) for e in c.seeds[:c.seeds.index(s)])]
            if free:
                cell, seed = free[0]
                name = f"{cell.stage}-{cell.name}-seed{seed}"
                logfile = open(out / "logs" / f"{name}.log", "a")
                argv = cell.argv(out, seed)
                logfile.write(f"$ {' '.join(argv)}\n")
                logfile.flush()
                proc = subprocess.Popen(["nice", "-n", "10", *argv], stdout=logfile, stderr=subprocess.STDOUT,
                                        env=env, cwd=code)
                cell.folder(out).mkdir(parents=True, exist_ok=True)
                (cell.folder(out) / LOCK).write_text(str(proc.pid))
                running[cell.folder(out)] = (cell, seed, proc, time.time())
                log(f"started: {name} ({len(running)} running)")
                continue
        time.sleep(args.poll)


# --- the report ------------------------------------------------------------------------------

def _metrics(folder: Path, method: str, seed: int) -> dict | None:
    path = folder / method / f"seed{seed}" / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _history(folder: Path, method: str, seed: int) -> dict | None:
    import torch

    path = folder / method / f"seed{seed}" / "synthetic.pt"
    if not path.is_file():
        return None
    return (torch.load(path, map_location="cpu", weights_only=False).get("history") or {})


def truth_summary(history: dict) -> dict | None:
    """The mask-against-truth fractions averaged over the second half of the recorded iterations."""
    truth = (history or {}).get("truth")
    if not truth or not truth["iteration"]:
        return None
    half = len(truth["iteration"]) // 2
    mean = lambda v: sum(v[half:]) / len(v[half:])  # noqa: E731
    own = mean(truth["own"]) if "own" in truth else math.nan  # recorded since the per-class truth exists
    return {"cue": 100 * mean(truth["cue"]), "other": 100 * mean(truth["other"]),
            "own": None if math.isnan(own) else 100 * own,
            "chance": None if truth["chance"] is None else 100 * truth["chance"], "cue_bins": truth["cue_bins"]}


def _fmt(v, digits=1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def sanity_table(out: Path) -> tuple[str, dict]:
    rows, numbers = [], {}
    for cell in (c for c in all_cells() if c.stage == "sanity"):
        m = _metrics(cell.folder(out), "whole", 0)
        if m is None:
            continue
        cue, s = cell.name.rsplit("-", 1)
        numbers[cell.name] = {"ood": 100 * m["ood_acc_mean"], "in_domain": 100 * m["in_domain_acc_mean"]}
        rows.append(f"| {'none' if float(s) == 0 else cue} | {float(s):g} | {numbers[cell.name]['in_domain']:.1f} | "
                    f"{numbers[cell.name]['ood']:.1f} | {numbers[cell.name]['in_domain'] - numbers[cell.name]['ood']:.1f} |")
    return _table(["cue", "strength", "in-domain %", "OOD % (photo, every image)", "gap"], rows), numbers


def _table(columns: list[str], rows: list[str]) -> str:
    if not rows:
        return "_not run yet_"
    return "\n".join(["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", *rows])


def truth_table(out: Path) -> tuple[str, dict]:
    rows, numbers = [], {}
    for cell in (c for c in all_cells() if c.stage == "premise" and "dm_sgs" in c.methods):
        found = [truth_summary(_history(cell.folder(out), "dm_sgs", s)) for s in cell.seeds]
        found = [f for f in found if f]
        if not found:
            continue
        avg = {k: sum(f[k] for f in found) / len(found) for k in ("cue", "other")}
        owns = [f["own"] for f in found if f["own"] is not None]
        avg["own"] = sum(owns) / len(owns) if owns else None
        chance = found[0]["chance"]
        numbers[cell.name] = {**avg, "chance": chance, "seeds": len(found), "cue_bins": found[0]["cue_bins"]}
        setting = cell.name.replace("-rho0.5", "")
        rows.append(f"| {setting} | {'0.5' if 'rho0.5' in cell.name else '0'} | {avg['cue']:.1f} | {_fmt(avg['own'])} | "
                    f"{avg['other']:.1f} | {_fmt(chance)} | {found[0]['cue_bins']} | {len(found)} |")
    return _table(["setting (cue-strength-init)", "rho", "cue bins kept %", "own class's cue bins kept %",
                   "other bins kept %", "chance %", "cue bins", "seeds"], rows), numbers


def arm_accuracies(out: Path, settings: list[str], seeds, arms) -> dict:
    """``{key: {label: {setting: {seed: %}}}}`` for DM (the setting's folder) and ``arms``, with
    key ``ood_acc_mean`` and ``in_domain_acc_mean``; what has not run is absent."""
    acc = {"ood_acc_mean": {}, "in_domain_acc_mean": {}}
    for label, folder_of, method in [("DM", lambda st: arm_folder(out, st, Arm("DM", "dm")), "dm"),
                                     *[(a.label, lambda st, a=a: arm_folder(out, st, a), a.method) for a in arms]]:
        for st in settings:
            folder = folder_of(st)
            for s in seeds:
                r = None if folder is None else _metrics(folder, method, s)
                if r is not None:
                    for key in acc:
                        acc[key].setdefault(label, {}).setdefault(st, {})[s] = 100 * r[key]
    return acc


def paired_tables(acc: dict, what: str) -> tuple[str, dict]:
    """Each arm's OOD/in-domain mean per setting, then every arm paired with DM (same setting and
    seed), per setting and pooled (95 % Student-t intervals, :func:`sgs_cuda.stats.compare`)."""
    from sgs_cuda import stats

    if "DM" not in acc["ood_acc_mean"]:
        return "_not run yet_", {}
    labels = list(acc["ood_acc_mean"])
    settings = list(acc["ood_acc_mean"]["DM"])
    lines = [f"| {what} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for st in settings:
        row = []
        for label in labels:
            o = acc["ood_acc_mean"][label].get(st, {})
            i = acc["in_domain_acc_mean"][label].get(st, {})
            row.append("—" if not o else f"{sum(o.values()) / len(o):.1f} / {sum(i.values()) / len(i):.1f} ({len(o)})")
        lines.append(f"| {st} | " + " | ".join(row) + " |")
    numbers = {"accuracy": acc, "comparisons": {}}
    diff_lines = [f"| arm − DM | {what} | OOD diff (pts) | 95 % CI | ahead | in-domain diff | 95 % CI |",
                  "|---|---|---|---|---|---|---|"]
    for label in labels[1:]:
        res = {key: stats.compare(acc[key]["DM"], acc[key][label]) for key in acc}
        numbers["comparisons"][label] = {k: {"pooled": _summary(v["pooled"]),
                                             "per_target": {t: _summary(p["summary"]) for t, p in v["per_target"].items()}}
                                         for k, v in res.items()}
        for st in [*res["ood_acc_mean"]["per_target"], "pooled"]:
            o, i = [res[key]["pooled"] if st == "pooled" else res[key]["per_target"][st]["summary"] for key in acc]
            bold = "**" if st == "pooled" else ""
            diff_lines.append(f"| {label} | {bold}{st}{bold} | {o.mean:+.1f} | {_ci(o)} | {o.positive}/{o.n} | "
                              f"{i.mean:+.1f} | {_ci(i)} |")
    return ("OOD % / in-domain % (mean over seeds, their number in brackets):\n\n" + "\n".join(lines)
            + "\n\nPaired with DM (same " + what + " and seed):\n\n" + "\n".join(diff_lines)), numbers


def premise_tables(out: Path) -> tuple[str, dict]:
    """Every arm against DM on the premise settings (OOD on every image of the cue-free target)."""
    return paired_tables(arm_accuracies(out, [setting_name(*st) for st in PREMISE_SETTINGS], SEEDS, ARMS), "setting")


def styles_table(out: Path) -> tuple[str, dict]:
    """Every arm against DM on fmnist-styles, each target held out in turn (scored on all of it)."""
    return paired_tables(arm_accuracies(out, list(STYLE_TARGETS), STYLE_SEEDS, STYLE_ARMS), "target")


def grid_table(out: Path) -> tuple[str, dict]:
    """DM+SGS's grid: each point's held-out source accuracy (at its selected lr_img) and the pick."""
    rows, numbers = [], {}
    for st in GRID_SETTINGS:
        choice = grid_choice(out, st)
        if choice is None:
            continue
        numbers[setting_name(*st)] = choice
        for c in choice["candidates"]:
            picked = (c["tau"], c["alpha"]) == (choice["tau"], choice["alpha"])
            rows.append(f"| {setting_name(*st)} | {c['tau']:g} | {c['alpha']:g} | {c['lr_img']:g} | "
                        f"{c['validation']:.1f} | {'**picked**' if picked else ''} |")
    return _table(["setting", "tau", "alpha", "lr_img (selected)", "held-out source accuracy %", ""], rows), numbers


def cost_table(out: Path) -> tuple[str, dict]:
    """Each arm's mean distillation and evaluation seconds per seed on the real-init premise settings
    (``metrics.json``; jobs shared the machine two at a time, so read the ratios, not the seconds)."""
    settings = [setting_name(*st) for st in PREMISE_SETTINGS if st[2] == "real"]
    rows, numbers = [], {}
    for arm in (Arm("DM", "dm"), *[a for a in ARMS if a.suffix != "grid"]):
        distill_s, eval_s = [], []
        for st in settings:
            path = arm_folder(out, st, arm) / "metrics.json"
            r = json.loads(path.read_text())["methods"].get(arm.method) if path.is_file() else None
            if r and r.get("seeds"):
                n = len(r["seeds"])
                distill_s.append(r.get("distill_seconds", 0.0) / n)
                eval_s.append(r.get("eval_seconds", 0.0) / n)
        if eval_s:
            numbers[arm.label] = {"distill": sum(distill_s) / len(distill_s), "eval": sum(eval_s) / len(eval_s)}
    base = numbers.get("DM")
    for label, v in numbers.items():
        ratio = "—" if not base else f"{(v['distill'] + v['eval']) / (base['distill'] + base['eval']):.2f}"
        rows.append(f"| {label} | {v['distill']:.0f} | {v['eval']:.0f} | {ratio} |")
    return _table(["arm", "distillation s / seed", "evaluation s / seed", "× DM (both)"], rows), numbers


def _summary(s) -> dict:
    return s.to_dict()


def _ci(s) -> str:
    return "—" if s.n < 2 else f"[{s.ci_low:+.1f}, {s.ci_high:+.1f}]"


def truth_figure(out: Path, path: Path) -> Path | None:
    """Cue bins kept vs other bins kept over the iterations, per premise setting (seed 0), with
    the chance rate (and each image's own class's cue bins where recorded)."""
    from matplotlib.figure import Figure

    runs = {}
    for cell in (c for c in all_cells() if c.stage == "premise" and "dm_sgs" in c.methods):
        h = _history(cell.folder(out), "dm_sgs", 0)
        if h and h.get("truth"):
            runs[cell.name] = h["truth"]
    if not runs:
        return None
    cols = min(4, len(runs))
    rows = -(-len(runs) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, t) in zip(axes.flat, runs.items()):
        ax.plot(t["iteration"], [100 * v for v in t["cue"]], label="cue bins")
        ax.plot(t["iteration"], [100 * v for v in t["other"]], label="other bins")
        if any(v == v for v in t.get("own", [])):  # (nan: recorded before the per-class truth)
            ax.plot(t["iteration"], [100 * v for v in t["own"]], label="own class's cue bins")
        if t["chance"] is not None:
            ax.axhline(100 * t["chance"], color="grey", ls=":", label="chance")
        ax.set_title(name, fontsize=8)
        ax.set_ylim(0, 60)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("components kept %", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def differences_figure(numbers: dict[str, dict], path: Path) -> Path | None:
    """Each arm's pooled paired OOD and in-domain difference from DM with its 95 % interval, one
    panel per benchmark (``numbers``: benchmark -> :func:`paired_tables`'s numbers)."""
    from matplotlib.figure import Figure

    panels = {name: n["comparisons"] for name, n in numbers.items() if n.get("comparisons")}
    if not panels:
        return None
    fig = Figure(figsize=(5.0 * len(panels), 0.5 + 0.45 * max(len(c) for c in panels.values())), dpi=110)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, comparisons) in zip(axes, panels.items()):
        labels = list(comparisons)[::-1]
        for offset, key, colour in ((0.12, "ood_acc_mean", "C0"), (-0.12, "in_domain_acc_mean", "C1")):
            for y, label in enumerate(labels):
                p = comparisons[label][key]["pooled"]
                lo, hi = p.get("ci_low"), p.get("ci_high")
                if lo is not None and p["n"] >= 2:
                    ax.plot([lo, hi], [y + offset] * 2, color=colour, lw=1.5)
                ax.plot([p["mean"]], [y + offset], "o", color=colour, ms=4,
                        label=("OOD" if key.startswith("ood") else "in-domain") if y == 0 else None)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("paired difference from DM (points), 95 % CI", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- premise:{name} -->\n).*?(\n<!-- /premise:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"no <!-- premise:{name} --> block in the results file")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def cmd_report(args) -> None:
    sys.path.insert(0, str(REPO))
    out, docs = Path(args.out), Path(args.docs)
    blocks, numbers = {}, {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "preset": PRESET,
                           "command": " ".join(sys.argv)}
    for name, build in (("sanity", sanity_table), ("truth", truth_table), ("grid", grid_table),
                        ("ood", premise_tables), ("styles", styles_table), ("cost", cost_table)):
        blocks[name], numbers[name] = build(out)
    truth_figure(out, docs / "premise_truth.png")
    differences_figure({"premise benchmark (fmnist-cues, target photo)": numbers["ood"],
                        "fmnist-styles (every target)": numbers["styles"]}, docs / "premise_differences.png")
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "results" / "premise-quick.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    if args.results:
        path = Path(args.results)
        path.write_text(replace_blocks(path.read_text(), blocks))
    else:
        for name, body in blocks.items():
            print(f"## {name}\n{body}\n")


def add_run_arguments(parser, out: str):
    """The scheduler's flags (:func:`cmd_run`), shared by the studies that use it."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--poll", type=float, default=5.0)
    parser.add_argument("--code", help="a folder holding the sgs_cuda package to run (default: this checkout)")
    return parser


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = add_run_arguments(sub.add_parser("run", help="run the study's cells (resumable)"), "runs/premise")
    r.add_argument("--stage", choices=["all", "sanity", "premise", "grid", "styles"], default="all")
    rep = sub.add_parser("report", help="tables and figure from the finished cells")
    rep.add_argument("--out", default="runs/premise")
    rep.add_argument("--docs", default=str(REPO / "docs"))
    rep.add_argument("--results", help="markdown file whose <!-- premise:NAME --> blocks are replaced")
    args = p.parse_args(argv)
    if args.command == "report":
        cmd_report(args)
        return
    cmd_run(args)
    if args.stage in ("all", "grid"):  # then the grid's picks, where they are not the defaults
        cmd_run(args, grid_best_cells(Path(args.out)))


if __name__ == "__main__":
    main()
