"""Training-domain validation: the held-out view and the lr_img selection on it."""
import json

import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda.data import InMemoryDomains
from sgs_cuda.data.holdout import hold_out
from sgs_cuda.dm import DistillConfig
from sgs_cuda.evaluate import EvalConfig
from sgs_cuda.selection import SELECTION_NAME, select_lr


class LoggedDomains(TinyDomains):
    """Records every domain any method is asked about."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.touched = set()

    def real_batch(self, domain, *a, **kw):
        self.touched.add(domain)
        return super().real_batch(domain, *a, **kw)

    def split_tensors(self, domains, split="test"):
        self.touched.update(domains)
        return super().split_tensors(domains, split)

    def count(self, domain, *a, **kw):
        self.touched.add(domain)
        return super().count(domain, *a, **kw)


def _rows(x):
    return {tuple(r.flatten().tolist()) for r in x}


def test_hold_out_is_disjoint_class_balanced_and_seeded():
    data = LoggedDomains(n_train=12)
    view = hold_out(data, ["d1", "d2"], fraction=0.25, seed=0)
    assert view.domains == ["d1", "d2"] and "d0" not in data.touched  # the target is never read
    for d in ("d1", "d2"):
        tr_x, tr_y = view.split_tensors([d], "train")
        va_x, va_y = view.split_tensors([d], "test")
        all_x, all_y = data.split_tensors([d], "train")
        assert len(va_y) == 9 and len(tr_y) == 27  # 3 of 12 per class held out, 3 classes
        assert torch.bincount(va_y).tolist() == [3, 3, 3] and torch.bincount(tr_y).tolist() == [9, 9, 9]
        assert not _rows(tr_x) & _rows(va_x)
        assert _rows(tr_x) | _rows(va_x) == _rows(all_x)
        for c in range(3):  # each image keeps its label
            assert _rows(va_x[va_y == c]) <= _rows(all_x[all_y == c])
        assert view.count(d, 0, "train") == 9 and view.count(d, 0, "test") == 3
        batch = view.real_batch(d, 1, 5, generator=torch.Generator().manual_seed(0))
        assert _rows(batch) <= _rows(tr_x[tr_y == 1])  # distillation draws from the train part only
    again = hold_out(data, ["d1", "d2"], fraction=0.25, seed=0)
    other = hold_out(data, ["d1", "d2"], fraction=0.25, seed=1)
    assert torch.equal(again.split_tensors(["d1"])[0], view.split_tensors(["d1"])[0])
    assert not torch.equal(other.split_tensors(["d1"])[0], view.split_tensors(["d1"])[0])
    with pytest.raises(ValueError, match="unknown domain"):
        view.real_batch("d0", 0, 1)
    with pytest.raises(ValueError, match="fraction"):
        hold_out(data, ["d1"], fraction=1.0)
    with pytest.raises(ValueError, match="unknown source"):
        hold_out(data, ["dx"])
    # at least one image held out and one kept per class
    tiny = hold_out(data, ["d1"], fraction=0.01)
    assert torch.bincount(tiny.split_tensors(["d1"], "test")[1]).tolist() == [1, 1, 1]


def test_hold_out_of_an_in_memory_uint8_source_keeps_its_normalisation():
    g = torch.Generator().manual_seed(0)
    cells = {d: {"train": (torch.randint(0, 256, (20, 3, 4, 4), generator=g, dtype=torch.uint8),
                           torch.arange(2).repeat(10)),
                 "test": (torch.randint(0, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8), torch.arange(2).repeat(2))}
             for d in ("a", "b", "target")}
    data = InMemoryDomains(cells, ["x", "y"])
    view = hold_out(data, ["a", "b"], fraction=0.2, seed=3)
    assert view.mean == data.mean and view.std == data.std and view.domains == ["a", "b"]
    va_x, va_y = view.split_tensors(["a"], "test")
    assert va_x.dtype == torch.float32 and len(va_y) == 4
    full = data.split_tensors(["a"], "train")[0]
    assert _rows(va_x) <= _rows(full)  # the same normalised images as the source hands out
    tr_x, _ = view.split_tensors(["a"], "train")
    assert not _rows(tr_x) & _rows(va_x) and len(tr_x) + len(va_x) == 20


def test_select_lr_on_a_tiny_dataset(tmp_path, monkeypatch):
    import sgs_cuda.selection as selection
    runs = []
    real_distill = selection.distill
    monkeypatch.setattr(selection, "distill", lambda *a, **kw: runs.append(a[2].lr_img) or real_distill(*a, **kw))
    data = LoggedDomains(n_train=12)
    dcfg = DistillConfig(method="dm_sgs", ipc=2, iterations=3, batch_real=6, width=8, depth=2, lr_img=123.0)
    ecfg = EvalConfig(epochs=10, num_eval=2, width=8, depth=2, batch=8)
    rec = select_lr(data, ["d1", "d2"], dcfg, ecfg, grid=(0.5, 4.0, 50.0), seeds=(0, 1), fraction=0.25,
                    run_dir=tmp_path)
    assert "d0" not in data.touched  # the target is never read
    assert runs == [0.5, 0.5, 4.0, 4.0, 50.0, 50.0]
    assert rec["grid"] == [0.5, 4.0, 50.0] and rec["seeds"] == [0, 1]
    scores = rec["validation_acc"]
    assert set(scores) == {"0.5", "4.0", "50.0"} and all(0 <= v <= 1 for v in scores.values())
    assert rec["selected_lr_img"] == max(rec["grid"], key=lambda lr: (scores[str(lr)], -rec["grid"].index(lr)))
    for lr in ("0.5", "4.0", "50.0"):
        accs = rec["per_seed"][lr]
        assert set(accs) == {"0", "1"} and all(len(a) == 2 for a in accs.values())
        assert scores[lr] == pytest.approx(sum(accs["0"] + accs["1"]) / 4)
    assert rec["holdout"] == {"fraction": 0.25, "seed": 0, "train_images": 54, "validation_images": 18}
    assert "lr_img" not in rec["settings"]["distill"] and rec["settings"]["distill"]["method"] == "dm_sgs"
    json.dumps(rec)  # JSON-able
    assert len({tuple(v["0"]) for v in rec["per_seed"].values()}) > 1  # the learning rate matters
    saved = json.loads((tmp_path / SELECTION_NAME).read_text())
    assert saved["selected_lr_img"] == rec["selected_lr_img"]
    # a rerun reuses every finished grid point and adds only the new one
    runs.clear()
    again = select_lr(data, ["d1", "d2"], dcfg, ecfg, grid=(0.5, 4.0, 50.0), seeds=(0, 1), fraction=0.25,
                      run_dir=tmp_path)
    assert runs == [] and again["per_seed"] == rec["per_seed"]
    more = select_lr(data, ["d1", "d2"], dcfg, ecfg, grid=(0.5, 4.0, 50.0, 8.0), seeds=(0, 1), fraction=0.25,
                     run_dir=tmp_path)
    assert runs == [8.0, 8.0] and more["per_seed"]["4.0"] == rec["per_seed"]["4.0"] and "8.0" in more["validation_acc"]
    with pytest.raises(ValueError, match="other settings"):
        select_lr(data, ["d1", "d2"], dcfg, ecfg, grid=(0.5,), fraction=0.5, run_dir=tmp_path)
    for grid in ((), (0.0, 1.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="grid"):
            select_lr(data, ["d1", "d2"], dcfg, ecfg, grid=grid)


def test_leave_one_domain_out_validation(tmp_path, monkeypatch):
    """validation="domain": each source domain in turn is left out of the distillation and scores
    it; the target is never read; the selection resumes per (lr, seed, held-out domain)."""
    import sgs_cuda.selection as selection
    runs = []
    real_distill, real_validate = selection.distill, selection.validation_accuracy
    monkeypatch.setattr(selection, "distill",
                        lambda data, domains, cfg, **kw: runs.append((cfg.lr_img, tuple(domains)))
                        or real_distill(data, domains, cfg, **kw))
    validated = []
    monkeypatch.setattr(selection, "validation_accuracy",
                        lambda images, labels, view, domains, *a: validated.append(tuple(domains))
                        or real_validate(images, labels, view, domains, *a))
    data = LoggedDomains(n_train=12, D=4)
    sources = ["d1", "d2", "d3"]
    dcfg = DistillConfig(method="dm_sgs", ipc=2, iterations=3, batch_real=6, width=8, depth=2)
    ecfg = EvalConfig(epochs=10, num_eval=2, width=8, depth=2, batch=8)
    rec = select_lr(data, sources, dcfg, ecfg, grid=(0.5, 50.0), seeds=(0,), run_dir=tmp_path, validation="domain")
    assert "d0" not in data.touched  # the target is never read
    folds = [("d2", "d3"), ("d1", "d3"), ("d1", "d2")]
    assert runs == [(0.5, f) for f in folds] + [(50.0, f) for f in folds]
    assert validated == [("d1",), ("d2",), ("d3",)] * 2  # each fold scores the domain it left out
    for lr in ("0.5", "50.0"):
        per_domain = rec["per_seed"][lr]["0"]
        assert set(per_domain) == set(sources) and all(len(a) == 2 for a in per_domain.values())
        assert rec["validation_acc"][lr] == pytest.approx(sum(sum(a) for a in per_domain.values()) / 6)
    assert rec["holdout"]["validation"] == "domain" and rec["settings"]["validation"] == "domain"
    assert rec["holdout"]["validation_images"] == {d: 18 for d in sources}  # 6 test images x 3 classes
    # an interrupted selection resumes fold by fold
    saved = json.loads((tmp_path / SELECTION_NAME).read_text())
    del saved["per_seed_all"]["50.0"]["0"]["d3"]
    (tmp_path / SELECTION_NAME).write_text(json.dumps({"settings": saved["settings"],
                                                       "per_seed_all": saved["per_seed_all"]}))
    runs.clear()
    again = select_lr(data, sources, dcfg, ecfg, grid=(0.5, 50.0), seeds=(0,), run_dir=tmp_path, validation="domain")
    assert runs == [(50.0, ("d1", "d2"))] and again["per_seed"]["0.5"] == rec["per_seed"]["0.5"]
    # the two rules never share a selection file
    with pytest.raises(ValueError, match="other settings"):
        select_lr(data, sources, dcfg, ecfg, grid=(0.5,), run_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 2 source domains"):
        select_lr(data, ["d1"], dcfg, ecfg, grid=(0.5,), validation="domain")
    with pytest.raises(ValueError, match="validation must be one of"):
        select_lr(data, sources, dcfg, ecfg, grid=(0.5,), validation="oracle")
