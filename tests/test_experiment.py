"""The pipeline's Python API (sgs_cuda.experiment), which the CLI and distributed workers call:
one set at a time, the whole run, reuse, bad-image lists (the configuration's layers are
tests/test_config.py)."""
import json

import pytest
import torch
from tiny_domains import TinyDomains as _TinyDomains

from sgs_cuda import compare, experiment
from sgs_cuda._io import RunFolderError
from sgs_cuda.config import resolve_config
from sgs_cuda.experiment import Experiment


class TinyDomains(_TinyDomains):
    def __init__(self, **kw):
        super().__init__(D=3, K=3, size=8, n_train=12, n_test=6, mean=(0.5,) * 3, std=(0.25,) * 3)


TINY = {"distill.ipc": 2, "distill.iterations": 4, "distill.batch_real": 6, "distill.width": 8,
        "distill.depth": 2, "distill.checkpoint_every": 2, "distill.log_every": 2, "eval.epochs": 4,
        "eval.num_eval": 2, "eval.width": 8, "eval.depth": 2, "progress": False}


def tiny_config(**more):
    return resolve_config({**TINY, **more})


def test_sets_one_at_a_time_then_the_whole_run(tmp_path):
    lines = []
    exp = Experiment(tiny_config(target="d1"), tmp_path / "r", data=TinyDomains(), log=lines.append)
    assert (exp.target, exp.sources, exp.distill_domains) == ("d1", ["d0", "d2"], ["d0", "d2"])
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["target"] == "d1" and saved["resolved"]["classes"] == ["c0", "c1", "c2"]

    payload = exp.produce_set("dm_sgs", 0)
    assert payload["images"].shape == (6, 3, 8, 8) and payload["sgs_backend"] == exp.backend
    assert {p.name for p in exp.folder.set_dir("dm_sgs", 0).iterdir()} == {"synthetic.pt", "synthetic.png",
                                                                     "curves.png", "checkpoint.pt"}
    metrics = exp.evaluate_set(payload)
    assert len(metrics["ood_acc"]) == 2 and metrics["target_domain"] == "d1"
    assert json.loads((exp.folder.set_dir("dm_sgs", 0) / "metrics.json").read_text())["ood_acc"] == metrics["ood_acc"]
    assert exp.timings["extension"] >= 0 and exp.timings["distill"] > 0 and exp.timings["evaluate"] > 0
    assert any(line.startswith("[dm_sgs seed 0] distilling") for line in lines)

    summary = exp.run()  # dm is made now; dm_sgs is made again (no resume) with the same result
    assert list(summary["methods"]) == ["dm", "dm_sgs"]
    assert summary["methods"]["dm_sgs"]["ood_acc_mean"] == pytest.approx(sum(metrics["ood_acc"]) / 2)
    record = compare.load_run(tmp_path / "r")
    assert record.metrics == json.loads(json.dumps(summary)) and record.config["target"] == "d1"
    text = compare.describe_run(record)
    assert "4 iterations" in text and "dm_sgs" in text and "d1" in text

    fresh, more = TinyDomains(), []
    again = Experiment(tiny_config(target="d1"), tmp_path / "r", resume=True, data=fresh, log=more.append).run()
    assert not fresh.calls  # every set and evaluation reused
    assert again["methods"] == summary["methods"] and sum("reusing" in line for line in more) == 4
    assert again["sgs_backend"] == summary["sgs_backend"]  # kept from the command that distilled


def test_evaluate_only_needs_the_sets(tmp_path):
    exp = Experiment(tiny_config(methods=["dm", "random"]), tmp_path / "r", data=TinyDomains(), log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="synthetic.pt not found"):
        exp.run(distil=False)
    exp.produce_set("dm", 0)
    summary = exp.run(distil=False)  # random is made (a baseline), dm is loaded
    assert set(summary["methods"]) == {"dm", "random"}
    assert summary["sgs_backend"] == {"implementation": "not used by this command"}


class WithBadFiles(TinyDomains):
    def __init__(self, bad):
        super().__init__()
        self.bad_files = bad


