"""benchmarks/formulation_study.py: every cell's command parses into the configuration it names,
and the report's tables from run folders (no runs)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sgs_cuda import SGSConfig, cli, config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("formulation_study", BENCH / "formulation_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cell_resolves_to_its_arm(study, tmp_path):
    cells = study.all_cells()
    assert len({(c.stage, c.name) for c in cells}) == len(cells)
    parser = cli.build_parser()
    for cell in cells:
        arm = study.arm_of(cell)
        method, sgs, init = study.ARMS[arm]
        args = parser.parse_args(cell.argv(tmp_path, cell.seeds[0])[3:])
        cfg = config.resolve_config(preset=args.preset, overrides=cli.overrides_from_args(args))
        assert cfg["methods"] == [method] and cfg["distill"]["lr_img"] == 4.0
        styles = cell.stage.startswith("styles-")
        assert cfg["dataset"] == ("fmnist-styles" if styles else "fmnist-cues")
        assert cfg["distill"]["init"] == (init or ("real" if styles else cell.stage.rsplit("-", 1)[1]))
        if sgs is not None:
            assert SGSConfig(**cfg["sgs"]) == sgs
    # every arm on the real-initialised settings of both cue families, seed 0 before seed 1
    real = {(c.stage, study.arm_of(c)) for c in cells if c.stage.endswith("-1-real")}
    weak = {(c.stage, study.arm_of(c)) for c in cells if c.stage.endswith("-0.5-real")}
    assert weak == {(f"{cue}-0.5-real", a) for cue in study.WEAK_CUES for a in study.WEAK_ARMS}
    assert real == {(f"{cue}-1-real", a) for cue in ("grating", "patch") for a in study.ARMS}
    premise = [c.seeds[0] for c in cells if "-1-" in c.stage]
    assert premise == sorted(premise)  # every arm's seed 0 first: a partial run is a whole screen
    styles = {(c.stage, study.arm_of(c)) for c in cells if c.stage.startswith("styles-")}
    assert styles == {(f"styles-{t}", a) for t in study.STYLE_TARGETS for a in study.STYLE_ARMS}


def test_report_pairs_each_arm_with_dm(study, tmp_path):
    cells = [c for c in study.all_cells() if c.stage == "grating-1-real"]
    for cell in cells:
        arm = study.arm_of(cell)
        method = study.ARMS[arm][0]
        seed = cell.seeds[0]
        ood = 0.40 + (0.02 if arm == "SGS (spec)" else 0.0) + 0.01 * seed
        p = tmp_path / cell.stage / cell.name / method / f"seed{seed}" / "metrics.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"ood_acc_mean": ood, "in_domain_acc_mean": 0.8, "distill_seconds": 40.0}))
    text, numbers = study.tables(study.collect(tmp_path))
    assert "| SGS (spec) | +2.0 | — | — | +2.0 [+2.0, +2.0] | 2/2 |" in text
    assert numbers["paired"]["over time (ema 0.9)"]["ood"]["mean"] == pytest.approx(0.0)
    assert study.tables({})[0] == "_not run yet_"
    assert study.tables(study.collect(tmp_path), study.STYLE_SETTINGS, truth=False)[0] == "_not run yet_"
    assert study.cost_table(tmp_path / "none.json") == "_not measured yet_"


def test_medium_cells_run_the_tuned_protocol(study, tmp_path):
    cells = study.medium_cells()
    parser = cli.build_parser()
    seen = set()
    for cell in cells:
        target = cell.stage.removeprefix("medium-")
        args = parser.parse_args(cell.argv(tmp_path, cell.seeds[-1])[3:])
        cfg = config.resolve_config(preset=args.preset, overrides=cli.overrides_from_args(args))
        assert args.preset == "medium" and cfg["distill"]["iterations"] == 1000
        assert cfg["dataset"] == "fmnist-styles" and cfg["target"] == target
        assert cfg["eval"]["target_split"] == "test"  # the tuned study's scoring, so the pairs are like for like
        assert cfg["distill"]["lr_img"] == float(study.TUNED_DM_LR[target])
        assert args.seeds == [str(s) for s in cell.seeds] or args.seeds == list(cell.seeds)
        arm = study.medium_arm_of(cell)
        method, sgs, init = study.ARMS[arm]
        assert cfg["methods"] == [method] and cfg["distill"]["init"] == (init or "real")
        if sgs is not None:
            assert SGSConfig(**cfg["sgs"]) == sgs
        seen.add((target, arm))
    assert seen == {(t, a) for t in study.TUNED_DM_LR for a in ("DM", *study.MEDIUM_ARMS)}


def _tuned_json(path, ood_dm, ood_m3d):
    def acc(values):
        return {"ood_acc_mean": {t: {str(s): v for s, v in enumerate(values)} for t in ("photo", "sketch")},
                "in_domain_acc_mean": {t: {str(s): 60.0 for s in range(len(values))} for t in ("photo", "sketch")}}
    path.write_text(json.dumps({"comparisons": {"dm": {"arms": {"DM": {"accuracy": acc(ood_dm)}}},
                                                "m3d_vs_dm": {"arms": {"M3D": {"accuracy": acc(ood_m3d)}}}}}))
    return path


def test_medium_report_pairs_with_dm_and_the_tuned_study(study, tmp_path):
    tuned = _tuned_json(tmp_path / "tuned.json", [50.0, 52.0, 54.0], [51.0, 51.0, 51.0])
    assert study.medium_tables(tmp_path, tuned)[0] == "_not run yet_"
    arm = "DM, spectral_min init"
    for name, ood in (("DM", lambda seed: 0.49 + 0.02 * seed), (arm, lambda seed: (52.0 + seed) / 100)):
        for target in ("photo", "sketch"):
            for seed in (0, 1, 2):
                p = tmp_path / f"medium-{target}" / study.slug(name) / "dm" / f"seed{seed}" / "metrics.json"
                p.parent.mkdir(parents=True)
                p.write_text(json.dumps({"ood_acc_mean": ood(seed), "in_domain_acc_mean": 0.61}))
    text, numbers = study.medium_tables(tmp_path, tuned)
    # against DM rerun, seed by seed: 52-49, 53-51, 54-53 = +3, +2, +1 per target (6 pairs)
    paired = numbers["paired"]
    assert paired[f"{arm} - DM"]["ood"]["mean"] == pytest.approx(2.0) and paired[f"{arm} - DM"]["ood"]["n"] == 6
    assert paired[f"{arm} - DM"]["ood"]["sd"] > 0
    assert paired[f"{arm} - DM"]["in_domain"]["mean"] == pytest.approx(0.0)
    # against the tuned study's runs, target by target over the seed means (n = targets): 53 - 51 = +2
    assert paired[f"{arm} - M3D (tuned)"]["ood"]["mean"] == pytest.approx(2.0)
    assert paired[f"{arm} - M3D (tuned)"]["ood"]["n"] == 2
    assert paired["DM - DM (tuned)"]["ood"]["mean"] == pytest.approx(-1.0)  # 51 against 52, on both targets
    assert f"| {arm} − M3D (tuned) | +2.0 | — | +2.0 | — | +2.0 [+2.0, +2.0] | 2/2 |" in text
    assert f"| {arm} − DM | +2.0 | — | +2.0 | — | +2.0 [" in text


def test_medium_bands_read_the_sets_against_their_sources(study, tmp_path):
    import torch

    from sgs_cuda.data import load_dataset

    data = load_dataset("fmnist-styles")
    sources = [d for d in data.domains if d != "photo"]
    labels = torch.arange(10).repeat_interleave(4)
    real = torch.cat([data.real_batch(sources[c % 3], c, 4, generator=torch.Generator().manual_seed(99))
                      for c in range(10)])
    for name, images in (("dm", real), (study.slug("DM, spectral_min init"), torch.zeros_like(real))):
        method = "dm"
        p = tmp_path / "medium-photo" / name / method / "seed0" / "synthetic.pt"
        p.parent.mkdir(parents=True)
        torch.save({"images": images, "labels": labels}, p)
    text, numbers = study.medium_bands(tmp_path)
    zero, like_real = numbers["arms"]["DM, spectral_min init"], numbers["arms"]["DM"]
    assert zero["mean"] == [0.0] * 4 and zero["sets"] == 1
    assert all(0.5 < v < 1.5 for v in like_real["mean"])  # real source images sit at about the sources' level
    assert all(lo <= 1 <= hi for lo, hi in zip(numbers["sources_min"], numbers["sources_max"]))
    assert study.amplitude_figure(numbers, {}, tmp_path / "fig.png").is_file()


def test_lr_stage_selects_per_arm_then_runs_the_moved_picks(study, tmp_path):
    parser = cli.build_parser()
    cells = study.lr_cells(tmp_path)
    assert [c.command for c in cells] == ["select-lr"] * len(study.LR_ARMS)  # no pick yet: selections only
    for cell in cells:
        args = parser.parse_args(cell.argv(tmp_path, 10)[3:])
        cfg = config.resolve_config(preset=args.preset, overrides=cli.overrides_from_args(args))
        assert cfg["select"]["lr_grid"] == [2.0, 4.0, 8.0, 16.0] and cfg["select"]["seeds"] == [10]
        arm = next(a for a in study.ARMS if study.slug(a) == cell.name)
        assert cfg["methods"] == [study.ARMS[arm][0]] and cfg["dataset"] == "fmnist-cues"

    def select(name, scores, folder=None):
        method = study.ARMS[name][0]
        p = tmp_path / study.lr_stage() / (folder or study.slug(name)) / method / "lr_selection.json"
        p.parent.mkdir(parents=True)
        best = max(scores, key=scores.get)
        p.write_text(json.dumps({"selected_lr_img": best, "validation_acc": {str(float(k)): v for k, v in scores.items()}}))

    def metrics(folder, name, seed, ood):
        p = folder / study.ARMS[name][0] / f"seed{seed}" / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"ood_acc_mean": ood, "in_domain_acc_mean": 0.7}))

    amp, init = "DM + amplitude removal (5e-3)", "DM, spectral_min init"
    select("DM", {2: 0.5, 4: 0.6, 8: 0.7, 16: 0.65})  # DM moves to 8
    select(amp, {2: 0.5, 4: 0.6, 8: 0.55, 16: 0.5})  # stays at 4: its screen folder
    select(init, {2: 0.7, 4: 0.6, 8: 0.55, 16: 0.5})  # on the grid's lower end: lr 1 is scored before any run
    cells = study.lr_cells(tmp_path)
    edge = [c for c in cells if c.name.endswith("-edge")]
    assert [(c.name, c.command) for c in edge] == [(f"{study.slug(init)}-edge", "select-lr")]
    assert edge[0].flags[edge[0].flags.index("--select-lr") + 1] == "1"
    assert study.lr_pick(tmp_path, init) is None  # until the edge is scored
    best = [c for c in cells if c.command == "run"]
    assert [(c.name, c.seeds) for c in best] == [("dm-lr8", tuple(study.SEEDS))]
    assert best[0].flags[best[0].flags.index("--lr-img") + 1] == "8"
    select(init, {1: 0.72}, folder=f"{study.slug(init)}-edge")  # the curve still rises past the end
    assert study.lr_pick(tmp_path, init) == 1.0
    assert [c.name for c in study.lr_cells(tmp_path) if c.command == "run"] == ["dm-lr8", f"{study.slug(init)}-lr1"]
    for seed in study.SEEDS:
        metrics(tmp_path / study.lr_stage() / "dm-lr8", "DM", seed, 0.42)
        metrics(tmp_path / "grating-1-real" / f"dm-s{seed}", "DM", seed, 0.40)
        metrics(tmp_path / "grating-1-real" / f"{study.slug(amp)}-s{seed}", amp, seed, 0.45 + 0.01 * seed)
    text, numbers = study.lr_tables(tmp_path, study.collect(tmp_path))
    assert numbers["DM"]["lr_img"] == 8.0 and numbers[amp]["lr_img"] == 4.0
    assert numbers[amp]["ood_vs_dm"]["mean"] == pytest.approx(3.5)  # 45, 46 against DM's 42 at its pick
    assert f"| {amp} | 50.0 | **60.0** | 55.0 | 50.0 | — | 4 | 45.5 / 70.0 (2) | +3.5 [" in text
    assert f"| {init} | 70.0 | 60.0 | 55.0 | 50.0 | lr 1: **72.0** | 1 | — |" in text
    assert [line for line in text.splitlines() if line.startswith(f"| {amp} ")][0].endswith("| +5.5 |")


def test_lodo_stage_selects_by_left_out_domain_and_reuses_the_runs(study, tmp_path):
    parser = cli.build_parser()
    cells = study.lodo_cells(tmp_path)
    assert [c.name for c in cells] == [study.slug(a) + "-lodo" for a in study.LODO_ARMS]
    for cell in cells:
        args = parser.parse_args(cell.argv(tmp_path, 10)[3:])
        cfg = config.resolve_config(preset=args.preset, overrides=cli.overrides_from_args(args))
        assert cfg["select"]["validation"] == "domain" and cfg["select"]["lr_grid"] == [2.0, 4.0, 8.0, 16.0]

    def select(name, scores, folder, per_domain=None):
        p = tmp_path / study.lr_stage() / folder / study.ARMS[name][0] / "lr_selection.json"
        p.parent.mkdir(parents=True)
        best = max(scores, key=scores.get)
        per_seed = {str(float(k)): {"10": {d: [a / 100] for d, a in (per_domain or {}).get(k, {}).items()}}
                    for k in scores}
        p.write_text(json.dumps({"selected_lr_img": best, "validation_acc": {str(float(k)): v for k, v in scores.items()},
                                 "per_seed": per_seed, "seeds": [10]}))

    def metrics(folder, name, seed, ood):
        p = folder / study.ARMS[name][0] / f"seed{seed}" / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"ood_acc_mean": ood, "in_domain_acc_mean": 0.7}))

    amp = "DM + amplitude removal (5e-3)"
    select("DM", {2: 0.5, 4: 0.6, 8: 0.55, 16: 0.5}, "dm-lodo", {4: {"cartoon": 50.0, "sketch": 70.0}})
    select(amp, {2: 0.5, 4: 0.6, 8: 0.7, 16: 0.65}, f"{study.slug(amp)}-lodo", {8: {"cartoon": 65.0, "sketch": 75.0}})
    select(amp, {2: 0.5, 4: 0.8, 8: 0.6}, study.slug(amp))  # held-out images picked 4
    cells = study.lodo_cells(tmp_path)
    assert [(c.name, c.seeds) for c in cells if c.command == "run"] == [(f"{study.slug(amp)}-lr8", tuple(study.SEEDS))]
    for seed in study.SEEDS:
        metrics(tmp_path / "grating-1-real" / f"dm-s{seed}", "DM", seed, 0.40)
        metrics(tmp_path / study.lr_stage() / f"{study.slug(amp)}-lr8", amp, seed, 0.44 + 0.02 * seed)
    text, numbers = study.lodo_tables(tmp_path)
    assert numbers["DM"]["lr_img"] == 4.0 and numbers[amp]["lr_img"] == 8.0 and numbers[amp]["images_pick"] == 4.0
    assert numbers[amp]["ood_vs_dm"]["mean"] == pytest.approx(5.0)
    assert f"| {amp} | 50.0 | 60.0 | **70.0** | 65.0 | — | 8 (4) | cartoon 65.0, sketch 75.0 | 45.0 / 70.0 (2) | +5.0 [" \
        in text


def test_study_cost_sums_every_finished_seed_and_selection(study, tmp_path):
    cell = study.medium_cells()[0]
    (cell.folder(tmp_path)).mkdir(parents=True)
    (cell.folder(tmp_path) / "metrics.json").write_text(json.dumps(
        {"methods": {"dm": {"seeds": [0, 1], "distill_seconds": 3000.0, "eval_seconds": 600.0}}}))
    sel = tmp_path / study.lr_stage() / "dm" / "dm" / "lr_selection.json"
    sel.parent.mkdir(parents=True)
    sel.write_text(json.dumps({"selected_lr_img": 4.0, "validation_acc": {"4.0": 0.5}, "seconds": 1800.0}))
    text, numbers = study.study_cost(tmp_path)
    assert numbers["medium"] == {"runs": 2, "cpu_hours": pytest.approx(1.0)}
    assert numbers["lr_img per arm (quick)"] == {"runs": 1, "cpu_hours": pytest.approx(0.5)}
    assert text.splitlines()[-1] == "| all | 3 | 1.5 |"
