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


def _select(out: Path, target: str, arm: str, method: str, lr: float):
    path = out / target / arm / method / "lr_selection.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"selected_lr_img": lr}))


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
    assert len(names) == len(set(names)) == 2 * (2 + 6 * 3) + 2 * 3


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
