"""The sgs-dgdd command end to end on a tiny in-memory dataset (seconds)."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_domains import TinyDomains as _TinyDomains

from sgs_cuda import cli, experiment
from sgs_cuda.compare import describe_run, load_run
from sgs_cuda.config import distill_config, parse_targets


class TinyDomains(_TinyDomains):
    def __init__(self, D=3, K=3, size=8, n_train=12, n_test=6, seed=0, noise=0.5):
        super().__init__(D, K, size, n_train, n_test, seed, noise, mean=(0.5,) * 3, std=(0.25,) * 3)


class Crash(Exception):
    pass


TINY = {"distill": {"ipc": 2, "iterations": 4, "batch_real": 6, "width": 8, "depth": 2, "checkpoint_every": 2,
                    "log_every": 2},
        "eval": {"epochs": 4, "num_eval": 2, "width": 8, "depth": 2}}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Route the pipeline's data loading to TinyDomains; returns a helper that runs ``main``."""
    made = []

    def load(name, root=None, **kw):
        made.append(TinyDomains(**kw))
        return made[-1]

    monkeypatch.setattr(experiment, "load_data", load)
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY))

    def run(*argv):
        return cli.main([argv[0], "--config", str(cfg_path), "--no-progress", *argv[1:]])

    run.made = made
    return run


