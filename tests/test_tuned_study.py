"""benchmarks/tuned_study.py: the cells' order, their commands, and the generated blocks (no runs)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tuned_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("tuned_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tuned_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _select(out: Path, target: str, arm: str, method: str, lr: float, scores: dict | None = None):
    path = out / target / arm / method / "lr_selection.json"
    path.parent.mkdir(parents=True)
    scores = scores or {lr: 0.5}
    path.write_text(json.dumps({"selected_lr_img": lr, "grid": list(scores),
                                "validation_acc": {str(float(v)): a for v, a in scores.items()}}))


def test_cells_answer_the_main_question_on_every_target_first(study):
    jobs = study.all_jobs(["photo", "sketch"])
    names = [j.name for j in jobs]
    assert names[:2] == ["photo-dm-select", "photo-dm_sgs-select"]
    assert names.index("photo-matched-seed2") < names.index("sketch-dm-select")
    assert names.index("photo-dm_sgs-seed0") < names.index("photo-dm-seed1")  # seeds in order
    # the main comparison (DM, DM+SGS, matched step) on every target before any other arm
    assert names.index("sketch-matched-seed2") < names.index("photo-spatial-seed0")
    assert names.index("photo-m3d_sgs-seed2") < names.index("sketch-spatial-seed0")
    late = [n for n in names if "-kept-" in n]
    assert late and names[-len(late):] == late  # the optional arm after every target
    edges = [n for n in names if n.endswith("-edge")]
    assert edges == ["photo-dm-edge", "photo-dm_sgs-edge", "sketch-dm-edge", "sketch-dm_sgs-edge"]
    assert names.index("sketch-m3d_sgs-seed2") < names.index(edges[0]) and names.index(edges[-1]) < names.index(late[0])
    longer = [n for n in names if "_longer-" in n]  # the runs at a pick that moved past the grid
    assert names.index(edges[-1]) < names.index(longer[0]) and names.index(longer[-1]) < names.index(late[0])
    assert len(names) == len(set(names)) == 2 * (2 + 6 * 3) + 2 * 3 + 4 + len(longer) and len(longer) == 2 * 2 * 3


def test_commands_wait_for_the_selection_they_use(study, tmp_path):
    jobs = {j.name: j for j in study.all_jobs(["photo"])}
    matched, spatial = jobs["photo-matched-seed1"], jobs["photo-spatial-seed0"]
    assert matched.command(tmp_path, "medium") is None and jobs["photo-dm-seed0"].command(tmp_path, "medium") is None
    _select(tmp_path, "photo", "dm", "dm", 4.0)
    cmd = matched.command(tmp_path, "medium", ["--set", "eval.epochs=2"])
    assert cmd[cmd.index("--lr-img") + 1] == "4" and [cmd[i + 1] for i, a in enumerate(cmd) if a == "--normalize"][-1] == "dm_norm"  # the last wins
    assert cmd[cmd.index("--seeds") + 1:] == ["0", "1"]  # seed 1 reuses seed 0, so the folder covers both
    assert "--resume" in cmd and cmd[cmd.index("--label") + 1] == "DM+SGS matched step" and "eval.epochs=2" in cmd
    assert spatial.command(tmp_path, "medium") is None  # needs DM+SGS's selection
    _select(tmp_path, "photo", "dm_sgs", "dm_sgs", 2.0)
    cmd = spatial.command(tmp_path, "medium")
    assert cmd[cmd.index("--lr-img") + 1] == "2" and cmd[cmd.index("--space") + 1] == "spatial"
    own = jobs["photo-dm_sgs-seed0"].command(tmp_path, "medium")
    assert "--select-lr" in own and "--lr-img" not in own and own[own.index("--eval-arch") + 1] == study.XARCH
    assert jobs["photo-dm-select"].command(tmp_path, "medium")[3] == "select-lr"


def test_blocks_are_replaced_in_place(study, tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text("intro\n<!-- tuned:a -->\nold\n<!-- /tuned:a -->\nmiddle\n<!-- tuned:b -->\n<!-- /tuned:b -->\nend\n")
    study.fill_blocks(doc, {"a": "| new |", "b": "x\ny"})
    assert doc.read_text() == ("intro\n<!-- tuned:a -->\n| new |\n<!-- /tuned:a -->\nmiddle\n<!-- tuned:b -->\nx\ny\n"
                               "<!-- /tuned:b -->\nend\n")
    once = doc.read_text()
    study.fill_blocks(doc, {"a": "| new |", "b": "x\ny"})
    assert doc.read_text() == once  # a second report leaves the file as it was


def test_a_selection_on_the_grids_end_is_checked_one_step_past_it(study, tmp_path):
    jobs = {j.name: j for j in study.all_jobs(["photo", "sketch"])}
    low, high, inside = jobs["photo-dm_sgs-edge"], jobs["sketch-dm-edge"], jobs["photo-dm-edge"]
    assert not low.done(tmp_path) and low.command(tmp_path, "medium") is None  # waits for the selection
    grid = [0.5, 1, 2, 4, 8]
    _select(tmp_path, "photo", "dm_sgs", "dm_sgs", 0.5, dict(zip(grid, [0.7, 0.6, 0.6, 0.5, 0.5])))
    _select(tmp_path, "sketch", "dm", "dm", 8.0, dict(zip(grid, [0.5, 0.5, 0.6, 0.6, 0.7])))
    _select(tmp_path, "photo", "dm", "dm", 2.0, dict(zip(grid, [0.5, 0.6, 0.7, 0.6, 0.5])))
    assert inside.done(tmp_path)  # a pick inside the grid needs no check
    for job, lr in ((low, "0.25"), (high, "16")):
        cmd = job.command(tmp_path, "medium")
        assert not job.done(tmp_path) and cmd[3] == "select-lr" and cmd[cmd.index("--select-lr") + 1] == lr
        assert cmd[cmd.index("--run-dir") + 1].endswith(job.target + "/" + job.arm.key + "-edge")
        assert cmd[cmd.index("--select-seeds") + 1] == "10"  # scored like the grid
    assert study.edges_table(tmp_path, ["photo", "sketch"])[1] == []
    _select(tmp_path, "photo", "dm_sgs-edge", "dm_sgs", 0.25, {0.25: 0.65})  # below the pick: it stays
    _select(tmp_path, "sketch", "dm-edge", "dm", 16.0, {16.0: 0.75})  # above: the pick would move
    assert low.done(tmp_path) and high.done(tmp_path)
    text, rows = study.edges_table(tmp_path, ["photo", "sketch"])
    assert [(r["target"], r["selected"], r["past"], r["pick"]) for r in rows] == [("photo", 0.5, 0.25, 0.5),
                                                                                 ("sketch", 8.0, 16.0, 16.0)]
    assert "| sketch | DM | 8 | 70.00 % | 16 | 75.00 % | 16 |" in text
    # where the pick moved, the arm runs again at it; where it stayed, there is nothing to run
    moved, stayed = jobs["sketch-dm_longer-seed1"], jobs["photo-dm_sgs_longer-seed0"]
    assert stayed.done(tmp_path) and stayed.command(tmp_path, "medium") is None
    cmd = moved.command(tmp_path, "medium")
    assert not moved.done(tmp_path) and cmd[cmd.index("--lr-img") + 1] == "16" and cmd[cmd.index("--seeds") + 1:] == ["0", "1"]
    assert cmd[cmd.index("--run-dir") + 1].endswith("sketch/dm_longer") and cmd[cmd.index("--method") + 1] == "dm"
    assert jobs["photo-dm_longer-seed0"].done(tmp_path)  # DM's pick on photo was inside the grid


def test_the_longer_grid_waits_for_its_edge_check(study, tmp_path):
    job = {j.name: j for j in study.all_jobs(["sketch"])}["sketch-dm_longer-seed0"]
    assert not job.done(tmp_path) and job.command(tmp_path, "medium") is None  # no selection yet
    _select(tmp_path, "sketch", "dm", "dm", 8.0, {4.0: 0.6, 8.0: 0.7})
    assert not job.done(tmp_path) and job.command(tmp_path, "medium") is None  # the step past 8 not scored yet
    _select(tmp_path, "sketch", "dm-edge", "dm", 16.0, {16.0: 0.7})  # a tie keeps the grid's pick
    assert job.done(tmp_path) and study.moved_pick(tmp_path, "sketch", "dm") is None
