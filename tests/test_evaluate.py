"""Leave-one-domain-out evaluation and the real-image baselines."""
import pytest
import torch
from tiny_domains import TinyDomains as _TinyDomains

from sgs_cuda.evaluate import (EvalConfig, evaluate_synthetic, herding, herding_select, random_real_subset,
                               train_classifier)


class TinyDomains(_TinyDomains):
    def __init__(self, D=3, K=3, size=8, n_train=12, n_test=10, seed=0, noise=0.5):
        super().__init__(D, K, size, n_train, n_test, seed, noise, style_scale=0.5)


FAST = EvalConfig(epochs=30, num_eval=2, width=8, depth=2, batch=8)


def test_eval_config_validation():
    assert EvalConfig().epochs == 1000 and EvalConfig().lr == 0.01 and EvalConfig().num_eval == 5
    with pytest.raises(ValueError, match="epochs"):
        EvalConfig(epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        EvalConfig(momentum=1.5)
    with pytest.raises(ValueError, match="unknown evaluation option"):
        EvalConfig.from_dict({"epoch": 3})


def test_correct_labels_learn_and_wrong_labels_do_not():
    data = TinyDomains()
    x, y = random_real_subset(data, ["d1", "d2"], ipc=4, seed=0)
    good = evaluate_synthetic(x, y, data, ["d1", "d2"], "d0", FAST, seed=0)
    bad = evaluate_synthetic(x, (y + 1) % 3, data, ["d1", "d2"], "d0", FAST, seed=0)
    assert good["ood_acc_mean"] > 0.8 and good["in_domain_acc_mean"] > 0.8
    assert bad["ood_acc_mean"] < 0.2 and bad["in_domain_acc_mean"] < 0.2  # it learned the shifted labels


def test_result_structure_and_statistics():
    data = TinyDomains(noise=1.5)
    x, y = random_real_subset(data, ["d0", "d2"], ipc=2, seed=0)
    cfg = EvalConfig(epochs=5, num_eval=3, width=8, depth=2)
    r = evaluate_synthetic(x, y, data, ["d0", "d2"], "d1", cfg, seed=0)
    assert r["target_domain"] == "d1" and r["source_domains"] == ["d0", "d2"]
    assert len(r["ood_acc"]) == len(r["in_domain_acc"]) == len(r["train_loss"]) == 3
    mean = sum(r["ood_acc"]) / 3
    std = (sum((a - mean) ** 2 for a in r["ood_acc"]) / 2) ** 0.5
    assert r["ood_acc_mean"] == pytest.approx(mean) and r["ood_acc_std"] == pytest.approx(std)
    assert r["per_domain"]["d1"] == pytest.approx(mean)
    # in-domain = pooled source test images (equal sizes here: the mean of the two domains)
    assert r["in_domain_acc_mean"] == pytest.approx((r["per_domain"]["d0"] + r["per_domain"]["d2"]) / 2)
    assert all(0 <= a <= 1 for a in r["ood_acc"] + r["in_domain_acc"])
    assert len(set(r["train_loss"])) == 3  # the nets differ
    again = evaluate_synthetic(x, y, data, ["d0", "d2"], "d1", cfg, seed=0)
    assert again["ood_acc"] == r["ood_acc"] and again["train_loss"] == r["train_loss"]
    other = evaluate_synthetic(x, y, data, ["d0", "d2"], "d1", cfg, seed=1)
    assert other["train_loss"] != r["train_loss"]


def test_evaluation_errors():
    data = TinyDomains()
    x, y = random_real_subset(data, ["d1", "d2"], ipc=1)
    with pytest.raises(ValueError, match="also a source"):
        evaluate_synthetic(x, y, data, ["d0", "d1"], "d0", FAST)
    with pytest.raises(ValueError, match="unknown domain"):
        evaluate_synthetic(x, y, data, ["d1"], "photo", FAST)
    with pytest.raises(ValueError, match="one label per image"):
        evaluate_synthetic(x, y[:-1], data, ["d1"], "d0", FAST)


def test_lr_decay_at_half_the_epochs(monkeypatch):
    seen = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    train_classifier(x, y, 2, EvalConfig(epochs=6, lr=0.1, width=4, depth=1, batch=4))
    assert seen == pytest.approx([0.1] * 3 + [0.01] * 3)


def test_random_real_subset():
    data = TinyDomains()
    x, y = random_real_subset(data, ["d1", "d2"], ipc=3, seed=0)
    assert x.shape == (9, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    origin = []
    for img, label in zip(x, y):
        hits = [d for d in data.domains if ((data._x[d, "train"][int(label)] - img).abs()
                                            .flatten(1).max(1).values < 1e-6).any()]
        assert len(hits) == 1
        origin.append(hits[0])
    assert "d0" not in origin
    assert origin[:3].count("d1") == 2 and origin[:3].count("d2") == 1  # spread over the domains
    x2, _ = random_real_subset(data, ["d1", "d2"], ipc=3, seed=0)
    x3, _ = random_real_subset(data, ["d1", "d2"], ipc=3, seed=1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_herding_select_greedy_mean_matching():
    f = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.5]])  # mean 5.1
    assert herding_select(f, 1) == [4]  # closest to the mean
    assert herding_select(f, 2) == [4, 2]  # (5.5 + 4) / 2 = 4.75 beats (5.5 + 6) / 2 = 5.75
    assert sorted(herding_select(f, 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        herding_select(f, 6)


def test_herding_baseline():
    data = TinyDomains()
    x, y = herding(data, ["d1", "d2"], ipc=3, seed=0, width=4, depth=2)
    assert x.shape == (9, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in range(3):
        pool = torch.cat([data._x[d, "train"][c] for d in ("d1", "d2")])
        picks = x[3 * c:3 * c + 3]
        idx = [int(((pool - p).abs().flatten(1).max(1).values < 1e-6).nonzero()[0]) for p in picks]
        assert len(set(idx)) == 3  # distinct real images of the right class


def test_target_scored_on_every_image_or_its_test_split():
    from sgs_cuda.evaluate import same_eval_config

    data = TinyDomains(n_train=12, n_test=10)
    x, y = random_real_subset(data, ["d1", "d2"], ipc=2, seed=0)
    cfg = EvalConfig(epochs=3, num_eval=1, width=8, depth=2)
    assert cfg.target_split == "all"
    whole = evaluate_synthetic(x, y, data, ["d1", "d2"], "d0", cfg, seed=0)
    test = evaluate_synthetic(x, y, data, ["d1", "d2"], "d0", EvalConfig(**{**cfg.to_dict(), "target_split": "test"}),
                              seed=0)
    K = len(data.classes)
    assert whole["targets"]["d0"]["test_images"] == K * (12 + 10)
    assert test["targets"]["d0"]["test_images"] == K * 10
    assert whole["in_domain_acc"] == test["in_domain_acc"]  # the sources: their test split either way
    # the same networks: the whole-domain score is the count-weighted mean of the two splits
    train_part = (whole["ood_acc"][0] * 22 - test["ood_acc"][0] * 10) / 12
    assert 0 <= train_part <= 1 + 1e-9
    with pytest.raises(ValueError, match="target_split"):
        EvalConfig(target_split="val")
    # metrics saved before the option existed were scored on the test split: not reused for "all"
    old = {k: v for k, v in cfg.to_dict().items() if k != "target_split"}
    assert not same_eval_config(old, cfg)
    assert same_eval_config(old, EvalConfig(**{**cfg.to_dict(), "target_split": "test"}))