def test_presets_and_resolution_order(tmp_path):
    paper = cli.resolve_config(cli.build_parser().parse_args(["run", "--preset", "paper"]))
    assert paper["distill"]["iterations"] == 20000 and paper["distill"]["batch_real"] == 256
    assert paper["eval"]["epochs"] == 1000 and paper["distill"]["width"] == 128 == paper["eval"]["width"]
    assert set(cli.available_presets()) >= {"quick", "paper"}
    quick = cli.resolve_config(cli.build_parser().parse_args(["run", "--preset", "quick"]))
    assert quick["distill"]["iterations"] < 1000 and quick["methods"] == ["dm", "dm_sgs"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("distill:\n  iterations: 77\n  ipc: 3\nsgs:\n  beta: 0.0\nseeds: [4, 5]\n")
    args = cli.build_parser().parse_args(
        ["run", "--preset", "quick", "--config", str(yaml_file), "--ipc", "5", "--method", "both", "random",
         "--alpha", "0.5", "--space", "spatial", "--no-dsa", "--set", "eval.epochs=9", "--set", "sgs.mask=soft"])
    cfg = cli.resolve_config(args)
    assert cfg["distill"]["iterations"] == 77  # file over preset
    assert cfg["distill"]["ipc"] == 5  # flag over file
    assert cfg["distill"]["width"] == quick["distill"]["width"]  # preset over defaults
    assert cfg["sgs"] == {**quick["sgs"], "alpha": 0.5, "beta": 0.0, "mask": "soft", "space": "spatial"}
    assert cfg["seeds"] == [4, 5] and cfg["methods"] == ["dm", "dm_sgs", "random"]
    assert cfg["eval"]["epochs"] == 9 and cfg["distill"]["dsa"] is False and cfg["eval"]["dsa"] is False
    dm_cfg = distill_config(cfg, "dm_sgs", 4)
    assert dm_cfg.sgs.alpha == 0.5 and dm_cfg.sgs.space == "spatial" and dm_cfg.seed == 4 and dm_cfg.ipc == 5


@pytest.mark.parametrize("argv,message", [
    (["run", "--preset", "nope"], "unknown preset"),
    (["run", "--method", "dc"], "unknown method"),
    (["run", "--set", "distill.ipcs=3"], "unknown config option"),
    (["run", "--tau", "2"], "tau must lie in"),
    (["run", "--target", "d9"], "unknown target domain"),
    (["run", "--device", "cuda:7" if not torch.cuda.is_available() else "cpux"], "cuda|device"),
])
def test_errors_are_reported_cleanly(tiny, capsys, tmp_path, argv, message):
    rc = tiny(*argv, "--run-dir", str(tmp_path / "r"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "sgs-dgdd: error:" in err and "Traceback" not in err
    assert re.search(message, err, re.I)


def test_run_end_to_end_and_show(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert tiny("run", "--run-dir", str(run_dir), "--target", "d1", "--method", "both", "random") == 0
    out = capsys.readouterr().out
    for name in ("dm ", "dm_sgs", "random", "OOD", "d1"):
        assert name in out
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.json", "curves.png"}
    for method in ("dm", "dm_sgs", "random"):
        sub = run_dir / method / "seed0"
        assert {"synthetic.pt", "synthetic.png", "metrics.json"} <= {p.name for p in sub.iterdir()}
        assert (sub / "checkpoint.pt").exists() == (method != "random")  # kept: lets --resume extend the run
        syn = torch.load(sub / "synthetic.pt", weights_only=False)
        assert syn["images"].shape == (6, 3, 8, 8) and syn["labels"].tolist() == [0, 0, 1, 1, 2, 2]
        assert syn["classes"] == ["c0", "c1", "c2"] and syn["mean"] == [0.5] * 3 and syn["std"] == [0.25] * 3
        assert syn["target"] == "d1" and syn["source_domains"] == ["d0", "d2"]
    assert (run_dir / "dm_sgs" / "seed0" / "curves.png").stat().st_size > 1000
    assert len(torch.load(run_dir / "dm_sgs" / "seed0" / "synthetic.pt", weights_only=False)["history"]["mask_fraction"]) == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["target"] == "d1" and list(metrics["methods"]) == ["dm", "dm_sgs", "random"]
    for row in metrics["methods"].values():
        assert 0 <= row["ood_acc_mean"] <= 1 and 0 <= row["in_domain_acc_mean"] <= 1 and row["num_nets"] == 2
    per = json.loads((run_dir / "dm" / "seed0" / "metrics.json").read_text())
    assert metrics["methods"]["dm"]["ood_acc_mean"] == pytest.approx(sum(per["ood_acc"]) / 2)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distill"]["iterations"] == 4 and config["resolved"]["source_domains"] == ["d0", "d2"]
    assert config["resolved"]["device"] == "cpu"

    assert cli.main(["show", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "dm_sgs" in shown and "4 iterations" in shown
    assert cli.main(["show", str(tmp_path / "missing")]) == 2


def test_resume_after_interruption_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    assert tiny("distill", "--run-dir", str(tmp_path / "full"), "--method", "dm_sgs", "--iterations", "6") == 0
    full = torch.load(tmp_path / "full" / "dm_sgs" / "seed0" / "synthetic.pt", weights_only=False)

    crashing = TinyDomains()
    real_batch = crashing.real_batch

    def dying(*a, **kw):  # killed during iteration 5 (init: 3 classes x 2 domains = 6 calls, then 6 per iteration)
        if len(crashing.calls) >= 6 + 6 * 4 + 3:
            raise Crash()
        return real_batch(*a, **kw)

    crashing.real_batch = dying
    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: crashing)
    with pytest.raises(Crash):
        tiny("run", "--run-dir", str(tmp_path / "cut"), "--method", "dm_sgs", "--iterations", "6")
    ckpt = torch.load(tmp_path / "cut" / "dm_sgs" / "seed0" / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 4

    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: TinyDomains())
    # --resume starts from the folder's config.json: no need to repeat the flags
    assert cli.main(["run", "--run-dir", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    resumed = torch.load(tmp_path / "cut" / "dm_sgs" / "seed0" / "synthetic.pt", weights_only=False)
    assert torch.equal(resumed["images"], full["images"])
    assert resumed["history"] == full["history"]

    # a second --resume reuses the finished sets and evaluations: no real batch is drawn
    fresh = TinyDomains()
    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: fresh)
    assert cli.main(["run", "--run-dir", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    assert not fresh.calls


def test_resume_extends_or_refuses_changed_settings(tiny, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"
    assert tiny("run", "--run-dir", str(run_dir), "--method", "both", "--iterations", "3") == 0
    assert tiny("run", "--run-dir", str(tmp_path / "long"), "--method", "dm_sgs", "--iterations", "5") == 0
    before = json.loads((run_dir / "dm_sgs" / "seed0" / "metrics.json").read_text())
    # more iterations: continues from the final checkpoint, same as a run that went there directly
    assert cli.main(["run", "--run-dir", str(run_dir), "--resume", "--iterations", "5", "--no-progress"]) == 0
    extended = torch.load(run_dir / "dm_sgs" / "seed0" / "synthetic.pt", weights_only=False)
    direct = torch.load(tmp_path / "long" / "dm_sgs" / "seed0" / "synthetic.pt", weights_only=False)
    assert torch.equal(extended["images"], direct["images"]) and extended["history"] == direct["history"]
    after = json.loads((run_dir / "dm_sgs" / "seed0" / "metrics.json").read_text())
    assert after["synthetic_sha1"] != before["synthetic_sha1"]  # re-evaluated on the new set
    capsys.readouterr()
    # the surgery settings do not concern plain DM, but a changed one refuses to mix into dm_sgs
    assert cli.main(["run", "--run-dir", str(run_dir), "--resume", "--beta", "0.7", "--method", "dm",
                     "--no-progress"]) == 0
    assert cli.main(["run", "--run-dir", str(run_dir), "--resume", "--beta", "0.7", "--method", "both",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other settings for ['sgs']" in err and "Traceback" not in err


def test_evaluate_subcommand_adds_methods(tiny, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert tiny("distill", "--run-dir", str(run_dir), "--method", "dm") == 0
    assert not (run_dir / "metrics.json").exists()
    assert cli.main(["evaluate", "--run-dir", str(run_dir), "--method", "dm", "random", "herding",
                     "--no-progress"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"dm", "random", "herding"} and metrics["target"] == "d0"
    assert cli.main(["evaluate", "--run-dir", str(run_dir), "--method", "dm_sgs", "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err
    assert set(json.loads((run_dir / "metrics.json").read_text())["methods"]) == {"dm", "random", "herding"}


def test_pseudo_domains(tiny, tmp_path):
    pytest.importorskip("sgs_cuda.data.pseudo_domains")
    run_dir = tmp_path / "p"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # clusters of this toy data may lack classes
        assert tiny("run", "--run-dir", str(run_dir), "--method", "dm_sgs", "--pseudo-domains", "2",
                    "--target", "d2") == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resolved"]["distill_domains"] == ["pseudo0", "pseudo1"]
    assert config["resolved"]["source_domains"] == ["d0", "d1"]
    syn = torch.load(run_dir / "dm_sgs" / "seed0" / "synthetic.pt", weights_only=False)
    assert syn["distill_domains"] == ["pseudo0", "pseudo1"] and syn["target"] == "d2"
    assert json.loads((run_dir / "metrics.json").read_text())["methods"]["dm_sgs"]["num_nets"] == 2


def test_default_run_dir_never_overwrites(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tiny("distill", "--method", "dm", "--iterations", "1") == 0
    assert tiny("distill", "--method", "dm", "--iterations", "1") == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fmnist-styles-d0-custom",
                                                                      "fmnist-styles-d0-custom-2"]
    before = (tmp_path / "runs" / "fmnist-styles-d0-custom-2" / "dm" / "seed0" / "synthetic.pt").stat().st_mtime_ns
    assert tiny("distill", "--method", "dm", "--iterations", "1", "--resume") == 0  # resumes the latest folder
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert (tmp_path / "runs" / "fmnist-styles-d0-custom-2" / "dm" / "seed0" / "synthetic.pt").stat().st_mtime_ns == before


def test_module_entry_point_help():
    env = {**os.environ, "SGS_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-m", "sgs_cuda.cli", "run", "--help"], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--preset", "--config", "--target", "--method", "--ipc", "--seeds", "--tau", "--rho", "--alpha",
                 "--beta", "--mask", "--assignment", "--device", "--run-dir", "--resume", "--checkpoint-every",
                 "--pseudo-domains", "--dataset", "--data-root"):
        assert flag in out.stdout


def test_selection_step_and_architecture_flags_map_onto_the_config():
    args = cli.build_parser().parse_args(
        ["run", "--preset", "medium", "--matching", "m3d", "--eval-arch", "convnet,vgg11:16", "--label", "M3D tuned",
         "--select-lr", "0.5, 1,2", "--select-seeds", "10", "11", "--holdout-fraction", "0.25"])
    cfg = cli.resolve_config(args)
    assert cfg["distill"]["matching"] == "m3d" and cfg["eval"]["arch"] == "convnet,vgg11:16"
    assert cfg["label"] == "M3D tuned"
    assert cfg["select"] == {"lr_grid": [0.5, 1.0, 2.0], "seeds": [10, 11], "fraction": 0.25, "holdout_seed": 0,
                             "validation": "images"}
    domain = cli.resolve_config(cli.build_parser().parse_args(["run", "--select-lr", "1", "--select-validation",
                                                               "domain"]))
    assert domain["select"]["validation"] == "domain"
    plain = cli.resolve_config(cli.build_parser().parse_args(["run"]))
    assert plain["select"]["lr_grid"] == [] and plain["label"] is None and plain["distill"]["matching"] == "dm"
    if "normalize" in plain["sgs"]:  # the op's matched-step option
        cfg = cli.resolve_config(cli.build_parser().parse_args(["run", "--normalize", "dm_norm"]))
        assert cfg["sgs"]["normalize"] == "dm_norm" and distill_config(cfg, "dm_sgs", 0).sgs.normalize == "dm_norm"


@pytest.mark.parametrize("argv,message", [
    (["run", "--select-lr", "0.5,fast"], "--select-lr expects comma-separated learning rates"),
    (["run", "--select-lr", "0,1"], "'select.lr_grid' must be a list of positive numbers"),
    (["run", "--select-lr", "1,1"], "lists a value twice"),
    (["run", "--select-lr", "1", "--holdout-fraction", "1.5"], "'select.fraction' must lie in"),
    (["run", "--select-lr", "1", "--set", "select.validation=oracle"], "'select.validation' must be 'images'"),
    (["run", "--eval-arch", "lenet"], "unknown architecture 'lenet'"),
    (["compare", "nowhere"], "run folder nowhere does not exist"),
])
def test_selection_step_and_architecture_errors_are_one_line(tiny, capsys, tmp_path, argv, message):
    rc = tiny(*argv, "--run-dir", str(tmp_path / "r")) if argv[0] != "compare" else cli.main(argv)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def _per_seed(run_dir, method, seed):
    return json.loads((Path(run_dir) / method / f"seed{seed}" / "metrics.json").read_text())


def test_select_lr_then_run_at_the_selected_step(tiny, tmp_path, capsys, monkeypatch):
    import sgs_cuda.selection as selection
    views = []
    real_distill = selection.distill
    monkeypatch.setattr(selection, "distill", lambda *a, **kw: views.append((a[0], a[2])) or real_distill(*a, **kw))
    run_dir = tmp_path / "r"
    argv = ["--run-dir", str(run_dir), "--target", "d1", "--method", "both", "--select-lr", "0.5,4",
            "--select-seeds", "10", "--seeds", "0", "1"]
    assert tiny("select-lr", *argv) == 0
    out = capsys.readouterr().out
    assert "dm " in out and "dm_sgs" in out and "selected" in out
    assert [(cfg.method, cfg.lr_img, cfg.seed) for _, cfg in views] == [
        ("dm", 0.5, 10), ("dm", 4.0, 10), ("dm_sgs", 0.5, 10), ("dm_sgs", 4.0, 10)]
    assert all(view.domains == ["d0", "d2"] for view, _ in views)  # the target is not in the validation view
    chosen = {}
    for m in ("dm", "dm_sgs"):
        rec = json.loads((run_dir / m / "lr_selection.json").read_text())
        assert rec["grid"] == [0.5, 4.0] and rec["seeds"] == [10] and rec["settings"]["distill"]["method"] == m
        chosen[m] = rec["selected_lr_img"]
        assert chosen[m] == max(rec["grid"], key=lambda lr: (rec["validation_acc"][str(lr)], -rec["grid"].index(lr)))
    views.clear()
    assert tiny("run", *argv, "--resume") == 0  # the selection is reused, then each method at its own step
    assert not views
    out = capsys.readouterr().out
    assert "lr_img selected on held-out source images" in out
    for m in ("dm", "dm_sgs"):
        for seed in (0, 1):
            syn = torch.load(run_dir / m / f"seed{seed}" / "synthetic.pt", weights_only=False)
            assert syn["config"]["lr_img"] == chosen[m] and syn["config"]["seed"] == seed
            assert _per_seed(run_dir, m, seed)["lr_img"] == chosen[m]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {m: r["selected_lr_img"] for m, r in metrics["lr_selection"].items()} == chosen
    assert "lr_img" in describe_run(load_run(run_dir))


def test_select_lr_leaving_each_source_domain_out(tiny, tmp_path, capsys, monkeypatch):
    import sgs_cuda.selection as selection
    folds = []
    real_distill = selection.distill
    monkeypatch.setattr(selection, "distill",
                        lambda data, domains, cfg, **kw: folds.append((list(domains), cfg.lr_img))
                        or real_distill(data, domains, cfg, **kw))
    argv = ["--run-dir", str(tmp_path / "r"), "--target", "d1", "--method", "dm", "--select-lr", "0.5,4",
            "--select-validation", "domain", "--seeds", "0"]
    assert tiny("select-lr", *argv) == 0
    printed = capsys.readouterr()
    assert "each source domain left out in turn" in printed.err and "left-out domain accuracy" in printed.out
    assert folds == [(["d2"], 0.5), (["d0"], 0.5), (["d2"], 4.0), (["d0"], 4.0)]  # the target d1 never
    rec = json.loads((tmp_path / "r" / "dm" / "lr_selection.json").read_text())
    assert set(rec["per_seed"]["0.5"]["10"]) == {"d0", "d2"}
    assert tiny("run", *argv, "--resume") == 0
    assert "lr_img selected on each source domain left out: dm" in capsys.readouterr().out


def test_compare_run_folders(tiny, tmp_path, capsys):
    seeds = ["--seeds", "0", "1"]
    for t in ("d0", "d1"):
        assert tiny("run", "--run-dir", str(tmp_path / t / "base"), "--target", t, "--method", "both", *seeds,
                    "--eval-arch", "convnet,resnet18:4") == 0
        assert tiny("run", "--run-dir", str(tmp_path / t / "spatial"), "--target", t, "--method", "dm_sgs",
                    "--space", "spatial", *seeds) == 0
        assert tiny("run", "--run-dir", str(tmp_path / t / "m3d"), "--target", t, "--method", "dm",
                    "--matching", "m3d", "--label", "M3D at DM's step", *seeds) == 0
    capsys.readouterr()
    dirs = [str(p) for p in sorted(tmp_path.glob("d*/*"))]
    plot, out_json = tmp_path / "pairs.png", tmp_path / "cmp.json"
    assert cli.main(["compare", *dirs, "--plot", str(plot), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["baseline"] == "DM"
    assert set(result["arms"]) == {"DM", "DM+SGS", "DM+SGS (space=spatial)", "M3D at DM's step"}
    assert plot.stat().st_size > 1000
    for name in result["arms"]:
        assert f"| d0 | {name} |" in text and f"| d1 | {name} |" in text
    assert "| DM+SGS (space=spatial) | 4 |" in text and "Evaluated by resnet18" in text
    # every number comes from the per-seed metrics: recompute one paired difference and interval
    from sgs_cuda.stats import summarize_differences
    diffs = [100 * (_per_seed(tmp_path / t / "base", "dm_sgs", s)["ood_acc_mean"]
                    - _per_seed(tmp_path / t / "base", "dm", s)["ood_acc_mean"]) for t in ("d0", "d1") for s in (0, 1)]
    pooled = result["comparisons"]["ood_acc_mean"]["DM+SGS"]["pooled"]
    assert pooled["mean"] == pytest.approx(sum(diffs) / 4) and pooled["n"] == 4
    assert pooled["positive"] == sum(d > 0 for d in diffs)
    assert (pooled["ci_low"], pooled["ci_high"]) == pytest.approx(
        (summarize_differences(diffs).ci_low, summarize_differences(diffs).ci_high))
    assert f"{summarize_differences(diffs).fmt()} | {pooled['positive']}/4" in text
    arch = result["comparisons"]["per_arch.resnet18.ood_acc_mean"]
    assert list(arch) == ["DM+SGS"]  # only the folders evaluated by resnet18
    # another baseline, a subset of arms; unknown names and clashing labels are one line
    assert cli.main(["compare", *dirs, "--baseline", "DM+SGS", "--arms", "DM+SGS", "DM+SGS (space=spatial)"]) == 0
    assert "Δ OOD vs DM+SGS" in capsys.readouterr().out
    assert cli.main(["compare", *dirs, "--baseline", "nope"]) == 2
    assert "not one of the arms" in capsys.readouterr().err
    assert tiny("run", "--run-dir", str(tmp_path / "clash"), "--target", "d0", "--method", "dm_sgs",
                "--label", "M3D at DM's step") == 0
    capsys.readouterr()
    assert cli.main(["compare", *dirs, str(tmp_path / "clash")]) == 2
    assert "different labels" in capsys.readouterr().err


def test_data_flags_map_onto_data_kwargs():
    args = cli.build_parser().parse_args(
        ["run", "--preset", "imagenette-128", "--sketch-root", "/s", "--imagenet-r-root", "/r", "--imagenet-a-root",
         "/a", "--imagenet-v2-root", "/v2", "--resolution", "64", "--decode-workers", "3", "--train-per-class", "50",
         "--data-option", "cache_dir=/fast", "--data-option", "seed=2", "--target", "imagenet-r,imagenet-a"])
    cfg = cli.resolve_config(args)
    assert cfg["data_kwargs"] == {"resolution": 64, "crop": "center", "sketch_root": "/s", "r_root": "/r",
                                  "a_root": "/a", "v2_root": "/v2", "num_workers": 3, "train_per_class": 50,
                                  "cache_dir": "/fast", "seed": 2}  # the preset's crop kept, its resolution replaced
    assert parse_targets(cfg["target"]) == ["imagenet-r", "imagenet-a"]
    later = cli.resolve_config(cli.build_parser().parse_args(
        ["run", "--resolution", "64", "--data-option", "resolution=256", "--set", "data_kwargs.crop=squash"]))
    assert later["data_kwargs"] == {"resolution": 256, "crop": "squash"}  # --data-option after the flags, --set last
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--resolution", "100"])


def test_data_flags_are_in_the_help_and_checked_before_loading(tiny, capsys, tmp_path):
    text = cli.build_parser().format_help()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    text += capsys.readouterr().out
    for flag in ("--sketch-root", "--imagenet-r-root", "--imagenet-a-root", "--imagenet-v2-root", "--resolution",
                 "--crop", "--decode-workers", "--train-per-class", "--data-option", "make-demo-imagenet"):
        assert flag in text
    # the default dataset (the embedded benchmark) takes none of the image-folder options: said, nothing loaded
    assert tiny("run", "--run-dir", str(tmp_path / "r"), "--crop", "center") == 2
    err = capsys.readouterr().err
    assert "--crop (data option 'crop') does not apply to dataset 'fmnist-styles'" in err and err.count("\n") == 1
    assert not tiny.made and not (tmp_path / "r").exists()
