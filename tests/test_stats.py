"""Paired statistics and tables from run folders, against hand-computed values."""
import json
import math

import pytest

from sgs_cuda.stats import (PairedSummary, accuracies, compare, load_seed_metrics, lookup, markdown_tables, mean_sd,
                            paired_differences, save_pairs_plot, summarize_differences, t_quantile)


def test_mean_sd_by_hand():
    # 1, 2, 3, 6: mean 3, sample sd sqrt(14 / 3); one value: sd 0
    assert mean_sd([1, 2, 3, 6]) == (3.0, math.sqrt(14 / 3))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_t_quantiles_from_the_table():
    # two-sided 95%: the textbook values
    assert t_quantile(0.95, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.95, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.95, 11) == pytest.approx(2.201, abs=1e-3)
    assert t_quantile(0.90, 3) == pytest.approx(2.353, abs=1e-3)


def test_summary_by_hand():
    # d = 1, 2, 3, 6: mean 3, sd = sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3), se = sd / 2, t(3) = 3.182446
    s = summarize_differences([1, 2, 3, 6])
    sd = math.sqrt(14 / 3)
    assert (s.n, s.mean, s.positive) == (4, 3.0, 4)
    assert s.sd == pytest.approx(sd) and s.se == pytest.approx(sd / 2)
    assert s.ci_low == pytest.approx(3 - 3.182446 * sd / 2, abs=1e-5)
    assert s.ci_high == pytest.approx(3 + 3.182446 * sd / 2, abs=1e-5)
    assert s.fmt() == "+3.00 ± 1.08 [-0.44, +6.44]"
    # signs: zero is not positive
    assert summarize_differences([-1.0, 0.0, 2.0]).positive == 1
    one = summarize_differences([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.se) and one.fmt() == "+0.50 (1 pair)"
    assert summarize_differences([]).fmt() == "no pairs"
    with pytest.raises(ValueError, match="finite"):
        summarize_differences([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        summarize_differences([1.0, 2.0], confidence=95)
    assert isinstance(s, PairedSummary) and s.to_dict()["n"] == 4


def test_paired_differences_and_pooling_by_hand():
    dm = {"photo": {0: 50.0, 1: 48.0, 2: 52.0}, "sketch": {0: 40.0, 1: 41.0}}
    sgs = {"photo": {0: 51.0, 1: 47.0, 2: 55.0, 3: 60.0}, "sketch": {0: 42.0, 1: 41.0}, "cartoon": {0: 1.0}}
    assert paired_differences(dm["photo"], sgs["photo"]) == {0: 1.0, 1: -1.0, 2: 3.0}  # seed 3 has no pair
    out = compare(dm, sgs)
    assert list(out["per_target"]) == ["photo", "sketch"]  # cartoon has no baseline
    photo = out["per_target"]["photo"]["summary"]
    assert photo.mean == pytest.approx(1.0) and photo.sd == pytest.approx(2.0) and photo.positive == 2
    # pooled: 1, -1, 3, 2, 0 -> mean 1, sd = sqrt((0 + 4 + 4 + 1 + 1) / 4) = sqrt(2.5), t(4) = 2.776445
    pooled = out["pooled"]
    assert (pooled.n, pooled.positive) == (5, 3) and pooled.mean == pytest.approx(1.0)
    assert pooled.se == pytest.approx(math.sqrt(2.5 / 5))
    assert pooled.ci_high == pytest.approx(1 + 2.776445 * math.sqrt(0.5), abs=1e-5)


def _write(run, method, seed, target, ood, ind, **extra):
    path = run / method / f"seed{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target_domain": target, "ood_acc_mean": ood, "in_domain_acc_mean": ind,
                                "config": {"epochs": 300}, **extra}))


def _study(tmp_path):
    values = {  # target -> method -> per-seed (OOD, in-domain)
        "photo": {"dm": [(0.50, 0.60), (0.48, 0.61)], "dm_sgs": [(0.51, 0.62), (0.47, 0.62)]},
        "sketch": {"dm": [(0.40, 0.55), (0.42, 0.56)], "dm_sgs": [(0.43, 0.55), (0.44, 0.58)]},
    }
    for target, methods in values.items():
        for method, seeds in methods.items():
            for seed, (ood, ind) in enumerate(seeds):
                _write(tmp_path / target, method, seed, target, ood, ind,
                       per_arch={"vgg11": {"ood_acc_mean": ood - 0.1}})
    return [tmp_path / "photo", tmp_path / "sketch"]


def test_tables_from_run_folders(tmp_path):
    runs = _study(tmp_path)
    loaded = load_seed_metrics(runs, "dm_sgs")
    assert sorted(loaded) == ["photo", "sketch"] and sorted(loaded["photo"]) == [0, 1]
    assert accuracies(loaded)["sketch"] == {0: pytest.approx(43.0), 1: pytest.approx(44.0)}
    assert accuracies(loaded, "per_arch.vgg11.ood_acc_mean")["photo"][0] == pytest.approx(41.0)
    table = markdown_tables({"DM": (runs, "dm"), "DM+SGS": (runs, "dm_sgs")}, baseline="DM")
    lines = table.splitlines()
    # photo OOD: 51-50 = +1, 47-48 = -1 -> mean 0, sd sqrt(2), se 1, t(1) = 12.706
    assert "| photo | DM+SGS | 49.0 ± 2.8 | +0.00 ± 1.00 [-12.71, +12.71] | 1/2 |" in table
    assert "| photo | DM | 49.0 ± 1.4 |  |  |" in table
    # sketch in-domain: 0, +2 -> mean 1, se 1
    assert any(line.startswith("| sketch | DM+SGS |") and "| +1.00 ± 1.00 [-11.71, +13.71] | 1/2 |" in line
               for line in lines)
    # pooled OOD: +1, -1, +3, +2 -> mean 1.25, sd sqrt(8.75/3), t(3)
    se = math.sqrt(8.75 / 3) / 2
    expected = f"+1.25 ± {se:.2f} [{1.25 - 3.182446 * se:+.2f}, {1.25 + 3.182446 * se:+.2f}] | 3/4"
    assert f"| DM+SGS | 4 | {expected} |" in table
    assert "95% Student-t interval" in table
    with pytest.raises(ValueError, match="baseline"):
        markdown_tables({"DM": (runs, "dm")}, baseline="dm")


def test_run_folder_errors(tmp_path):
    _write(tmp_path / "a", "dm", 0, "photo", 0.5, 0.6)
    _write(tmp_path / "b", "dm", 0, "photo", 0.5, 0.6)
    with pytest.raises(ValueError, match="twice"):
        load_seed_metrics([tmp_path / "a", tmp_path / "b"], "dm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_seed_metrics([tmp_path / "missing"], "dm")
    bad = tmp_path / "c" / "dm" / "seed0" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a per-seed metrics.json"):
        load_seed_metrics([tmp_path / "c"], "dm")
    with pytest.raises(KeyError):
        lookup({"a": {"b": 1}}, "a.c")


def test_pairs_plot(tmp_path):
    runs = _study(tmp_path)
    arms = {label: accuracies(load_seed_metrics(runs, m)) for label, m in (("DM", "dm"), ("DM+SGS", "dm_sgs"))}
    png = save_pairs_plot(arms, tmp_path / "pairs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        save_pairs_plot({"DM": {}}, tmp_path / "x.png")
