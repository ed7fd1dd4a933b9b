"""The ImageNet pipeline end to end on the generated demo tree (real JPEG files in the ImageNet
train/val, ImageNet-Sketch, -R and -V2 layouts; one class missing from -R; one corrupt file):
``sgs-dgdd run --preset imagenette-cpu`` with tiny iterations, several OOD targets in one
evaluation, the missing class reported and left out, the corrupt file listed, test sets
streamed, reuse when the targets change, ``compare`` with a column per target."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from sgs_cuda import cli, evaluate, experiment
from sgs_cuda.config import resolve_config
from sgs_cuda.data import PseudoDomainDataset, load_dataset
from sgs_cuda.data.cells import DecodedCells
from sgs_cuda.data.demo_tree import MARKER, V2_FOLDER, demo_command, demo_paths, make_demo_imagenet
from sgs_cuda.data.holdout import HeldOutPositions
from sgs_cuda.data.imagenet import imagenet1k_wnids, subset_wnids

NETTE = subset_wnids("imagenette")
R_LACKS = NETTE[3]
TARGETS = ["imagenet-sketch", "imagenet-r", "imagenet-v2"]
TINY = ["--iterations", "3", "--ipc", "1", "--batch-real", "8", "--width", "8", "--eval-width", "8",
        "--eval-epochs", "3", "--checkpoint-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "tree"
    info = make_demo_imagenet(root, train_per_class=6, val_per_class=2, target_per_class=2)
    return {**info, "dir": root, "cache": tmp_path_factory.mktemp("data-cache")}


def data_args(tree) -> list[str]:
    """The demo tree's roots, and a decode / pseudo-domain cache of this module only (the SGS op's
    extension stays in the usual cache: no rebuild)."""
    p = demo_paths(tree["dir"])
    return ["--data-root", str(p["root"]), "--sketch-root", str(p["sketch_root"]),
            "--imagenet-r-root", str(p["r_root"]), "--imagenet-v2-root", str(p["v2_root"]),
            "--data-option", f"cache_dir={tree['cache']}"]


class NotInMemory(AssertionError):
    pass


@pytest.fixture(scope="module")
def run_dir(tree, tmp_path_factory):
    """One `sgs-dgdd run --preset imagenette-cpu` (seeds 0 and 1, tiny), shared by the tests below;
    no split is ever materialised whole (split_tensors raises)."""
    out = tmp_path_factory.mktemp("runs") / "nette"
    mp = pytest.MonkeyPatch()
    for cls in (DecodedCells, PseudoDomainDataset):
        mp.setattr(cls, "split_tensors", lambda *a, **k: (_ for _ in ()).throw(NotInMemory("split held whole")))
    lines = []
    mp.setattr(experiment, "_stderr", lines.append)
    try:
        with pytest.warns(UserWarning):  # the loader warns about the missing class and the corrupt file
            rc = cli.main(["run", "--preset", "imagenette-cpu", *data_args(tree), "--run-dir", str(out),
                           "--seeds", "0", "1", *TINY])
    finally:
        mp.undo()
    assert rc == 0, lines
    return out, lines


def test_the_demo_tree_is_in_the_real_layouts(tree, tmp_path):
    root = tree["dir"]
    wnids = imagenet1k_wnids()
    assert tree["classes"] == NETTE and tree["missing_from_r"] == [R_LACKS] and tree["created"]
    for w in NETTE:
        assert len(list((root / "imagenet" / "train" / w).glob("*.JPEG"))) == 6 + (w == NETTE[0])  # + the corrupt one
        assert len(list((root / "imagenet" / "val" / w).glob("ILSVRC2012_val_*.JPEG"))) == 2
        assert len(list((root / "imagenet-sketch" / "sketch" / w).glob("*.JPEG"))) == 2
        assert (root / "imagenet-r" / "imagenet-r" / w).is_dir() == (w != R_LACKS)
        assert len(list((root / "imagenet-v2" / V2_FOLDER / str(wnids.index(w))).glob("*.jpeg"))) == 2
    good = next((root / "imagenet" / "val" / NETTE[2]).iterdir())
    with Image.open(good) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 40
    with pytest.raises(OSError):  # the corrupt file really is unreadable
        with Image.open(tree["corrupt"][0]) as im:
            im.load()
    # made again: kept as it is; another folder that is not empty: refused, nothing written
    assert make_demo_imagenet(root, train_per_class=6, val_per_class=2, target_per_class=2)["created"] is False
    with pytest.raises(ValueError, match="other settings"):
        make_demo_imagenet(root)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_demo_imagenet(busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert demo_command(root).startswith("sgs-dgdd run --preset imagenette-cpu --data-root ")


def test_make_demo_command(tmp_path, capsys):
    assert cli.main(["make-demo-imagenet", str(tmp_path / "d"), "--train-per-class", "2"]) == 0
    out = capsys.readouterr().out
    assert "177 JPEG files" in out and "imagenet-r lacks n03000684" in out and "--imagenet-v2-root" in out
    assert (tmp_path / "d" / MARKER).is_file() and not [p for p in tmp_path.iterdir() if p.name != "d"]
    assert cli.main(["make-demo-imagenet", str(tmp_path / "d")]) == 2  # other settings: one line
    assert "other settings" in capsys.readouterr().err


def test_run_evaluates_every_target_once(run_dir, tree):
    out, lines = run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_domains"] == TARGETS and metrics["source_domains"] == ["imagenet"]
    assert metrics["target"] == "imagenet-sketch+imagenet-r+imagenet-v2"
    assert metrics["missing_classes"] == {"imagenet-r": [R_LACKS]}
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["distill_domains"] == ["pseudo0", "pseudo1"]
    assert config["resolved"]["missing_classes"] == {"imagenet-r": [R_LACKS]}
    assert config["data_kwargs"]["resolution"] == 32 and config["target"] == TARGETS
    for method in ("dm", "dm_sgs"):
        row = metrics["methods"][method]
        assert list(row["targets"]) == TARGETS and row["num_nets"] == 4  # 2 nets x 2 seeds
        for seed in (0, 1):
            per = json.loads((out / method / f"seed{seed}" / "metrics.json").read_text())
            assert per["target_domains"] == TARGETS and per["source_domains"] == ["imagenet"]
            t = per["targets"]
            assert {k: v["test_images"] for k, v in t.items()} == {
                "imagenet-sketch": 20, "imagenet-r": 18, "imagenet-v2": 20}  # R: 9 classes x 2
            assert t["imagenet-r"]["missing_classes"] == [R_LACKS] and t["imagenet-sketch"]["missing_classes"] == []
            for k in range(2):  # the OOD accuracy of a net is the mean over the targets
                assert per["ood_acc"][k] == pytest.approx(sum(t[x]["ood_acc"][k] for x in TARGETS) / 3)
            assert per["per_domain"]["imagenet"] == pytest.approx(per["in_domain_acc_mean"])
            for x in TARGETS:  # scored on multiples of 1/(test images)
                n = t[x]["test_images"]
                assert all(abs(a * n - round(a * n)) < 1e-9 for a in t[x]["ood_acc"])
    # the evaluation nets were trained once per set: one "training" line per set
    assert sum("training 2 network(s)" in line for line in lines) == 4
    assert any("imagenet-r lacks 1 of the 10 classes (n03000684): scored on the others" in line for line in lines)
    bad = (out / "bad_images.txt").read_text().splitlines()
    assert len(bad) == 1 and bad[0].split("\t")[0] == tree["corrupt"][0]


def test_table_and_show_have_a_column_per_target(run_dir, capsys):
    out, _ = run_dir
    assert cli.main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    head = next(line for line in text.splitlines() if line.startswith("method"))
    assert head.split() == ["method", "sketch", "r", "v2", "OOD", "mean", "%", "in-domain", "acc", "%", "nets",
                            "distil", "s", "eval", "s"]
    assert "targets (OOD): imagenet-sketch, imagenet-r, imagenet-v2" in text
    assert "imagenet-r lacks 1 class(es) (n03000684)" in text and "32 px" in text and "2 pseudo-domains" in text
    metrics = json.loads((out / "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("dm_sgs"))
    expected = [metrics["methods"]["dm_sgs"]["targets"][t]["ood_acc_mean"] for t in TARGETS]
    expected.append(metrics["methods"]["dm_sgs"]["ood_acc_mean"])
    assert [float(x) for x in row.split()[1::3][:4]] == pytest.approx([100 * e for e in expected], abs=0.006)


def test_compare_has_a_column_per_target(run_dir, tmp_path, capsys):
    out, _ = run_dir
    assert cli.main(["compare", str(out), "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "c.json").read_text())
    assert set(result["sections"]) == {"main", "targets"}
    for t in TARGETS:
        assert f"OOD ({t}) %" in result["sections"]["targets"]
    assert "| imagenet-sketch+imagenet-r+imagenet-v2 | DM+SGS |" in text
    per = {(m, s): json.loads((out / m / f"seed{s}" / "metrics.json").read_text()) for m in ("dm", "dm_sgs")
           for s in (0, 1)}
    for t in TARGETS:  # the paired differences per target come from the per-seed metrics
        c = result["comparisons"][f"targets.{t}.ood_acc_mean"]["DM+SGS"]["per_target"][
            "imagenet-sketch+imagenet-r+imagenet-v2"]
        assert c["differences"] == pytest.approx({str(s): 100 * (per["dm_sgs", s]["targets"][t]["ood_acc_mean"]
                                                                 - per["dm", s]["targets"][t]["ood_acc_mean"])
                                                  for s in (0, 1)})
    main = result["comparisons"]["ood_acc_mean"]["DM+SGS"]["pooled"]
    assert main["n"] == 2  # one pair per seed (the mean over targets), not one per seed and target


def test_resume_reuses_the_sets_when_the_targets_change(run_dir, tree, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run_dir[0], out)
    lines = []
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning):
        mp.setattr(experiment, "_stderr", lines.append)
        rc = cli.main(["evaluate", "--run-dir", str(out), "--target", "imagenet-r", "--method", "dm",
                       "--seeds", "0", "--no-progress"])
    assert rc == 0, lines
    per = json.loads((out / "dm" / "seed0" / "metrics.json").read_text())
    assert per["target_domains"] == ["imagenet-r"] and list(per["targets"]) == ["imagenet-r"]
    assert per["ood_acc"] == per["targets"]["imagenet-r"]["ood_acc"]
    assert not any("distilling" in line for line in lines)  # the set was reused, only evaluated again


def test_dm_sgs_on_one_training_domain_needs_pseudo_domains(tree, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(experiment, "load_data", lambda *a, **k: loads.append(1))
    rc = cli.main(["run", "--preset", "imagenette-cpu", *data_args(tree), "--pseudo-domains", "0", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "DM+SGS needs at least two source domains" in err and "--pseudo-domains K (K >= 2)" in err
    assert not loads  # said before the (long) data build
    assert cli.main(["run", "--preset", "imagenette-cpu", *data_args(tree), "--pseudo-domains", "1"]) == 2
    assert "must be an integer >= 2" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:imagenet-r lacks", "ignore:skipped 1 unreadable")
@pytest.mark.parametrize("argv,message", [
    (["--dataset", "PACS", "--data-root", "."], "--sketch-root (data option 'sketch_root') does not apply to dataset "
                                                "'PACS' (an image-folder dataset)"),
    (["--dataset", "fmnist-styles"], "--resolution (data option 'resolution') does not apply to dataset "
                                     "'fmnist-styles' (the embedded benchmark)"),
    (["--data-option", "resolutoin=64"], "data option 'resolutoin' does not apply to dataset 'imagenette'"),
    (["--data-option", "resolution"], "--data-option expects KEY=VALUE"),
    (["--imagenet-a-root", "/no/such/dir"], "--imagenet-a-root (data option 'a_root'): '/no/such/dir' does not exist"),
    (["--target", "imagenet-a"], "unknown target domain(s) ['imagenet-a']; the targets given are"),
])
def test_data_flag_errors_name_the_flag(tree, capsys, argv, message):
    rc = cli.main(["run", "--preset", "imagenette-cpu", *data_args(tree), *TINY, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_no_target_given_is_said(tree, capsys):
    p = demo_paths(tree["dir"])
    with pytest.warns(UserWarning):  # the corrupt file
        rc = cli.main(["run", "--preset", "imagenette-cpu", "--data-root", str(p["root"]), "--method", "dm", *TINY,
                       "--data-option", f"cache_dir={tree['cache']}"])
    assert rc == 2 and "has no out-of-distribution target: give at least one of --sketch-root" in \
        capsys.readouterr().err


def test_selection_counts_and_streams_the_held_out_images(tree, tmp_path, monkeypatch):
    from sgs_cuda.dm import DistillConfig
    from sgs_cuda.evaluate import EvalConfig
    from sgs_cuda.selection import select_lr

    p = demo_paths(tree["dir"])
    with pytest.warns(UserWarning):
        data = load_dataset("imagenette", root=p["root"], resolution=16, progress=False, cache_dir=tree["cache"])
    for cls in (DecodedCells, HeldOutPositions):
        monkeypatch.setattr(cls, "split_tensors", lambda *a, **k: (_ for _ in ()).throw(NotInMemory("materialised")))
    rec = select_lr(data, ["imagenet"], DistillConfig(method="dm", ipc=1, iterations=1, batch_real=4, width=4,
                                                      depth=2, dsa=False),
                    EvalConfig(epochs=1, num_eval=1, width=4, depth=2, dsa=False), grid=[1.0], seeds=[0],
                    fraction=0.34)
    assert rec["holdout"] == {"fraction": 0.34, "seed": 0, "train_images": 40, "validation_images": 20}
    assert 0 <= rec["validation_acc"]["1.0"] <= 1


def test_presets_128(tmp_path, monkeypatch):
    names = ["imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow", "imagenet100"]
    assert set(f"{n}-128" for n in names) | {"imagenet-128", "imagenette-cpu"} <= set(cli.available_presets())
    for name in names:
        cfg = resolve_config({"distill.ipc": 50}, preset=f"{name}-128")
        assert cfg["dataset"] == {"imagenet100": "imagenet-100"}.get(name, name)
        d, e = cfg["distill"], cfg["eval"]
        assert (d["ipc"], d["iterations"], d["batch_real"], d["width"], d["depth"], d["norm"], d["lr_img"]) == \
            (50, 20000, 256, 128, "auto", "instancenorm", 1.0)
        assert (e["num_eval"], e["epochs"], e["width"], e["depth"], e["norm"]) == (5, 1000, 128, "auto", "instancenorm")
        from sgs_cuda.dm.networks import auto_depth
        assert auto_depth((3, 128, 128)) == 5  # ConvNetD5 at the presets' 128 px
        assert cfg["data_kwargs"] == {"resolution": 128, "crop": "center"} and cfg["pseudo_domains"] == 4
    # a named preset and the base preset with --dataset are the same configuration
    woof = cli.resolve_config(cli.build_parser().parse_args(["run", "--preset", "imagewoof-128"]))
    base = cli.resolve_config(cli.build_parser().parse_args(["run", "--preset", "imagenet-128", "--dataset",
                                                             "imagewoof"]))
    assert woof == base
    monkeypatch.setattr("sgs_cuda.config.PRESET_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ValueError, match="extends 'a', which extends it again"):
        resolve_config(preset="a")


# -- several targets in one evaluation, on a source whose answers are known --------------------------
class KnownAnswers:
    """Domains src (train/test), t1 (every class) and t2 (lacks class c): an image carries its
    label in its first pixel; only ``iter_split`` reads test images (``split_tensors`` raises)."""
    domains, classes, image_shape = ["src", "t1", "t2"], ["a", "b", "c"], (3, 4, 4)
    mean, std = (0.0,) * 3, (1.0,) * 3
    missing_classes = {"src": [], "t1": [], "t2": ["c"]}

    def count(self, domain, label, split="train"):
        if domain == "t2" and label == 2:
            return 0
        return {("src", "train"): 4, ("src", "test"): 2, ("t1", "test"): 3, ("t2", "test"): 5}.get((domain, split), 0)

    def _images(self, label, n):
        x = torch.rand(n, *self.image_shape)
        x[:, 0, 0, 0] = label
        return x

    def real_batch(self, domain, label, n, generator=None, split="train"):
        return self._images(label, n)

    def iter_split(self, domains, split="test", batch_size=512):
        for d in domains:
            for c in range(3):
                n = self.count(d, c, split)
                for start in range(0, n, batch_size):
                    k = min(batch_size, n - start)
                    yield self._images(c, k), torch.full((k,), c, dtype=torch.long)

    def split_tensors(self, domains, split="test"):
        raise NotInMemory("a test split held whole")


class FavoursC(torch.nn.Module):
    """Logits: class c always 2, the true class (read from the first pixel) +1: so the argmax is c
    (wrong unless the label is c), and among a and b it is the true class."""

    def forward(self, x):
        logits = torch.zeros(len(x), 3)
        logits[:, 2] = 2.0
        logits[torch.arange(len(x)), x[:, 0, 0, 0].round().long()] += 1.0
        return logits


def test_several_targets_missing_classes_restricted_and_recorded(monkeypatch):
    trained = []
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: trained.append(k["seed"]) or (FavoursC(), 0.5))
    data = KnownAnswers()
    cfg = evaluate.EvalConfig(num_eval=2, test_batch=2, width=4, depth=1)
    x, y = data.real_batch("src", 0, 3), torch.zeros(3, dtype=torch.long)
    r = evaluate.evaluate_synthetic(x, y, data, ["src"], ["t1", "t2"], cfg)
    assert len(trained) == 2  # one training per net, however many targets
    assert r["target_domain"] == "t1+t2" and r["target_domains"] == ["t1", "t2"]
    t1, t2 = r["targets"]["t1"], r["targets"]["t2"]
    assert t1["ood_acc"] == [1 / 3] * 2 and t1["unrestricted_acc_mean"] == pytest.approx(1 / 3)  # 3 of 9 are c
    assert t2["ood_acc"] == [1.0] * 2 and t2["unrestricted_acc_mean"] == 0.0  # restricted to a and b: all right
    assert t2["missing_classes"] == ["c"] and t2["test_images"] == 10 and t1["test_images"] == 9
    assert r["ood_acc"] == pytest.approx([2 / 3] * 2) and r["ood_acc_mean"] == pytest.approx(2 / 3)
    assert r["in_domain_acc"] == pytest.approx([1 / 3] * 2)  # the sources are never restricted
    assert r["per_domain"] == pytest.approx({"t1": 1 / 3, "t2": 1.0, "src": 1 / 3})
    assert r["per_arch"]["convnet"]["targets"] == r["targets"]
    one = evaluate.evaluate_synthetic(x, y, data, ["src"], "t2", cfg)  # one target: as before, a name
    assert one["target_domain"] == "t2" and one["ood_acc"] == [1.0, 1.0] and list(one["targets"]) == ["t2"]
    with pytest.raises(ValueError, match="'src' is also a source"):
        evaluate.evaluate_synthetic(x, y, data, ["src"], ["t1", "src"], cfg)
