"""The method registry (sgs_cuda.methods) and what the Experiment does with each kind: post-hoc
DG methods evaluate DM's set (never distilled twice), the whole-source reference is rebuilt from
the data instead of stored."""
import pytest
import torch
from tiny_domains import TinyDomains as _TinyDomains

from sgs_cuda import methods
from sgs_cuda.config import parse_methods, resolve_config
from sgs_cuda.experiment import Experiment


class TinyDomains(_TinyDomains):
    def __init__(self, **kw):
        super().__init__(D=3, K=3, size=8, n_train=12, n_test=6, mean=(0.5,) * 3, std=(0.25,) * 3)


TINY = {"distill.ipc": 2, "distill.iterations": 4, "distill.batch_real": 6, "distill.width": 8,
        "distill.depth": 2, "distill.log_every": 2, "eval.epochs": 3, "eval.num_eval": 1, "eval.width": 8,
        "eval.depth": 2, "eval.whole_epochs": 1, "progress": False}


def test_registry_kinds_and_aliases():
    assert set(methods.DISTILLED) == {"dm", "dm_sgs", "dm_dam"}
    for m in methods.METHODS.values():
        assert m.kind in methods.KINDS and m.help
        assert (m.kind == "evaluated") == (m.set_of is not None)
        assert m.kind != "distilled" or m.distill in ("dm", "dm_sgs", "dm_dam")
    assert parse_methods(["posthoc"]) == ["dm", "dm_mixstyle", "dm_fact"]
    assert methods.base_method("dm_fact") == "dm" and methods.base_method("dm_sgs") == "dm_sgs"
    with pytest.raises(ValueError, match="unknown method 'dm_magic'"):
        parse_methods(["dm_magic"])
    assert methods.get_method("dm_mixstyle").eval_options({"mixstyle": 0.0}) == {"mixstyle": 0.5}
    assert methods.get_method("dm_mixstyle").eval_options({"mixstyle": 0.3}) == {"mixstyle": 0.3}


def test_posthoc_methods_evaluate_dms_set_and_whole_is_not_stored(tmp_path, monkeypatch):
    cfg = resolve_config({**TINY, "methods": ["dm", "dm_mixstyle", "dm_fact", "whole"], "target": "d0"})
    exp = Experiment(cfg, tmp_path / "run", data=TinyDomains(), log=lambda m: None)
    calls = []
    import sgs_cuda.experiment as ex
    real_distill = ex.distill
    monkeypatch.setattr(ex, "distill", lambda *a, **k: calls.append(a[2].method) or real_distill(*a, **k))
    metrics = exp.run()
    assert calls == ["dm"]  # one distillation: the post-hoc methods evaluate its set
    rows = metrics["methods"]
    assert set(rows) == {"dm", "dm_mixstyle", "dm_fact", "whole"}
    dm_sha = {m: __import__("json").loads((tmp_path / "run" / m / "seed0" / "metrics.json").read_text())
              for m in rows}
    assert dm_sha["dm_mixstyle"]["synthetic_sha1"] == dm_sha["dm"]["synthetic_sha1"] == dm_sha["dm_fact"]["synthetic_sha1"]
    assert dm_sha["dm_mixstyle"]["config"]["mixstyle"] == 0.5 and dm_sha["dm"]["config"]["mixstyle"] == 0.0
    assert dm_sha["dm_fact"]["config"]["amp_mix"] == 1.0
    assert dm_sha["whole"]["config"]["epochs"] == 1
    assert not (tmp_path / "run" / "dm_mixstyle" / "seed0" / "synthetic.pt").exists()
    stored = torch.load(tmp_path / "run" / "whole" / "seed0" / "synthetic.pt", weights_only=False)
    assert stored["images"] is None
    data = TinyDomains()
    whole = exp.load_set("whole", 0)
    assert len(whole["labels"]) == sum(data.count(d, c) for d in ("d1", "d2") for c in range(3))
    # a resumed run reuses every set and evaluation
    again = Experiment({**cfg}, tmp_path / "run", resume=True, data=TinyDomains(), log=lambda m: None)
    calls.clear()
    assert again.run()["methods"].keys() == rows.keys() and calls == []
