"""Sharded distillation and evaluation on torch.distributed: 2 gloo processes (one thread each)
on a tiny dataset give the single-process result.

What is compared how: the synthetic images bitwise (every class's computation is the same in
both runs: its own random streams, the same network, per-image convolutions); the loss history
to 1e-6 relative (the per-class sums are added in another order: chunk/rank sums, then an
all-reduce); evaluation accuracies bitwise, their means to 1e-12 (the per-domain means are
weighted means of the blocks' means).

One launch of 2 processes (torch.multiprocessing spawn, the torchrun environment variables set
by hand; starting them takes most of the time) serves all tests of this file: it distils, checks
the refusals, is killed mid-run (each rank raises in the same iteration, as torchrun stops all
processes when one dies), resumes from the checkpoint file and runs the whole pipeline
(Experiment.run).
"""
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from tiny_domains import CrashingDomains, TinyDomains

from sgs_cuda import SGSConfig, distributed
from sgs_cuda.dm import DistillConfig, distill
from sgs_cuda.dm.checkpoint import CHECKPOINT_NAME

WORLD = 2
DOMAINS = ["d0", "d1", "d2"]
CASES = {"dm": dict(method="dm"), "dm_sgs": dict(method="dm_sgs"),
         "fixed": dict(method="dm_sgs", sgs=SGSConfig(assignment="fixed")),
         "m3d": dict(method="dm_sgs", matching="m3d"), "spatial": dict(method="dm_sgs", sgs=SGSConfig(space="spatial")),
         "chunked": dict(method="dm_sgs", class_chunk=1), "noise": dict(method="dm", init="noise"),
         "dam": dict(method="dm_dam")}  # its mask logits are sharded and gathered like the images


def tiny_cfg(**kw):
    base = dict(ipc=2, iterations=5, batch_real=6, width=8, depth=2, log_every=2)
    base.update(kw)
    return DistillConfig(**base)




CUT = dict(method="dm_sgs", iterations=7, checkpoint_every=2)


def crash_limit(rank):
    """Calls until iteration 5 (0-based) of a rank: 2 init draws per class (ipc 2 over 3 domains),
    3 per class and iteration; rank 0 holds class 0, rank 1 classes 1 and 2."""
    classes = len(range(3)[rank * 3 // WORLD:(rank + 1) * 3 // WORLD])
    return 2 * classes + 3 * classes * 5 + 1


TINY_RUN = {"distill.ipc": 2, "distill.iterations": 4, "distill.batch_real": 6, "distill.width": 8,
            "distill.depth": 2, "distill.checkpoint_every": 2, "distill.log_every": 2, "eval.epochs": 3,
            "eval.num_eval": 3, "eval.width": 8, "eval.depth": 2, "progress": False,
            "methods": ["random", "dm", "dm_sgs"]}


class RunDomains(TinyDomains):
    def __init__(self):
        super().__init__(D=3, K=3, size=8, n_train=12, n_test=6, mean=(0.5,) * 3, std=(0.25,) * 3)


# --- what each process runs ------------------------------------------------------------------

def sharded_work(world, tmp):
    from sgs_cuda.config import resolve_config
    from sgs_cuda.experiment import Experiment

    out = {}
    for name, kw in CASES.items():
        r = distill(TinyDomains(), DOMAINS, tiny_cfg(**kw), progress=False, world=world, log=lambda m: None)
        out[name] = (r.images, r.history)
    for name, kw in {"batchnorm": dict(norm="batchnorm")}.items():
        try:
            distill(TinyDomains(), DOMAINS, tiny_cfg(**kw), progress=False, world=world, log=lambda m: None)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    try:
        distill(CrashingDomains(crash_limit(world.rank)), DOMAINS, tiny_cfg(**CUT), run_dir=tmp / "cut",
                progress=False, world=world, log=lambda m: None)
        out["killed"] = False
    except KeyboardInterrupt:
        out["killed"] = True
    out["errors"] = [_error_of(lambda: world.on_main(_fail_on_main)),
                     _error_of(lambda: world.local_first(lambda: _fail_on_rank(world.rank, 1)))]
    world.on_main(lambda: shutil.copytree(tmp / "cut", tmp / "cut-copy"))  # the checkpoint as the kill left it
    lines = []
    resumed = distill(TinyDomains(), DOMAINS, tiny_cfg(**CUT), run_dir=tmp / "cut", resume=True, progress=False,
                      world=world, log=lines.append)
    exp = Experiment(resolve_config(TINY_RUN), tmp / "run2", data=RunDomains(), log=lines.append)
    out.update(resumed=resumed.images, lines=lines, metrics=exp.run())
    return out


def _fail_on_main():
    raise ValueError("bad run folder")


def _fail_on_rank(rank, bad):
    if rank == bad:
        raise OSError("disk gone")
    return rank


def _error_of(fn):
    try:
        return ("returned", fn())
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc))


