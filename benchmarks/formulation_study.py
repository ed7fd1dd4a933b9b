"""Surgery formulations that could carry the premise (issue 18), in four stages:

    python benchmarks/formulation_study.py run --stage screen --out runs/formulations --code <snapshot>
    python benchmarks/formulation_study.py run --stage lr     --out runs/formulations   # lr_img per arm
    python benchmarks/formulation_study.py run --stage medium --out runs/formulations   # the two best
    python benchmarks/formulation_study.py run --stage lodo   --out runs/formulations   # lr_img, left-out domain
    python benchmarks/formulation_study.py report --out runs/formulations --results docs/RESULTS.md

Every stage is resumable; ``--stage lr+medium`` runs both of the last, seed by seed.

**screen** (``quick`` preset): the premise benchmark (``fmnist-cues``, target ``photo``), each
formulation alone, with the mask against the cue's ground truth. Arms (``ARMS``: an
:class:`~sgs_cuda.options.SGSConfig` each, or DM with another initialisation): DM; DM+SGS with the
spec's formulation; agreement over time (``ema``), over a class (``pool``), the equal-energy
magnitude test (``equalize`` with ``rho`` 0.5), replace instead of augment (``mean_weight`` 0 at
the DM step), per-bin PCGrad, removal (``decay``), agreement on class content
(``agree_on="contrast"``), diversity within the set (``spread``), DM with amplitude removal
(``amp_decay``); and DM from the spectral initialisations. Every arm at DM's selected ``lr_img``
(4). Settings: both cue families at strength 1 with real initialisation for every arm, noise
initialisation for the arms where it is part of the question, strength 0.5 for every arm, and
``fmnist-styles`` (all four targets) for the arms that moved OOD accuracy. Seeds 0 and 1.

**lr** (``quick``): each arm's own ``lr_img`` from ``LR_GRID`` on held-out source images (one
step past a grid end where the pick sits there), and its runs at a pick that moved, paired with
DM at DM's pick (``--lr-arms K``: the first K of ``LR_ARMS``).

**lodo** (``quick``): the same selection for ``LODO_ARMS`` by leaving each source domain out in
turn (``--select-validation domain``): held-out images of the sources carry their cues and
reward keeping them; a left-out source domain maps classes to other cues and does not.

**medium**: the two formulations ahead on the premise benchmark on ``fmnist-styles`` at the tuned
study's protocol, paired with DM rerun by this code; the tuned study's DM and M3D beside them.

The scheduler is ``premise_study``'s (one job per run folder at a time, ``--jobs`` at once, one
thread each, ``<out>/STOP`` to stop, run-folder locks so a second scheduler can take over); the
report pairs each arm with DM per setting and seed (95 % Student-t intervals, pooled over settings
and seeds), reads the mask and the sets' amplitudes against the truth, and sums what the study
cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import premise_study as ps  # noqa: E402  (the scheduler, the run-folder readers, the block writer)

from sgs_cuda.options import SGSConfig  # noqa: E402

SEEDS = (0, 1)
LR = "4"  # DM's lr_img selected on held-out source images at this preset (premise_study's cells)
SPEC = SGSConfig(tau=1, rho=0, alpha=1, beta=0.25)  # the op's defaults, explicit
# name -> (method, SGSConfig or None, init override or None); the order is the tables'
ARMS = {
    "DM": ("dm", None, None),
    "SGS (spec)": ("dm_sgs", SPEC, None),
    "over time (ema 0.9)": ("dm_sgs", SPEC.replace(ema=0.9), None),
    "over a class (pool)": ("dm_sgs", SPEC.replace(pool="class"), None),
    "equalized (rho 0.5)": ("dm_sgs", SPEC.replace(rho=0.5, equalize=True), None),
    "replace (dm_norm)": ("dm_sgs", SPEC.replace(mean_weight=0, normalize="dm_norm"), None),
    "PCGrad per bin": ("dm_sgs", SPEC.replace(combine="pcgrad", mean_weight=0, beta=0), None),
    "removal (decay 5e-4)": ("dm_sgs", SPEC.replace(decay=5e-4), None),
    "class content (contrast)": ("dm_sgs", SPEC.replace(agree_on="contrast"), None),
    "diversity within the set (spread 5e-4)": ("dm_sgs", SPEC.replace(spread=5e-4), None),
    # DM (alpha = beta = 0) plus the amplitude removal toward the class's cross-domain floor
    "DM + amplitude removal (5e-3)": ("dm_sgs", SPEC.replace(alpha=0, beta=0, amp_decay=5e-3), None),
    "DM, spectral init": ("dm", None, "spectral"),
    "DM, spectral_min init": ("dm", None, "spectral_min"),
}
NOISE_ARMS = ("DM", "SGS (spec)", "over time (ema 0.9)", "replace (dm_norm)", "removal (decay 5e-4)",
              "DM + amplitude removal (5e-3)")
# (cue, init), in the order they run
SETTINGS = [("grating", "real"), ("patch", "real"), ("grating", "noise")]
# the screening's second benchmark: fmnist-styles, every target, for the arms that moved OOD accuracy
# on the premise benchmark (and DM), after the first filter
STYLE_TARGETS = ("photo", "cartoon", "sketch", "painting")
STYLE_ARMS = ("DM", "removal (decay 5e-4)", "DM, spectral_min init", "DM + amplitude removal (5e-3)")
# the weaker cue (strength 0.5, real initialisation)
WEAK_CUES = ("grating", "patch")
WEAK_ARMS = tuple(ARMS)  # every arm (the amplitude ones and the spec's ran first, the others after)
# the medium protocol: the two formulations ahead on the premise benchmark, on fmnist-styles with the
# tuned study's protocol (its preset, seeds, target split and DM's selected steps), paired with DM
# rerun by this code seed by seed; the tuned study's own DM and M3D (docs/results/tuned-medium.json,
# earlier code) beside them: the rerun of DM says how far the code has moved since
MEDIUM_ARMS = ("DM + amplitude removal (5e-3)", "DM, spectral_min init")
MEDIUM_SEEDS = (0, 1, 2)
TUNED_DM_LR = {"photo": "4", "cartoon": "4", "sketch": "8", "painting": "4"}  # tuned study's DM selections
MEDIUM_FLAGS = ("--preset", "medium", "--dataset", "fmnist-styles", "--set", "eval.target_split=test")


# lr_img per arm (the screen ran every arm at DM's selection, 4): each arm's own pick on held-out
# source images from a grid with room on both sides of 4, on the strong grating with real
# initialisation; where the pick moves, the arm runs again at it (seeds 0 and 1), paired with DM
# at DM's own pick on this grid. The arms that decide the answer first.
LR_GRID = "2,4,8,16"
LR_SETTING = ("grating", "real")
LR_ARMS = ("DM", "DM + amplitude removal (5e-3)", "DM, spectral_min init", "SGS (spec)", "over time (ema 0.9)",
           "DM, spectral init", "removal (decay 5e-4)", "class content (contrast)",
           "diversity within the set (spread 5e-4)", "over a class (pool)", "equalized (rho 0.5)", "PCGrad per bin",
           "replace (dm_norm)")
LR_SELECT = ("--select-lr", LR_GRID, "--select-seeds", "10", "--holdout-fraction", "0.2")
# the same selection by leaving each source domain out (DomainBed's rule): each held-out domain's
# class-to-cue map differs from the others', so a set that learned its sources' cues scores low
LODO_ARMS = LR_ARMS[:4]
LODO = "-lodo"  # the folder suffix of their selections
LODO_SELECT = (*LR_SELECT, "--select-validation", "domain")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def arm_flags(name: str, init: str, lr: str = LR) -> tuple[str, ...]:
    method, sgs, init_override = ARMS[name]
    flags = ["--init", init_override or init, "--lr-img", lr, "--label", name]
    return tuple(flags + (sgs.flags() if sgs is not None else []))


def arm_of(cell: ps.Cell) -> str:
    """The arm a cell runs (its run folder is ``<arm's slug>-s<seed>``)."""
    return next(name for name in ARMS if slug(name) == cell.name.rsplit("-s", 1)[0])


def _cell(setting: str, name: str, seed: int, data_flags: tuple, init: str) -> ps.Cell:
    return ps.Cell(setting, f"{slug(name)}-s{seed}", (ARMS[name][0],),
                   (*data_flags, *arm_flags(name, init)), (seed,))


def all_cells() -> list[ps.Cell]:
    """One cell per (setting, arm, seed), each in its own run folder ``<setting>/<arm>-s<seed>``: the
    first filter (every arm's seed 0 before any seed 1: what finishes first is a whole screen),
    then the styles screen, then the weaker cue."""
    cells = []
    for seed in SEEDS:
        for cue, init in SETTINGS:
            for name, (_, _, init_override) in ARMS.items():
                if init == "noise" and (name not in NOISE_ARMS or init_override):
                    continue
                cells.append(_cell(f"{cue}-1-{init}", name, seed,
                                   (*ps.cue_flags(cue, 1.0), "--target", "photo"), init))
    for seed in SEEDS:
        cells += [_cell(f"styles-{target}", name, seed, ("--dataset", "fmnist-styles", "--target", target), "real")
                  for target in STYLE_TARGETS for name in STYLE_ARMS]
    for seed in SEEDS:
        cells += [_cell(f"{cue}-0.5-real", name, seed, (*ps.cue_flags(cue, 0.5), "--target", "photo"), "real")
                  for cue in WEAK_CUES for name in WEAK_ARMS]
    return cells


def medium_cells() -> list[ps.Cell]:
    """The medium protocol: per target, DM and each arm in its own run folder ``medium-<target>/<arm>``
    (seeds in order, resumed; the scheduler takes every folder's seed 0 before any seed 1)."""
    cells = []
    for target, lr in TUNED_DM_LR.items():
        dm = ("--target", target, "--label", "DM", "--lr-img", lr, *MEDIUM_FLAGS)
        cells.append(ps.Cell(f"medium-{target}", "dm", ("dm",), dm, MEDIUM_SEEDS))
        cells += [ps.Cell(f"medium-{target}", slug(name), (ARMS[name][0],),
                          ("--target", target, *arm_flags(name, "real", lr), *MEDIUM_FLAGS), MEDIUM_SEEDS)
                  for name in MEDIUM_ARMS]
    return cells


def lr_stage() -> str:
    return "lr-{}-1-{}".format(*LR_SETTING)


def lr_cells(out: Path, arms: int = len(LR_ARMS)) -> list[ps.Cell]:
    """The selections (``select-lr``, selection seed 10, in ``lr-<setting>/<arm>``); where a pick
    sits on an end of the grid, the step one grid ratio past it, scored the same way
    (``<arm>-edge``); then, for each arm whose pick on the longer grid is not 4, its runs at the
    pick (``<arm>-lr<pick>``, seeds 0 and 1): an arm picking 4 is its screen folder. ``arms``:
    the first so many of ``LR_ARMS``."""
    return _selection_cells(out, LR_ARMS[:arms], "", LR_SELECT)


def lodo_cells(out: Path) -> list[ps.Cell]:
    """:func:`lr_cells` with the left-out-domain rule for ``LODO_ARMS`` (``<arm>-lodo``,
    ``<arm>-lodo-edge``); the runs at a pick share their folders with :func:`lr_cells`'."""
    return _selection_cells(out, LODO_ARMS, LODO, LODO_SELECT)


def _selection_cells(out: Path, names, rule: str, select: tuple) -> list[ps.Cell]:
    cue, init = LR_SETTING
    data = (*ps.cue_flags(cue, 1.0), "--target", "photo")

    def selection(name, folder, flags):
        return ps.Cell(lr_stage(), folder, (ARMS[name][0],), (*data, *arm_flags(name, init), *flags), (10,),
                       command="select-lr")

    cells = [selection(name, f"{slug(name)}{rule}", select) for name in names]
    for name in names:
        edge = lr_edge(ps._selection(out / lr_stage() / f"{slug(name)}{rule}" / ARMS[name][0]))
        if edge is not None:
            cells.append(selection(name, f"{slug(name)}{rule}-edge", ("--select-lr", f"{edge:g}", *select[2:])))
        pick = lr_pick(out, name, rule)
        if pick is not None and pick != float(LR):
            cells.append(ps.Cell(lr_stage(), f"{slug(name)}-lr{pick:g}", (ARMS[name][0],),
                                 (*data, *arm_flags(name, init, f"{pick:g}")), SEEDS))
    return cells


def lr_edge(sel: dict | None) -> float | None:
    """One grid ratio past the end where a selection's pick sits on an end of ``LR_GRID``, else None."""
    grid = _grid()
    if sel is None or float(sel["selected_lr_img"]) not in (grid[0], grid[-1]):
        return None
    return grid[0] ** 2 / grid[1] if float(sel["selected_lr_img"]) == grid[0] else grid[-1] ** 2 / grid[-2]


def lr_selection(out: Path, name: str, rule: str = "") -> dict | None:
    """The arm's selection on the grid and, where scored, past its end: ``{"validation" {lr: %},
    "pick", "edge", "per_domain" {lr: {domain: %}} (left-out-domain rule)}``; None until the
    selection (and the edge it needs) is done. Ties keep the grid's pick. ``rule``: "" (held-out
    source images) or ``LODO``."""
    sel = ps._selection(out / lr_stage() / f"{slug(name)}{rule}" / ARMS[name][0])
    if sel is None:
        return None
    selections = [sel]
    scores = {float(k): 100 * v for k, v in sel["validation_acc"].items()}
    pick, edge = float(sel["selected_lr_img"]), lr_edge(sel)
    if edge is not None:
        past = ps._selection(out / lr_stage() / f"{slug(name)}{rule}-edge" / ARMS[name][0])
        if past is None:
            return None
        selections.append(past)
        scores.update({float(k): 100 * v for k, v in past["validation_acc"].items()})
        pick = max(sorted(scores), key=lambda v: (scores[v], v == pick))
    per_domain = {}  # the left-out-domain rule's per-fold scores (its records hold {domain: accs} per seed)
    for s in selections:
        for lr, by_seed in s.get("per_seed", {}).items():
            folds = by_seed[str(s["seeds"][0])]
            if isinstance(folds, dict):
                per_domain[float(lr)] = {d: 100 * _mean(accs) for d, accs in folds.items()}
    return {"validation": scores, "pick": pick, "edge": edge, "per_domain": per_domain}


def lr_pick(out: Path, name: str, rule: str = "") -> float | None:
    sel = lr_selection(out, name, rule)
    return None if sel is None else sel["pick"]


def runs_at(out: Path, name: str, lr: float) -> dict:
    """``{seed: {"ood", "in_domain"}}`` of the arm at ``lr_img`` on the lr setting: its
    ``-lr<lr>`` folder or, at the screen's lr, the screen's folders."""
    setting = "{}-1-{}".format(*LR_SETTING)
    found = {}
    for seed in SEEDS:
        folder = (out / lr_stage() / f"{slug(name)}-lr{lr:g}" if lr != float(LR)
                  else out / setting / f"{slug(name)}-s{seed}")
        m = ps._metrics(folder, ARMS[name][0], seed)
        if m is not None:
            found[seed] = {"ood": 100 * m["ood_acc_mean"], "in_domain": 100 * m["in_domain_acc_mean"]}
    return found


def _selection_columns(sel: dict, grid: list[float]) -> str:
    """The validation score at each grid step and past the end (bold: the pick)."""
    def score(v):
        value = sel["validation"][v]
        return f"**{value:.1f}**" if v == sel["pick"] else f"{value:.1f}"

    scores = " | ".join("—" if v not in sel["validation"] else score(v) for v in grid)
    return scores + " | " + ("—" if sel["edge"] is None else f"lr {sel['edge']:g}: {score(sel['edge'])}")


def _accuracy_at(seeds: dict) -> str:
    if not seeds:
        return "—"
    return (f"{_mean(r['ood'] for r in seeds.values()):.1f} / {_mean(r['in_domain'] for r in seeds.values()):.1f} "
            f"({len(seeds)})")


def _paired_with(seeds: dict, dm: dict):
    """The OOD difference to DM's runs seed by seed: ``(cell text, summary or None)``."""
    from sgs_cuda import stats

    diffs = [seeds[s]["ood"] - dm[s]["ood"] for s in seeds if s in dm]
    if not diffs:
        return "—", None
    summary = stats.summarize_differences(diffs)
    return f"{summary.mean:+.1f} {ps._ci(summary)}", summary


def _grid() -> list[float]:
    return [float(v) for v in LR_GRID.split(",")]


def lodo_tables(out: Path) -> tuple[str, dict]:
    """The left-out-domain selection per arm (accuracy per lr_img on the source domain each fold
    left out, the pick, the held-out-images pick beside it) and each arm at its pick, paired with
    DM at DM's pick by seed."""
    grid = _grid()
    found = {name: sel for name in LODO_ARMS if (sel := lr_selection(out, name, LODO)) is not None}
    if "DM" not in found:
        return "_not run yet_", {}
    rows = ["| arm | " + " | ".join(f"lr {v:g}" for v in grid) + " | past the end | pick (held-out images' pick) | "
            "left-out accuracy by domain at the pick | OOD / in-domain at the pick | OOD Δ vs DM, both at their "
            "left-out picks [95 % CI] |", "|---" * (len(grid) + 6) + "|"]
    numbers = {}
    dm = runs_at(out, "DM", found["DM"]["pick"])
    for name, sel in found.items():
        pick, images = sel["pick"], lr_pick(out, name)
        at_pick = sel["per_domain"].get(pick, {})
        seeds = runs_at(out, name, pick)
        paired, summary = _paired_with(seeds, dm) if name != "DM" else ("—", None)
        numbers[name] = {"lr_img": pick, "images_pick": images, "validation": sel["validation"], "per_domain": at_pick,
                         "ood_vs_dm": None if summary is None else summary.to_dict()}
        domains = ", ".join(f"{d} {a:.1f}" for d, a in at_pick.items())
        rows.append(f"| {name} | {_selection_columns(sel, grid)} | {pick:g} ({'—' if images is None else f'{images:g}'}) "
                    f"| {domains} | {_accuracy_at(seeds)} | {paired} |")
    return "\n".join(rows), numbers


def lr_tables(out: Path, screen: dict) -> tuple[str, dict]:
    """The per-arm selection on held-out source images (validation accuracy per lr_img, the pick)
    and each arm at its pick (its ``-lr<pick>`` folder or, at 4, the screen's) paired with DM at
    DM's pick (same seed), with the screen's pairing at lr 4 (``screen``: :func:`collect`'s rows)
    beside it."""
    grid = _grid()
    found = {name: sel for name in LR_ARMS if (sel := lr_selection(out, name)) is not None}
    if "DM" not in found:
        return "_not run yet_", {}
    rows = ["| arm | " + " | ".join(f"lr {v:g}" for v in grid) + " | past the end | pick | OOD / in-domain at the "
            "pick | OOD Δ vs DM, both at their picks [95 % CI] | OOD Δ at lr 4 (the screen) |",
            "|---" * (len(grid) + 6) + "|"]
    numbers = {}
    setting = "{}-1-{}".format(*LR_SETTING)
    dm = runs_at(out, "DM", found["DM"]["pick"])
    for name, sel in found.items():
        seeds = runs_at(out, name, sel["pick"])
        paired = at4 = "—"
        if name != "DM":
            paired, summary = _paired_with(seeds, dm)
            if summary is not None:
                numbers[name] = {"lr_img": sel["pick"], "ood_vs_dm": summary.to_dict()}
            base4 = screen.get("DM", {}).get(setting, {})
            own4 = screen.get(name, {}).get(setting, {})
            d4 = [own4[s]["ood"] - base4[s]["ood"] for s in own4 if s in base4]
            at4 = "—" if not d4 else f"{_mean(d4):+.1f}"
        rows.append(f"| {name} | {_selection_columns(sel, grid)} | {sel['pick']:g} | {_accuracy_at(seeds)} | {paired} "
                    f"| {at4} |")
    numbers["DM"] = {"lr_img": found["DM"]["pick"]}
    return "\n".join(rows), numbers


def collect(out: Path) -> dict:
    """``{arm: {setting: {seed: {"ood", "in_domain", "seconds", "truth"}}}}`` from the finished cells."""
    found: dict = {}
    for cell in all_cells():
        method, seed = cell.methods[0], cell.seeds[0]
        m = ps._metrics(cell.folder(out), method, seed)
        if m is None:
            continue
        arm = arm_of(cell)
        row = {"ood": 100 * m["ood_acc_mean"], "in_domain": 100 * m["in_domain_acc_mean"],
               "seconds": m.get("distill_seconds")}
        if method == "dm_sgs":
            row["truth"] = ps.truth_summary(ps._history(cell.folder(out), method, seed))
        found.setdefault(arm, {}).setdefault(cell.stage, {})[seed] = row
    return found


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


PREMISE_SETTINGS = [f"{c}-1-{i}" for c, i in SETTINGS]
STYLE_SETTINGS = [f"styles-{t}" for t in STYLE_TARGETS]
WEAK_SETTINGS = [f"{c}-0.5-real" for c in WEAK_CUES]


def tables(found: dict, settings: list[str] = PREMISE_SETTINGS, truth: bool = True) -> tuple[str, dict]:
    """Each arm's OOD / in-domain mean per setting (and, on the premise benchmark, the mask against
    the truth), then each arm paired with DM (same setting and seed): the mean difference per
    setting and, pooled over the settings and seeds, its 95 % interval."""
    from sgs_cuda import stats

    if not any(st in found.get("DM", {}) for st in settings):
        return "_not run yet_", {}
    arms = [a for a in ARMS if any(st in found.get(a, {}) for st in settings)]
    lines = ["| arm | " + " | ".join(settings) + (" | cue / other bins kept % (real init) |" if truth else " |"),
             "|---" * (len(settings) + 1 + truth) + "|"]
    numbers = {"accuracy": {a: {st: found[a][st] for st in settings if st in found[a]} for a in arms}, "paired": {}}
    for arm in arms:
        cells = []
        for st in settings:
            rows = found[arm].get(st, {})
            cells.append("—" if not rows else f"{_mean(r['ood'] for r in rows.values()):.1f} / "
                         f"{_mean(r['in_domain'] for r in rows.values()):.1f} ({len(rows)})")
        if truth:
            seen = [r["truth"] for st in settings if st.endswith("real") for r in found[arm].get(st, {}).values()
                    if r.get("truth")]
            cells.append("—" if not seen else
                         f"{_mean(t['cue'] for t in seen):.1f} / {_mean(t['other'] for t in seen):.1f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    diff = ["| arm − DM | " + " | ".join(f"OOD Δ {st}" for st in settings)
            + " | OOD Δ pooled [95 % CI] | ahead | in-domain Δ pooled [95 % CI] |",
            "|---" * (len(settings) + 4) + "|"]
    for arm in arms[1:] if arms and arms[0] == "DM" else arms:
        pairs = {"ood": ({}, {}), "in_domain": ({}, {})}
        for st in settings:
            for seed, r in found[arm].get(st, {}).items():
                base = found["DM"].get(st, {}).get(seed)
                if base is not None:
                    for key in pairs:
                        pairs[key][0].setdefault(st, {})[seed] = base[key]
                        pairs[key][1].setdefault(st, {})[seed] = r[key]
        if not pairs["ood"][0]:
            continue
        res = {k: stats.compare(*v) for k, v in pairs.items()}
        o, i = res["ood"]["pooled"], res["in_domain"]["pooled"]
        numbers["paired"][arm] = {k: v["pooled"].to_dict() for k, v in res.items()}
        per = [f"{res['ood']['per_target'][st]['summary'].mean:+.1f}" if st in res["ood"]["per_target"] else "—"
               for st in settings]
        diff.append(f"| {arm} | " + " | ".join(per) + f" | {o.mean:+.1f} {ps._ci(o)} | {o.positive}/{o.n} | "
                    f"{i.mean:+.1f} {ps._ci(i)} |")
    return ("\n".join(lines) + "\n\nPaired with DM (same setting and seed):\n\n" + "\n".join(diff)), numbers


def cue_visibility(per_class: int = 300) -> str:
    """Is the cue visible to first-order (mean) spectral statistics? Per source domain and class:
    ``|mean_i F_i| / mean_i |F_i|`` at the class's own cue bin (its largest-amplitude truth bin)
    against the median over the non-cue bins; a phase-random cue cancels in the mean."""
    import torch

    from sgs_cuda.data import load_dataset

    rows = []
    for cue in ("grating", "patch"):
        data = load_dataset("fmnist-cues", cue=cue, cue_strength=1.0)
        own, rest = [], []
        for d in data.domains:
            if d == data.cue_free:
                continue
            for c in range(len(data.classes)):
                spec = torch.fft.rfft2(data.real_batch(d, c, per_class, generator=torch.Generator().manual_seed(0))
                                       .double())
                first, amp = spec.mean(0).abs().sum(0), spec.abs().mean(0).sum(0)
                b = torch.where(data.cue_bins, amp, torch.zeros_like(amp)).flatten().argmax()
                own.append((first.flatten()[b] / amp.flatten()[b]).item())
                rest.append((first[~data.cue_bins] / amp[~data.cue_bins]).median().item())
        rows.append(f"| {cue} | {_mean(own):.3f} | {_mean(rest):.3f} | {len(own)} |")
    return ("| cue | own cue bin: abs(class-mean spectrum) / class-mean amplitude | other bins (median) | "
            "class-domains |\n|---|---|---|---|\n" + "\n".join(rows))


# --- the medium protocol ---------------------------------------------------------------------

def tuned_baselines(path: Path) -> dict:
    """The tuned study's DM and M3D, ``{arm: {"ood" | "in_domain": {target: {seed: %}}}}``, from its
    numbers (``docs/results/tuned-medium.json``)."""
    comparisons = json.loads(path.read_text())["comparisons"]
    found = {}
    for arm, where in (("DM (tuned)", comparisons["dm"]["arms"]["DM"]),
                       ("M3D (tuned)", comparisons["m3d_vs_dm"]["arms"]["M3D"])):
        acc = where["accuracy"]
        found[arm] = {key: {t: {int(seed): v for seed, v in by_seed.items()} for t, by_seed in acc[name].items()}
                      for key, name in (("ood", "ood_acc_mean"), ("in_domain", "in_domain_acc_mean"))}
    return found


def medium_arm_of(cell: ps.Cell) -> str:
    """The arm a medium cell runs (its run folder is the arm's slug)."""
    return next(a for a in ("DM", *MEDIUM_ARMS) if slug(a) == cell.name)


def medium_collect(out: Path) -> dict:
    """This study's medium runs, ``{arm: {"ood" | "in_domain": {target: {seed: %}}}}``."""
    found: dict = {}
    for cell in medium_cells():
        arm, target = medium_arm_of(cell), cell.stage.removeprefix("medium-")
        for seed in cell.seeds:
            m = ps._metrics(cell.folder(out), cell.methods[0], seed)
            if m is not None:
                for key in ("ood", "in_domain"):
                    found.setdefault(arm, {}).setdefault(key, {}).setdefault(target, {})[seed] = \
                        100 * m[f"{key}_acc_mean"]
    return found


def medium_tables(out: Path, tuned_path: Path) -> tuple[str, dict]:
    """The two formulations on the medium protocol: accuracy per target, then each paired with DM
    run by this code (same target and seed), per target and pooled with 95 % intervals; beside it,
    each against the tuned study's M3D, and DM's rerun against the tuned study's DM (how far the
    code has moved the same protocol since). The tuned study drew other random streams (the loop's
    were unified after it), so its seeds do not pair with these: those differences are per target,
    over the seed means, the interval over the targets."""
    from sgs_cuda import stats

    found, tuned = medium_collect(out), tuned_baselines(tuned_path)
    if "DM" not in found or not any(a in found for a in MEDIUM_ARMS):
        return "_not run yet_", {}
    arms = [a for a in MEDIUM_ARMS if a in found]
    targets = list(TUNED_DM_LR)
    accuracy = {**{a: found[a] for a in ("DM", *arms)}, **tuned}
    rows = ["| arm | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for arm, acc in accuracy.items():
        cells = []
        for t in targets:
            ood, ind = acc["ood"].get(t, {}), acc["in_domain"].get(t, {})
            cells.append("—" if not ood else f"{_mean(ood.values()):.1f} / {_mean(ind.values()):.1f} ({len(ood)})")
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    numbers: dict = {"accuracy": accuracy, "paired": {}}
    diff = ["| arm − baseline | " + " | ".join(f"OOD Δ {t}" for t in targets)
            + " | OOD Δ pooled [95 % CI] | ahead | in-domain Δ pooled [95 % CI] |",
            "|---" * (len(targets) + 4) + "|"]
    for arm, baseline in [(a, "DM") for a in arms] + [(a, "M3D (tuned)") for a in arms] + [("DM", "DM (tuned)")]:
        if baseline == "DM":  # the same random streams: paired by target and seed
            res = {k: stats.compare(accuracy[baseline][k], accuracy[arm][k]) for k in ("ood", "in_domain")}
            per_target = {t: r["summary"].mean for t, r in res["ood"]["per_target"].items()}
            o, i = res["ood"]["pooled"], res["in_domain"]["pooled"]
        else:  # the tuned study's runs drew other random streams: their seeds are no pairs, targets are
            seed_means = {k: ({t: _mean(v.values()) for t, v in accuracy[baseline][k].items()},
                              {t: _mean(v.values()) for t, v in accuracy[arm][k].items()}) for k in ("ood", "in_domain")}
            diffs = {k: {t: b[t] - a[t] for t in a if t in b} for k, (a, b) in seed_means.items()}
            per_target = diffs["ood"]
            o, i = (stats.summarize_differences(list(diffs[k].values())) for k in ("ood", "in_domain"))
        if not o.n:
            continue
        numbers["paired"][f"{arm} - {baseline}"] = {"ood": o.to_dict(), "in_domain": i.to_dict()}
        per = [f"{per_target[t]:+.1f}" if t in per_target else "—" for t in targets]
        diff.append(f"| {arm} − {baseline} | " + " | ".join(per) + f" | {o.mean:+.1f} {ps._ci(o)} | "
                    f"{o.positive}/{o.n} | {i.mean:+.1f} {ps._ci(i)} |")
    return ("\n".join(rows) + "\n\nPaired with DM by target and seed (the same random streams); with the tuned "
            "study's runs (earlier random streams) by target, over the seed means:\n\n" + "\n".join(diff)), numbers


def _real_band_amplitude(data, domains, classes, per_class: int = 100, bins_of=None) -> dict:
    """Per class: the source domains' band amplitudes ``[domains, bands]`` (or, with ``bins_of``,
    their mean amplitude over ``bins_of(class)``, ``[domains, 1]``), from ``per_class`` real
    training images of each domain."""
    import torch

    from sgs_cuda.dm.bands import band_amplitude

    def amplitude(d, c):
        batch = data.real_batch(d, c, per_class, generator=torch.Generator().manual_seed(c))
        return band_amplitude(batch, bins=None if bins_of is None else bins_of(c))

    return {c: torch.stack([amplitude(d, c) for d in domains]) for c in classes}


def medium_bands(out: Path) -> tuple[str, dict]:
    """Where each arm's distilled set sits in amplitude per radial band, against its real source
    images: per set, class by class, the set's mean amplitude over the source domains' mean
    (1: the sources' level), averaged over classes, targets and seeds; the source domains' own
    spread as the reference (their lowest and highest, each over the domains' mean)."""
    import torch

    from sgs_cuda.data import load_dataset
    from sgs_cuda.dm.bands import band_amplitude, band_labels

    data = load_dataset("fmnist-styles")
    classes = range(len(data.classes))
    ratios: dict = {}
    spread = []
    for target in TUNED_DM_LR:
        sources = [d for d in data.domains if d != target]
        real = _real_band_amplitude(data, sources, classes)
        spread.append(torch.stack([real[c] / real[c].mean(0) for c in classes]).mean(0))  # [domains, bands]
        for cell in (c for c in medium_cells() if c.stage == f"medium-{target}"):
            arm = medium_arm_of(cell)
            for seed in cell.seeds:
                path = cell.folder(out) / cell.methods[0] / f"seed{seed}" / "synthetic.pt"
                if not path.is_file():
                    continue
                saved = torch.load(path, map_location="cpu", weights_only=False)
                per_class = [band_amplitude(saved["images"][saved["labels"] == c]) / real[c].mean(0) for c in classes]
                ratios.setdefault(arm, []).append(torch.stack(per_class).mean(0))
    if not ratios:
        return "_not run yet_", {}
    labels = band_labels()
    domains = torch.cat(spread)
    numbers = {"bands": labels, "sources_min": domains.min(0).values.tolist(),
               "sources_max": domains.max(0).values.tolist(),
               "arms": {a: {"mean": torch.stack(r).mean(0).tolist(), "sets": len(r)} for a, r in ratios.items()}}
    rows = ["| set | " + " | ".join(f"band {b}" for b in labels) + " | sets |", "|---" * (len(labels) + 2) + "|",
            "| a source domain (lowest / highest) | " + " | ".join(
                f"{lo:.2f} / {hi:.2f}" for lo, hi in zip(numbers["sources_min"], numbers["sources_max"])) + " | |"]
    for arm, n in numbers["arms"].items():
        rows.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in n["mean"]) + f" | {n['sets']} |")
    return "\n".join(rows), numbers


