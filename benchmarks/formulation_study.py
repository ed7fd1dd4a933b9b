"""Surgery formulations that could carry the premise: the first filter of issue 18 on the premise
benchmark (``fmnist-cues``, strong cue, target ``photo``, the ``quick`` preset), each formulation
alone, with the mask against the cue's ground truth.

    python benchmarks/formulation_study.py run    --out runs/formulations --code <snapshot>   # resumable
    python benchmarks/formulation_study.py report --out runs/formulations --results docs/RESULTS.md

Arms (``ARMS``: an :class:`~sgs_cuda.options.SGSConfig` each, or DM with another initialisation):
DM; DM+SGS with the spec's formulation; agreement over time (``ema``), over a class (``pool``),
the equal-energy magnitude test (``equalize`` with ``rho`` 0.5), replace instead of augment
(``mean_weight`` 0 at the DM step), per-bin PCGrad, removal (``decay``), agreement on class content
(``agree_on="contrast"``), diversity within the set (``spread``), DM with amplitude removal (``amp_decay``); and DM from the spectral
initialisations. ``lr_img`` is DM's selected value on this benchmark (4, ``premise_study``) for
every arm: a first filter, not a tuned comparison. Settings (``SETTINGS``): both cue families at
strength 1 with real initialisation for every arm; noise initialisation for the arms where it is
part of the question (DM, the spec, removal, replace, over time). Seeds 0 and 1.

The scheduler is ``premise_study``'s (one job per run folder at a time, ``--jobs`` at once, one
thread each, ``<out>/STOP`` to stop); the report pairs each arm with DM per setting and seed
(95 % Student-t intervals, pooled over settings and seeds) and averages the mask-against-truth
fractions over the second half of training.
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


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def arm_flags(name: str, init: str) -> tuple[str, ...]:
    method, sgs, init_override = ARMS[name]
    flags = ["--init", init_override or init, "--lr-img", LR, "--label", name]
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
    ps.add_run_arguments(sub.add_parser("run", help="run the cells (resumable)"), "runs/formulations")
    rep = sub.add_parser("report", help="tables from the finished cells")
    rep.add_argument("--out", default="runs/formulations")
    rep.add_argument("--docs", default=str(ps.REPO / "docs"))
    rep.add_argument("--results", help="markdown file whose <!-- premise:formulations --> block is replaced")
    args = p.parse_args(argv)
    if args.command == "run":
        ps.cmd_run(args, all_cells())
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