def _worker(rank, port, fn_name, tmp, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world, device = distributed.init_from_env("cpu")
    assert (world.rank, world.world_size, world.backend, device.type) == (rank, WORLD, "gloo", "cpu")
    try:
        torch.save(globals()[fn_name](world, tmp), out / f"{fn_name}-rank{rank}.pt")
    finally:
        distributed.shutdown()


def launch(fn_name, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, fn_name, tmp, tmp), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"{fn_name}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    ranks = launch("sharded_work", tmp)
    return tmp, ranks, ranks


# --- the tests ---------------------------------------------------------------------------------

def assert_history_close(got, want):
    assert got.keys() == want.keys() and got["iteration"] == want["iteration"]
    for key in got:
        if key == "bands":
            assert got[key]["iteration"] == want[key]["iteration"]
            for k in got[key]:
                torch.testing.assert_close(torch.tensor(got[key][k]), torch.tensor(want[key][k]), rtol=1e-6, atol=1e-9)
        else:
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_set_equals_single_process_bitwise(launches, name):
    _, first, _ = launches
    single = distill(TinyDomains(), DOMAINS, tiny_cfg(**CASES[name]), progress=False, log=lambda m: None)
    for rank in range(WORLD):  # every rank returns the whole gathered set
        images, history = first[rank][name]
        assert torch.equal(images, single.images), f"rank {rank}: the gathered set differs from one process's"
        assert_history_close(history, single.history)  # sums in another order: to 1e-6


def test_interacting_classes_are_refused(launches):
    _, first, _ = launches
    for rank in range(WORLD):
        assert "batchnorm pools its batch statistics over the classes" in first[rank]["batchnorm"]


def test_a_failure_on_one_rank_is_raised_on_every_rank(launches):
    _, ranks, _ = launches
    for rank in range(WORLD):  # rank 0's error, as it is; rank 1's error, named
        assert ranks[rank]["errors"][0] == ("ValueError", "bad run folder")
    assert ranks[0]["errors"][1] == ("RankFailure", "rank 1 failed: OSError: disk gone")
    assert ranks[1]["errors"][1] == ("OSError", "disk gone")


def test_killed_sharded_run_resumes_to_the_same_set(launches, tmp_path):
    tmp, first, second = launches
    assert all(first[r]["killed"] for r in range(WORLD))
    full = distill(TinyDomains(), DOMAINS, tiny_cfg(**CUT), progress=False, log=lambda m: None)
    assert sorted(p.name for p in (tmp / "cut-copy").iterdir()) == [CHECKPOINT_NAME]  # rank 0 wrote one file
    saved = torch.load(tmp / "cut-copy" / CHECKPOINT_NAME, weights_only=False)
    assert saved["iteration"] == 4 and saved["images"].shape[0] == 6  # every rank's classes
    for rank in range(WORLD):
        assert torch.equal(second[rank]["resumed"], full.images)
    assert any(line.startswith("resuming from iteration 4 of 7") for line in second[0]["lines"])
    assert not second[1]["lines"]  # rank 0 alone logs
    # the checkpoint of 2 processes resumes with one (and the other way round: it holds the whole set)
    shutil.copytree(tmp / "cut-copy", tmp_path / "cut")
    alone = distill(TinyDomains(), DOMAINS, tiny_cfg(**CUT), run_dir=tmp_path / "cut", resume=True, progress=False,
                    log=lambda m: None)
    assert torch.equal(alone.images, full.images)


def test_sharded_pipeline_equals_single_process(launches, tmp_path):
    from sgs_cuda.config import resolve_config
    from sgs_cuda.experiment import Experiment

    tmp, _, second = launches
    exp = Experiment(resolve_config(TINY_RUN), tmp_path / "run1", data=RunDomains(), log=lambda m: None)
    want = exp.run()
    got = second[0]["metrics"]
    assert second[1]["metrics"] == got  # every rank returns the merged metrics
    assert got["methods"].keys() == want["methods"].keys()
    for method, row in want["methods"].items():
        for key, value in row.items():
            if key.endswith("seconds"):
                continue
            if isinstance(value, float):
                assert got["methods"][method][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (method, key)
            else:
                assert got["methods"][method][key] == value, (method, key)
    run2 = tmp / "run2"
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(run2) == files(tmp_path / "run1")
    for method in ("dm", "dm_sgs"):
        a = torch.load(run2 / method / "seed0" / "synthetic.pt", weights_only=False)
        b = torch.load(tmp_path / "run1" / method / "seed0" / "synthetic.pt", weights_only=False)
        assert torch.equal(a["images"], b["images"]) and a["config"] == b["config"]
        ma = (run2 / method / "seed0" / "metrics.json").read_text()
        assert '"num_eval": 3' in ma
    config = (run2 / "config.json").read_text()
    assert '"processes": 2' in config


def test_world_helpers_alone():
    world = distributed.SOLO
    assert not world.sharded and world.is_main and world.shard(5) == range(5)
    assert world.on_main(lambda: 3) == 3 and world.broadcast("x") == "x" and world.gather(1) == [1]
    t = torch.arange(4.0)
    assert world.all_sum(t) is t and world.gather_rows(t) is t
    blocks = [distributed.World(r, 3).shard(10) for r in range(3)]
    assert [len(b) for b in blocks] == [3, 3, 4] and [i for b in blocks for i in b] == list(range(10))
    assert distributed.init_from_env("cpu") == (distributed.SOLO, None)  # no torchrun variables here


def test_what_cannot_be_sharded_is_refused_before_starting(monkeypatch):
    from sgs_cuda.dm.loop import check_shardable

    four = distributed.World(0, 4)
    with pytest.raises(ValueError, match="3 classes cannot be shared by 4 processes: start at most 3"):
        check_shardable(tiny_cfg(), 3, four)
    with pytest.raises(ValueError, match="batchnorm pools"):
        check_shardable(tiny_cfg(norm="batchnorm"), 8, four)
    check_shardable(tiny_cfg(norm="batchnorm"), 3, distributed.SOLO)  # one process: anything
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="takes the GPU of its LOCAL_RANK: use --device auto, cuda or cpu"):
        distributed.init_from_env("cuda:1")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match=r"torchrun's \['MASTER_PORT'\] are not"):
        distributed.init_from_env("cpu")