TRUTH_ARMS = ("DM", "SGS (spec)", "DM + amplitude removal (5e-3)", "DM, spectral init", "DM, spectral_min init")


def amplitude_truth(out: Path) -> tuple[str, dict]:
    """The removal against the truth, on the premise benchmark (strength 1): per distilled set and
    class, its mean amplitude on the class's own cue bins over the real source images' there,
    and the same on the bins no cue touches (DC left out); 1 keeps the sources' level. A set that
    takes the cue out has the first well below the second."""
    import torch

    from sgs_cuda.data import load_dataset
    from sgs_cuda.dm.bands import band_amplitude

    numbers: dict = {}
    for cue, init in SETTINGS:
        setting = f"{cue}-1-{init}"
        data = load_dataset("fmnist-cues", cue=cue, cue_strength=1.0)
        sources = [d for d in data.domains if d != data.cue_free]
        own = data.class_cue_bins(sources)
        classes = range(len(data.classes))
        groups = {"cue": lambda c: own[c], "other": lambda c: ~data.cue_bins}  # per class: its bins
        real = {g: _real_band_amplitude(data, sources, classes, bins_of=bins_of) for g, bins_of in groups.items()}
        for arm in TRUTH_ARMS:
            for seed in SEEDS:
                folder = out / setting / f"{slug(arm)}-s{seed}"
                path = folder / ARMS[arm][0] / f"seed{seed}" / "synthetic.pt"
                if not path.is_file():
                    continue
                saved = torch.load(path, map_location="cpu", weights_only=False)
                for group, bins_of in groups.items():
                    value = _mean([(band_amplitude(saved["images"][saved["labels"] == c], bins=bins_of(c))
                                    / real[group][c].mean(0)).item() for c in classes])
                    numbers.setdefault(arm, {}).setdefault(setting, {}).setdefault(group, []).append(value)
    if not numbers:
        return "_not run yet_", {}
    settings = [f"{c}-1-{i}" for c, i in SETTINGS]
    rows = ["| arm | " + " | ".join(f"{st}: cue / other bins" for st in settings) + " |",
            "|---" * (len(settings) + 1) + "|"]
    for arm, per in numbers.items():
        rows.append(f"| {arm} | " + " | ".join(
            "—" if st not in per else f"{_mean(per[st]['cue']):.2f} / {_mean(per[st]['other']):.2f}"
            for st in settings) + " |")
    return "\n".join(rows), numbers


