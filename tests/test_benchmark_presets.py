"""The benchmark presets end to end on generated downloads: ``sgs-dgdd run --preset digits-32
--data-root DIR --target svhn`` (and core50-64, pacs-64) with everything shrunk to seconds (3
iterations, IPC 1, width 8, 2 evaluation nets x 2 epochs); the preset's protocol is checked from
the saved config, the target and sources from the metrics."""
from __future__ import annotations

import json

import pytest

from benchmark_files import make_core50, make_digits, make_pacs
from sgs_cuda import cli, config, experiment
from sgs_cuda.data.core50 import OUTDOOR

TINY = ["--iterations", "3", "--ipc", "1", "--batch-real", "8", "--width", "8", "--eval-width", "8",
        "--eval-epochs", "2", "--num-eval", "2", "--checkpoint-every", "0", "--no-progress"]


def run(tmp_path, preset, root, target, expect_warning=False):
    out = tmp_path / "run"
    argv = ["run", "--preset", preset, "--data-root", str(root), "--target", target, "--run-dir", str(out),
            "--data-option", f"cache_dir={tmp_path / 'cache'}", *TINY]
    mp = pytest.MonkeyPatch()
    lines = []
    mp.setattr(experiment, "_stderr", lines.append)
    try:
        assert cli.main(argv) == 0, lines
    finally:
        mp.undo()
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "config.json").read_text())


def test_digits_32_leaves_svhn_out(tmp_path):
    metrics, config = run(tmp_path, "digits-32", make_digits(tmp_path / "digits"), "svhn")
    assert metrics["target_domains"] == ["svhn"]
    assert metrics["source_domains"] == ["mnist", "mnist_m", "syn", "usps"]
    assert config["dataset"] == "digits" and config["distill"]["depth"] == 3 and config["eval"]["depth"] == 3
    assert config["distill"]["dsa"] and config["distill"]["norm"] == "instancenorm"
    per = json.loads((tmp_path / "run" / "dm_sgs" / "seed0" / "metrics.json").read_text())
    # every image of the target is scored (eval.target_split "all"): its 30 train and 20 test images
    assert per["targets"]["svhn"]["test_images"] == 50 and len(per["ood_acc"]) == 2


def test_core50_64_leaves_the_outdoor_sessions_out(tmp_path):
    metrics, config = run(tmp_path, "core50-64", make_core50(tmp_path / "core50", frames=2), "outdoor")
    assert metrics["target_domains"] == list(OUTDOOR) and len(metrics["source_domains"]) == 8
    assert config["dataset"] == "CORe50" and config["distill"]["depth"] == "auto"
    per = json.loads((tmp_path / "run" / "dm" / "seed0" / "metrics.json").read_text())
    assert per["targets"]["s4"]["test_images"] == 10 * 10  # every frame: 10 per category (5 objects x 2)


def test_pacs_64_leaves_sketch_out(tmp_path):
    metrics, config = run(tmp_path, "pacs-64", make_pacs(tmp_path / "pacs"), "sketch")
    assert metrics["target_domains"] == ["sketch"]
    assert metrics["source_domains"] == ["art_painting", "cartoon", "photo"]
    assert config["dataset"] == "PACS"


def test_a_missing_target_domain_names_the_files_looked_for(tmp_path):
    root = make_digits(tmp_path / "digits")
    for f in (root / "usps").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"unknown target domain 'usps'; .*usps: no usps/ under .*usps\.bz2"):
        with pytest.warns(UserWarning, match="usps not found"):
            experiment.prepare_data(config.resolve_config(
                {"dataset": "digits", "data_root": str(root), "target": "usps",
                 "data_kwargs": {"cache_dir": str(tmp_path / "cache")}}, preset="digits-32"))