def test_bad_images_are_listed_in_the_run_folder(tmp_path):
    lines = []
    bad = [("/data/PACS/photo/dog/1.jpg", "truncated JPEG"), ("/data/PACS/sketch/cat/x.png", "not an image")]
    exp = Experiment(tiny_config(), tmp_path / "r", data=WithBadFiles(bad), log=lines.append)
    listed = (exp.run_dir / "bad_images.txt").read_text().splitlines()
    assert [tuple(line.split("\t")) for line in listed] == bad
    assert [line for line in lines if "unreadable" in line] == [
        f"skipped 2 unreadable image(s): listed in {exp.run_dir / 'bad_images.txt'}"]
    Experiment(tiny_config(), tmp_path / "clean", data=WithBadFiles([]), log=lines.append)
    assert not (tmp_path / "clean" / "bad_images.txt").exists()


def test_an_unusable_run_dir_fails_before_the_data_is_built(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: loads.append(1) or TinyDomains())
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="is a file"):
        Experiment(tiny_config(), tmp_path / "file" / "run", log=lambda m: None)
    assert not loads
    Experiment(tiny_config(), tmp_path / "ok", log=lambda m: None)
    assert loads == [1]


def test_reused_set_must_match_the_settings(tmp_path):
    Experiment(tiny_config(), tmp_path / "r", data=TinyDomains(), log=lambda m: None).produce_set("dm_sgs", 0)
    other = Experiment(tiny_config(**{"sgs.beta": 0.7}), tmp_path / "r", resume=True, data=TinyDomains(),
                       log=lambda m: None)
    with pytest.raises(ValueError, match=r"other settings for \['sgs'\]"):
        other.produce_set("dm_sgs", 0)
    longer = Experiment(tiny_config(**{"distill.iterations": 6}), tmp_path / "r", resume=True, data=TinyDomains(),
                        log=(lines := []).append)
    assert len(longer.produce_set("dm_sgs", 0)["history"]["loss"]) == 6
    assert any("resuming from iteration 4 of 6" in line for line in lines)
    assert torch.load(longer.folder.set_dir("dm_sgs", 0) / "checkpoint.pt", weights_only=False)["iteration"] == 6


def test_metrics_saved_before_eval_arch_existed_are_reused(tmp_path):
    exp = Experiment(tiny_config(), tmp_path / "r", data=TinyDomains(), log=lambda m: None)
    payload = exp.produce_set("dm", 0)
    metrics = exp.evaluate_set(payload)
    path = exp.folder.set_dir("dm", 0) / "metrics.json"
    old = json.loads(path.read_text())
    del old["config"]["arch"]  # as written before EvalConfig.arch
    path.write_text(json.dumps(old))
    lines = []
    again = Experiment(tiny_config(), tmp_path / "r", resume=True, data=TinyDomains(), log=lines.append)
    assert again.evaluate_set(payload)["ood_acc"] == metrics["ood_acc"]
    assert any("reusing" in line for line in lines)
    other = Experiment(tiny_config(**{"eval.arch": "convnet,resnet18:4"}), tmp_path / "r", resume=True,
                       data=TinyDomains(), log=(more := []).append)
    assert set(other.evaluate_set(payload)["per_arch"]) == {"convnet", "resnet18"}  # other settings: evaluated again
    assert not any("reusing" in line for line in more)


def test_m3d_matching(tmp_path):
    exp = Experiment(tiny_config(**{"distill.matching": "m3d", "methods": ["dm"]}), tmp_path / "r",
                     data=TinyDomains(), log=lambda m: None)
    m3d = exp.produce_set("dm", 0)
    dm = Experiment(tiny_config(methods=["dm"]), tmp_path / "dm", data=TinyDomains(), log=lambda m: None).produce_set("dm", 0)
    assert m3d["config"]["matching"] == "m3d" and not torch.equal(m3d["images"], dm["images"])


