"""benchmarks/premise_study.py: its cells' commands parse and resolve, the mask-against-truth
summary, the generated blocks (no runs)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sgs_cuda import cli

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "premise_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("premise_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["premise_study"] = module
    spec.loader.exec_module(module)
    return module


def test_every_cell_command_parses_and_resolves(study, tmp_path):
    cells = study.all_cells()
    stages = [c.stage for c in cells]
    assert stages[:stages.count("sanity")] == ["sanity"] * stages.count("sanity")  # the shortcut first
    assert all(c.command == "distill" for c in cells[len(cells) - 3:])  # the diagnostic-only runs last
    names = [(c.stage, c.name) for c in cells]
    assert len(names) == len(set(names))
    parser = cli.build_parser()
    for cell in cells:
        for seed in cell.seeds:
            argv = cell.argv(tmp_path, seed)
            assert argv[1:3] == ["-m", "sgs_cuda.cli"]
            args = parser.parse_args(argv[3:])
            assert args.run_dir == str(tmp_path / cell.stage / cell.name)
    # the premise cells target the cue-free domain with the op's defaults and both initialisations
    premise = [c for c in cells if c.stage == "premise" and c.command == "run"]
    assert {c.flags[c.flags.index("--init") + 1] for c in premise} == {"real", "noise"}
    assert all(c.flags[c.flags.index("--target") + 1] == "photo" for c in premise)
    assert all("herding" in c.methods for c in premise if c.name.endswith("real"))


def test_truth_summary_takes_the_second_half(study):
    history = {"truth": {"iteration": [9, 19, 29, 39], "cue": [0.5, 0.5, 0.1, 0.3], "other": [0.3, 0.3, 0.2, 0.2],
                         "chance": 0.25, "cue_bins": 12}}
    s = study.truth_summary(history)
    assert s == {"cue": pytest.approx(20.0), "other": pytest.approx(20.0), "own": None, "chance": 25.0,
                 "cue_bins": 12}
    history["truth"]["own"] = [float("nan"), float("nan"), 0.5, 0.7]
    assert study.truth_summary(history)["own"] == pytest.approx(60.0)
    assert study.truth_summary({}) is None


def test_report_tables_from_run_folders(study, tmp_path):
    out = tmp_path / "out"
    cell = next(c for c in study.all_cells() if c.stage == "premise" and c.command == "run")
    for m, base in (("dm", 0.5), ("dm_sgs", 0.55), ("dm_mixstyle", 0.45)):
        for s in cell.seeds:
            p = out / "premise" / cell.name / m / f"seed{s}" / "metrics.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps({"ood_acc_mean": base + 0.01 * s, "in_domain_acc_mean": 0.9}))
    text, numbers = study.premise_tables(out)
    assert f"| {cell.name} | 51.0 / 90.0 (3) | 56.0 / 90.0 (3) | 46.0 / 90.0 (3) |" in text
    assert numbers["comparisons"]["DM+SGS"]["ood_acc_mean"]["pooled"]["mean"] == pytest.approx(5.0)
    assert "| DM+SGS | **pooled** | +5.0 |" in text and "| DM+MixStyle | **pooled** | -5.0 |" in text
    results = tmp_path / "R.md"
    results.write_text("a\n<!-- premise:ood -->\nold\n<!-- /premise:ood -->\nb\n")
    results.write_text(study.replace_blocks(results.read_text(), {"ood": "new"}))
    assert results.read_text() == "a\n<!-- premise:ood -->\nnew\n<!-- /premise:ood -->\nb\n"
    with pytest.raises(SystemExit, match="no <!-- premise:truth -->"):
        study.replace_blocks("x", {"truth": "y"})


def _selection(folder, lr, acc):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lr_selection.json").write_text(json.dumps(
        {"selected_lr_img": lr, "validation_acc": {"1.0": acc - 0.1, str(float(lr)): acc}}))


def test_the_grid_picks_its_best_held_out_point_and_the_table_reads_its_runs(study, tmp_path):
    out = tmp_path / "out"
    st = study.GRID_SETTINGS[0]
    name = study.setting_name(*st)
    cells = {c.name: c for c in study.all_cells() if c.stage == "grid"}
    points = [f"{name}-tau{t:g}-alpha{a:g}" for t, a in study.SGS_GRID]
    assert set(points) <= set(cells) and all(cells[p].command == "select-lr" for p in points)
    assert study.grid_choice(out, st) is None and study.grid_best_cells(out) == []  # nothing selected yet
    assert not cells[points[0]].done(out, 10)
    _selection(out / "premise" / name / "dm_sgs", 4.0, 0.80)  # the defaults
    _selection(out / "grid" / points[0] / "dm_sgs", 1.0, 0.80)  # a tie: the defaults stay
    _selection(out / "grid" / points[1] / "dm_sgs", 4.0, 0.70)
    assert cells[points[0]].done(out, 10)
    choice = study.grid_choice(out, st)
    assert choice["defaults"] and study.grid_best_cells(out) == []
    assert study.arm_folder(out, name, study.Arm("g", "dm_sgs", "grid")) == out / "premise" / name
    _selection(out / "grid" / points[1] / "dm_sgs", 4.0, 0.85)
    choice = study.grid_choice(out, st)
    tau, alpha = study.SGS_GRID[1]
    assert (choice["tau"], choice["alpha"], choice["lr_img"], choice["defaults"]) == (tau, alpha, 4.0, False)
    [best] = study.grid_best_cells(out)
    assert best.name == f"{name}-best" and best.flags[best.flags.index("--tau") + 1] == f"{tau:g}"
    assert best.flags[best.flags.index("--lr-img") + 1] == "4"
    cli.build_parser().parse_args(best.argv(out, 0)[3:])
    assert study.arm_folder(out, name, study.Arm("g", "dm_sgs", "grid")) == out / "grid" / f"{name}-best"
    text, numbers = study.grid_table(out)
    assert "**picked**" in text and numbers[name]["candidates"][2]["validation"] == pytest.approx(85.0)
    for folder, method in ((out / "premise" / name, "dm"), (out / "grid" / f"{name}-best", "dm_sgs")):
        for s in study.SEEDS:
            p = folder / method / f"seed{s}" / "metrics.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"ood_acc_mean": 0.5 + (method == "dm_sgs") * 0.02, "in_domain_acc_mean": 0.9}))
    _, numbers = study.premise_tables(out)
    assert numbers["comparisons"]["DM+SGS (grid)"]["ood_acc_mean"]["pooled"]["mean"] == pytest.approx(2.0)
    assert study.differences_figure({"premise": numbers}, tmp_path / "d.png").is_file()
    assert study.differences_figure({"premise": {}}, tmp_path / "none.png") is None


def test_cost_table_reads_the_folders_metrics(study, tmp_path):
    out = tmp_path / "out"
    name = study.setting_name(*study.PREMISE_SETTINGS[0])
    folder = out / "premise" / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"methods": {
        "dm": {"seeds": [0, 1], "distill_seconds": 100.0, "eval_seconds": 60.0},
        "dm_fact": {"seeds": [0, 1], "distill_seconds": 100.0, "eval_seconds": 100.0}}}))
    text, numbers = study.cost_table(out)
    assert numbers["DM"] == {"distill": 50.0, "eval": 30.0} and "| DM+FACT | 50 | 50 | 1.25 |" in text


def test_jobs_run_every_folders_first_seed_before_any_second(study):
    a = study.Cell("s", "a", ("dm",), (), (0, 1, 2))
    b = study.Cell("s", "b", ("dm",), (), (0, 1))
    c = study.Cell("s", "c", ("dm",), (), (5,))
    order = [(cell.name, seed) for cell, seed in study.job_order([a, b, c])]
    assert order == [("a", 0), ("b", 0), ("c", 5), ("a", 1), ("b", 1), ("a", 2)]


def test_the_scheduler_runs_dependent_cells_and_leaves_other_schedulers_folders(study, tmp_path, monkeypatch):
    """Jobs (faked: each writes its seed's metrics) run every cell; a cell that depends on another's
    result (a run at a selected step) joins once that exists; a folder whose lock names a live
    process (another scheduler's job) is left alone, a stale lock is not; locks are released."""
    import argparse
    import os
    import threading
    import time

    def fake_argv(self, out, seed):
        leaf = self.folder(out) / self.methods[0] / f"seed{seed}" / "metrics.json"
        return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(leaf)!r}); "
                "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('{}')"]

    monkeypatch.setattr(study.Cell, "argv", fake_argv)
    first = study.Cell("s", "first", ("dm",), (), (0, 1))
    held = study.Cell("s", "held", ("dm",), (), (0,))
    stale = study.Cell("s", "stale", ("dm",), (), (0,))
    second = study.Cell("s", "second", ("dm",), (), (0,))
    for cell, pid in ((held, os.getpid()), (stale, 2 ** 22 + 12345)):
        cell.folder(tmp_path).mkdir(parents=True)
        (cell.folder(tmp_path) / study.LOCK).write_text(str(pid))
    assert study.folder_busy(held.folder(tmp_path)) and not study.folder_busy(stale.folder(tmp_path))

    def cells():  # second needs first's seed 0
        return [first, held, stale] + ([second] if first.done(tmp_path, 0) else [])

    args = argparse.Namespace(out=str(tmp_path), jobs=3, poll=0.02, code=None)  # held's job takes one of 3
    runner = threading.Thread(target=study.cmd_run, args=(args, cells), daemon=True)
    runner.start()
    deadline = time.time() + 60
    while time.time() < deadline and not all(c.done(tmp_path, s) for c in (first, stale, second) for s in c.seeds):
        time.sleep(0.05)
    assert all(c.done(tmp_path, s) for c in (first, stale, second) for s in c.seeds)
    time.sleep(0.3)
    assert not held.done(tmp_path, 0)  # another scheduler's folder: never started
    (tmp_path / "STOP").touch()
    runner.join(30)
    assert not runner.is_alive()
    assert not any((c.folder(tmp_path) / study.LOCK).exists() for c in (first, stale, second))