def amplitude_figure(bands: dict, truth: dict, path: Path) -> Path | None:
    """Left: each arm's set per band over its sources (medium, fmnist-styles), with the source
    domains' range; right: the premise benchmark's cue-bin and other-bin levels per arm."""
    from matplotlib.figure import Figure

    if not bands and not truth:
        return None
    fig = Figure(figsize=(10, 3.4), dpi=110)
    left, right = fig.subplots(1, 2)
    if bands:
        x = range(len(bands["bands"]))
        left.fill_between(x, bands["sources_min"], bands["sources_max"], color="grey", alpha=0.25,
                          label="source domains (range)")
        for arm, n in bands["arms"].items():
            left.plot(x, n["mean"], "o-", label=f"{arm} ({n['sets']} sets)")
        left.axhline(1, color="grey", lw=0.8, ls=":")
        left.set_xticks(list(x), bands["bands"], fontsize=7)
        left.set_xlabel("normalised radius band", fontsize=8)
        left.set_ylabel("amplitude / source domains' mean", fontsize=8)
        left.set_title("medium, fmnist-styles: the sets per band", fontsize=9)
        left.legend(fontsize=7)
    if truth:
        settings = sorted({st for per in truth.values() for st in per})
        width = 0.8 / max(1, len(truth))
        for k, (arm, per) in enumerate(truth.items()):
            xs = [i + k * width for i, st in enumerate(settings) if st in per]
            ratio = [_mean(per[st]["cue"]) / _mean(per[st]["other"]) for st in settings if st in per]
            right.bar(xs, ratio, width, label=arm)
        right.axhline(1, color="grey", lw=0.8, ls=":")
        right.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))], settings, fontsize=7)
        right.set_ylabel("cue-bin level / other-bin level", fontsize=8)
        right.set_title("premise benchmark (quick): the cue kept, against the truth", fontsize=9)
        right.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def study_cost(out: Path) -> tuple[str, dict]:
    """What the study cost: per stage, the distillation and evaluation seconds of every finished
    seed (``metrics.json``) and of every lr selection (``lr_selection.json``), one thread each."""
    stages = {"screen (quick)": all_cells(), "lr_img per arm (quick)": lr_cells(out),
              "lr_img by left-out domain (quick)": lodo_cells(out), "medium": medium_cells()}
    numbers = {}
    for stage, cells in stages.items():
        seconds, runs = 0.0, 0
        for folder in {c.folder(out) for c in cells}:
            metrics = folder / "metrics.json"
            if metrics.is_file():
                for r in json.loads(metrics.read_text())["methods"].values():
                    seconds += r.get("distill_seconds", 0.0) + r.get("eval_seconds", 0.0)
                    runs += len(r.get("seeds", []))
            for selection in folder.glob("*/lr_selection.json"):
                seconds += json.loads(selection.read_text()).get("seconds", 0.0)
                runs += 1
        numbers[stage] = {"runs": runs, "cpu_hours": seconds / 3600}
    rows = [f"| {stage} | {n['runs']} | {n['cpu_hours']:.1f} |" for stage, n in numbers.items()]
    total = sum(n["cpu_hours"] for n in numbers.values())
    return ("| stage | runs (seeds and selections) | CPU-hours (one thread each) |\n|---|---|---|\n"
            + "\n".join(rows) + f"\n| all | {sum(n['runs'] for n in numbers.values())} | {total:.1f} |"), numbers