def test_evaluation_blocks_merge_to_the_whole_evaluation():
    """The evaluation networks split in blocks (as ranks share them, ``nets=``), their raw counts
    merged: the metrics equal one process's bitwise, the per-network accuracies and the means."""
    from sgs_cuda.evaluate import EvalConfig, evaluate_synthetic, evaluation_metrics, merge_scores, score_networks

    data = TinyDomains(D=4, K=3, size=8)
    images, labels = data.split_tensors(["d2", "d3"], "train")
    ecfg = EvalConfig(epochs=3, num_eval=5, width=8, depth=2, batch=8, arch="convnet,alexnet:4")

    def evaluate(cfg, seed, nets=None):
        return evaluate_synthetic(images, labels, data, ["d2", "d3"], ["d0", "d1"], cfg, seed=seed, nets=nets)

    whole = evaluate(ecfg, 7)
    blocks = [range(0, 2), range(2, 4), range(4, 5)]
    parts = [score_networks(images, labels, data, ["d2", "d3"], ["d0", "d1"], ecfg, seed=7, nets=b) for b in blocks]
    merged = evaluation_metrics(merge_scores(parts))

    def compare(got, want, where=""):
        assert type(got) is type(want) or isinstance(want, float), where
        if isinstance(want, dict):
            assert got.keys() == want.keys(), where
            for k in want:
                if k != "seconds":
                    compare(got[k], want[k], f"{where}.{k}")
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), where
            assert got == want or (got != got and want != want), where  # from the same counts: bitwise
        else:
            assert got == want, where  # lists of per-network accuracies: bitwise

    compare(merged, whole)
    assert merged["num_eval"] == 5 and len(merged["per_arch"]["alexnet"]["targets"]["d1"]["ood_acc"]) == 5
    with pytest.raises(ValueError, match="nets must index"):
        evaluate(ecfg, 7, [5])
