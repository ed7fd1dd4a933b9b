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