def cost_table(path: Path) -> str:
    """The side-by-side cost measured by ``bench_formulations.py`` (its JSON), as a table."""
    if not path.is_file():
        return "_not measured yet_"
    bench = json.loads(path.read_text())
    rows = [f"| {name} | {r['seconds_per_iteration']:.3f} | {r['ratio_to_dm']:.2f} |" for name, r in bench["arms"].items()]
    return (f"Seconds per distillation iteration at the quick preset's shapes ({bench['machine']}, "
            f"{bench['threads']} thread, median of {bench['rounds']} rounds, {bench['date']}"
            + (f"; {bench['note']}" if bench.get("note") else "") + "):\n\n"
            "| arm | s / iteration | × DM |\n|---|---|---|\n" + "\n".join(rows))


def cmd_report(args) -> None:
    out, docs = Path(args.out), Path(args.docs)
    found = collect(out)
    blocks, numbers = {}, {}
    blocks["formulations"], numbers["premise"] = tables(found)
    blocks["formulations-styles"], numbers["styles"] = tables(found, STYLE_SETTINGS, truth=False)
    blocks["formulations-weak"], numbers["weak"] = tables(found, WEAK_SETTINGS)
    blocks["formulations-cost"] = cost_table(docs / "results" / "formulations-cost.json")
    blocks["formulations-visibility"] = cue_visibility()
    blocks["formulations-medium"], numbers["medium"] = medium_tables(out, docs / "results" / "tuned-medium.json")
    blocks["formulations-medium-bands"], numbers["medium_bands"] = medium_bands(out)
    blocks["formulations-amplitude-truth"], numbers["amplitude_truth"] = amplitude_truth(out)
    blocks["formulations-lr"], numbers["lr"] = lr_tables(out, found)
    blocks["formulations-lodo"], numbers["lodo"] = lodo_tables(out)
    blocks["formulations-study-cost"], numbers["study_cost"] = study_cost(out)
    amplitude_figure(numbers["medium_bands"], numbers["amplitude_truth"], docs / "formulations_amplitude.png")
    numbers.update(machine=ps.machine(), date=time.strftime("%Y-%m-%d"), preset=ps.PRESET, lr_img=LR,
                   command=" ".join(sys.argv))
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "results" / "formulations-quick.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    if args.results:
        path = Path(args.results)
        path.write_text(ps.replace_blocks(path.read_text(), blocks))
    else:
        for name, body in blocks.items():
            print(f"## {name}\n{body}\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = ps.add_run_arguments(sub.add_parser("run", help="run the cells (resumable)"), "runs/formulations")
    run.add_argument("--stage", choices=("screen", "medium", "lr", "lr+medium", "lodo"), default="screen",
                     help="the quick screen (every arm), the medium protocol (the two best), lr_img per arm (the "
                          "selections, then the runs at the picks that moved), both of the last, seed by seed, or "
                          "lr_img by leaving each source domain out (LODO_ARMS)")
    run.add_argument("--lr-arms", type=int, default=len(LR_ARMS),
                     help="lr stage: the first so many arms of LR_ARMS (their order is their priority)")
    rep = sub.add_parser("report", help="tables from the finished cells")
    rep.add_argument("--out", default="runs/formulations")
    rep.add_argument("--docs", default=str(ps.REPO / "docs"))
    rep.add_argument("--results", help="markdown file whose <!-- premise:formulations --> block is replaced")
    args = p.parse_args(argv)
    if args.command == "run":
        out = Path(args.out)
        stages = {"screen": all_cells, "medium": medium_cells, "lr": lambda: lr_cells(out, args.lr_arms),
                  "lr+medium": lambda: lr_cells(out, args.lr_arms) + medium_cells(), "lodo": lambda: lodo_cells(out)}
        ps.cmd_run(args, stages[args.stage])  # a function: the runs at the lr picks join once selected
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