def test_selection_refuses_pseudo_domains_and_empty_grids(tmp_path):
    exp = Experiment(tiny_config(), tmp_path / "r", data=TinyDomains(), log=lambda m: None)
    with pytest.raises(ValueError, match="no lr_img grid"):
        exp.select_all()
    assert exp.select_lr("dm") is None and exp.selected_distill_config("dm", 0).lr_img == 1.0
    pytest.importorskip("sgs_cuda.data.pseudo_domains")
    cfg = tiny_config(**{"select.lr_grid": [1, 2], "pseudo_domains": 2})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exp = Experiment(cfg, tmp_path / "p", data=TinyDomains(), log=lambda m: None)
        with pytest.raises(ValueError, match="does not combine with --pseudo-domains"):
            exp.produce_set("dm", 0)


def test_several_targets_in_leave_domains_out(tmp_path):
    """``target: d0,d1`` tests on both unseen domains in one evaluation (a column each); one
    target keeps the single-target table."""
    lines = []
    exp = Experiment(tiny_config(target="d0,d1", methods=["dm"]), tmp_path / "r", data=TinyDomains(), log=lines.append)
    assert (exp.targets, exp.target, exp.sources) == (["d0", "d1"], "d0+d1", ["d2"])
    summary = exp.run()
    assert summary["target_domains"] == ["d0", "d1"] and list(summary["methods"]["dm"]["targets"]) == ["d0", "d1"]
    per = json.loads((exp.folder.set_dir("dm", 0) / "metrics.json").read_text())
    assert per["ood_acc"] == pytest.approx([(a + b) / 2 for a, b in zip(per["targets"]["d0"]["ood_acc"],
                                                                         per["targets"]["d1"]["ood_acc"])])
    table = compare.format_table(summary)
    assert "targets (OOD): d0, d1" in table
    assert table.splitlines()[1].split()[:5] == ["method", "d0", "d1", "OOD", "mean"]
    single = Experiment(tiny_config(target="d1", methods=["dm"]), tmp_path / "s", data=TinyDomains(),
                        log=lambda m: None).run()
    text = compare.format_table(single)
    assert text.splitlines()[1].split()[:4] == ["method", "OOD", "acc", "%"] and "OOD mean" not in text
    assert json.loads((tmp_path / "s" / "config.json").read_text())["target"] == "d1"  # a name, as before
    with pytest.raises(ValueError, match="DM\\+SGS needs at least two source domains"):
        Experiment(tiny_config(target="d0,d1"), tmp_path / "t", data=TinyDomains(), log=lambda m: None)
    with pytest.raises(ValueError, match="unknown target domain 'd7'"):
        Experiment(tiny_config(target="d0,d7"), tmp_path / "u", data=TinyDomains(), log=lambda m: None)


def test_cuda_self_check_verdicts_are_logged_and_recorded(tmp_path, monkeypatch):
    """On a GPU backend_info carries the self-check; the run header prints its mode, and the set and
    the run's metrics record the verdicts as they are after the distillation (they come with the
    op's first calls), each verdict logged once."""
    import sgs_cuda
    from sgs_cuda import selfcheck
    verdicts = {}
    monkeypatch.setattr(sgs_cuda, "backend_info", lambda device: {
        "implementation": "extension (cuda)", "self_check": {"mode": "once per path and shape class", "verdicts": {}}})
    monkeypatch.setattr(selfcheck, "report", lambda: {"mode": "once per path and shape class",
                                                      "verdicts": dict(verdicts), "torch_fallback": []})
    lines = []
    exp = Experiment(tiny_config(target="d1"), tmp_path / "r", data=TinyDomains(), log=lines.append)
    verdicts["8x8 D=2 float32 stats hard: dx"] = "pass: update: largest relative error 1e-07 (tolerance 1e-05)"
    payload = exp.produce_set("dm_sgs", 0)
    assert "SGS op self-check: once per path and shape class" in lines
    assert payload["sgs_backend"]["self_check"]["verdicts"] == verdicts
    exp.backend_record()
    assert sum("SGS op self-check: 8x8 D=2 float32 stats hard: dx: pass" in line for line in lines) == 1
