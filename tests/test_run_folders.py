"""Damaged or unwritable run folders, killed writes, and what a first run tells the user: every
case ends in one line naming the file and what to do, or is repaired, and never leaves temporary
files behind. Seconds each, on a tiny in-memory dataset."""
import errno
import json
import os
import subprocess

import pytest
import torch
from tiny_domains import TinyDomains as _TinyDomains

from sgs_cuda import cli, experiment
from sgs_cuda.config import FORMAT_VERSION


class TinyDomains(_TinyDomains):
    def __init__(self, **kw):
        super().__init__(D=3, K=3, size=8, n_train=12, n_test=6, mean=(0.5,) * 3, std=(0.25,) * 3)


class Crash(Exception):
    pass


TINY = {"distill": {"ipc": 2, "iterations": 4, "batch_real": 6, "width": 8, "depth": 2, "checkpoint_every": 2,
                    "log_every": 2},
        "eval": {"epochs": 4, "num_eval": 2, "width": 8, "depth": 2}}


@pytest.fixture
def sgs(tmp_path, monkeypatch, capsys):
    """``sgs(*argv)`` runs the CLI on TinyDomains and returns ``(exit status, stderr)``."""
    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: TinyDomains())
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY))

    def run(*argv):
        capsys.readouterr()
        rc = cli.main([argv[0], "--config", str(cfg_path), "--no-progress", *argv[1:]])
        return rc, capsys.readouterr().err

    return run


def one_line_error(rc, err, *needles):
    """The CLI failed with one ``sgs-dgdd: error:`` line holding every needle."""
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("sgs-dgdd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def temporaries(folder):
    return sorted(p for p in folder.rglob("*") if ".tmp" in p.name)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- damaged run state: one line naming the file and what to do --------------------------------

def test_truncated_checkpoint_with_resume_names_the_file(sgs, tmp_path):
    run_dir = tmp_path / "r"
    assert sgs("distill", "--run-dir", str(run_dir), "--method", "dm")[0] == 0
    (run_dir / "dm" / "seed0" / "synthetic.pt").unlink()  # as if killed before the set was written
    truncate(run_dir / "dm" / "seed0" / "checkpoint.pt")
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--method", "dm", "--resume")
    one_line_error(rc, err, "checkpoint.pt", "damaged", "delete it")


def test_truncated_synthetic_set_with_resume_names_the_file(sgs, tmp_path):
    run_dir = tmp_path / "r"
    assert sgs("run", "--run-dir", str(run_dir), "--method", "dm")[0] == 0
    truncate(run_dir / "dm" / "seed0" / "synthetic.pt")
    rc, err = sgs("run", "--run-dir", str(run_dir), "--resume")
    one_line_error(rc, err, "synthetic.pt", "damaged", "delete it")
    rc, err = sgs("evaluate", "--run-dir", str(run_dir), "--method", "dm")
    one_line_error(rc, err, "synthetic.pt", "damaged", "delete it")


@pytest.mark.parametrize("text,what", [("[1, 2]", "not a mapping"), ('{"distill": {"ipc": 2', "damaged")])
def test_config_json_not_a_mapping_or_truncated(sgs, tmp_path, text, what):
    run_dir = tmp_path / "r"
    assert sgs("distill", "--run-dir", str(run_dir), "--method", "dm")[0] == 0
    (run_dir / "config.json").write_text(text)
    for command in (["run", "--resume"], ["evaluate"]):
        rc, err = sgs(command[0], "--run-dir", str(run_dir), *command[1:])
        one_line_error(rc, err, "config.json", what)


@pytest.mark.parametrize("version", [None, 0])
def test_run_folders_of_an_older_format_are_refused(sgs, tmp_path, capsys, version):
    """A folder written before format_version (or with an older one) is refused by every command
    that continues or reuses it, in one line saying how to redo it, and nothing in it is touched;
    its finished results can still be shown."""
    run_dir = tmp_path / "r"
    assert sgs("run", "--run-dir", str(run_dir), "--method", "dm")[0] == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    if version is None:
        del config["format_version"]
    else:
        config["format_version"] = version
    (run_dir / "config.json").write_text(json.dumps(config))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    needles = (str(run_dir), "older sgs_cuda", "run it again into a new --run-dir")
    for command in (["run", "--resume"], ["distill", "--resume"], ["distill"], ["evaluate"]):
        one_line_error(*sgs(command[0], "--run-dir", str(run_dir), *command[1:]), *needles)
    capsys.readouterr()
    assert cli.main(["show", str(run_dir)]) == 0 and "dm" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_damaged_metrics_are_rebuilt(sgs, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert sgs("run", "--run-dir", str(run_dir), "--method", "dm", "random")[0] == 0
    per_seed = run_dir / "dm" / "seed0" / "metrics.json"
    good = json.loads(per_seed.read_text())
    truncate(run_dir / "metrics.json")
    truncate(per_seed)
    capsys.readouterr()
    rc = cli.main(["show", str(run_dir)])
    one_line_error(rc, capsys.readouterr().err, "metrics.json", "damaged", "evaluate")
    rc, err = sgs("run", "--run-dir", str(run_dir), "--resume")
    assert rc == 0, err
    assert "damaged" in err
    again = json.loads(per_seed.read_text())
    assert again["ood_acc"] == good["ood_acc"]  # evaluated again: same seeds, same numbers
    assert set(json.loads((run_dir / "metrics.json").read_text())["methods"]) == {"dm", "random"}
    assert cli.main(["show", str(run_dir)]) == 0


def test_missing_or_damaged_pngs_are_made_again_on_resume(sgs, tmp_path):
    """A kill right after synthetic.pt is written leaves no PNGs: the next run makes them."""
    run_dir = tmp_path / "r"
    assert sgs("distill", "--run-dir", str(run_dir), "--method", "dm", "dm_sgs")[0] == 0
    (run_dir / "dm" / "seed0" / "synthetic.png").unlink()
    (run_dir / "dm" / "seed0" / "curves.png").unlink()
    truncate(run_dir / "dm_sgs" / "seed0" / "synthetic.png")
    untouched = (run_dir / "dm_sgs" / "seed0" / "curves.png").stat().st_mtime_ns
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--resume")
    assert rc == 0, err
    assert "reusing" in err
    for method in ("dm", "dm_sgs"):
        for name in ("synthetic.png", "curves.png"):
            data = (run_dir / method / "seed0" / name).read_bytes()
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), (method, name)
    assert (run_dir / "dm_sgs" / "seed0" / "curves.png").stat().st_mtime_ns == untouched  # intact: kept


# --- writes that fail: one line, no debris ------------------------------------------------------

def test_run_dir_that_is_a_file_or_under_a_file(sgs, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = sgs("run", "--run-dir", str(blocker))
    one_line_error(rc, err, str(blocker), "is a file")
    rc, err = sgs("run", "--run-dir", str(blocker / "sub" / "run"))
    one_line_error(rc, err, str(blocker), "is a file")
    assert blocker.read_text() == "x"


def test_failed_writes_leave_no_temporary_files(sgs, tmp_path, monkeypatch):
    """torch.save dies half-way (disk full): one line; the temporary file is gone."""
    real_save = torch.save

    def half_written(obj, f, *a, **kw):
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint")
        else:
            open(f, "wb").write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run_dir = tmp_path / "r"
    monkeypatch.setattr(torch, "save", half_written)
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--method", "dm")
    one_line_error(rc, err, "checkpoint.pt", "no space left", "--resume")
    assert temporaries(run_dir) == []
    monkeypatch.setattr(torch, "save", real_save)
    assert sgs("distill", "--run-dir", str(run_dir), "--method", "dm", "--resume")[0] == 0


def test_read_only_file_system_mid_run(sgs, tmp_path, monkeypatch):
    """The rename fails with EROFS (the folder became read-only): one line, no temporary file."""
    real_replace = os.replace

    def refuse(src, dst, *a, **kw):
        if str(dst).endswith(".pt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", refuse)
    run_dir = tmp_path / "r"
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--method", "dm")
    one_line_error(rc, err, "checkpoint.pt", "read-only")
    assert temporaries(run_dir) == []


def test_stale_temporary_files_are_removed_at_the_next_start(sgs, tmp_path):
    run_dir = tmp_path / "r"
    assert sgs("distill", "--run-dir", str(run_dir), "--method", "dm")[0] == 0
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [run_dir / f".config.json.tmp{dead}", run_dir / "dm" / "seed0" / f".checkpoint.pt.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    live = run_dir / "dm" / "seed0" / f".synthetic.pt.tmp{os.getppid()}"  # a running writer's: kept
    live.write_bytes(b"y")
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--method", "dm", "--resume")
    assert rc == 0, err
    assert temporaries(run_dir) == [live]


def test_writes_are_fsynced_before_the_rename(sgs, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b, **kw: (events.append(f"replace {os.path.basename(b)}"),
                                                          real_replace(a, b, **kw))[1])
    assert sgs("distill", "--run-dir", str(tmp_path / "r"), "--method", "dm")[0] == 0
    renames = [i for i, e in enumerate(events) if e.startswith("replace")]
    assert {events[i].split()[1] for i in renames} >= {"config.json", "checkpoint.pt", "synthetic.pt",
                                                        "synthetic.png", "curves.png"}
    for i in renames:  # the file's data before its rename, the folder's entry after it
        assert events[i - 1] == "fsync" and events[i + 1] == "fsync", events[i - 1:i + 2]


# --- real small file systems (tmpfs; skipped where mounting is not allowed) --------------------

@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_kb, read_only=False)`` -> a fresh tmpfs folder; unmounted afterwards."""
    mounts = []

    def mount(size_kb, read_only=False):
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_real_tmpfs(sgs, tmpfs):
    fs = tmpfs(16)  # four pages: config.json fits, the first checkpoint does not
    run_dir = fs / "r"
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--method", "dm")
    one_line_error(rc, err, "no space left", "--resume")
    assert temporaries(fs) == []
    subprocess.run(["mount", "-o", "remount,size=2m", str(fs)], check=True)
    rc, err = sgs("distill", "--run-dir", str(run_dir), "--method", "dm", "--resume")
    assert rc == 0, err
    assert (run_dir / "dm" / "seed0" / "synthetic.pt").is_file() and temporaries(fs) == []


def test_read_only_real_tmpfs(sgs, tmpfs):
    fs = tmpfs(64, read_only=True)
    rc, err = sgs("run", "--run-dir", str(fs / "r"))
    one_line_error(rc, err, "read-only")


# --- the first run: options named as the user typed them, phases timed -----------------------

def test_set_value_of_the_wrong_type_names_the_option(sgs, tmp_path):
    rc, err = sgs("run", "--run-dir", str(tmp_path / "r"), "--set", "distill.iterations=abc")
    one_line_error(rc, err, "distill.iterations", "integer", "abc")
    rc, err = sgs("run", "--run-dir", str(tmp_path / "r"), "--set", "eval.dsa=maybe")
    one_line_error(rc, err, "eval.dsa", "true or false")
    assert not (tmp_path / "r").exists()


def test_dataset_needing_a_root_names_the_flag(tmp_path, capsys):
    rc = cli.main(["run", "--dataset", "PACS", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    line = one_line_error(rc, capsys.readouterr().err, "--data-root", "PACS")
    assert "root=" not in line
    assert not (tmp_path / "r").exists()


def test_resume_says_where_it_continues(sgs, tmp_path, monkeypatch):
    crashing = TinyDomains()
    real_batch = crashing.real_batch

    def dying(*a, **kw):  # killed during iteration 4 (init: 6 calls, then 6 per iteration)
        if len(crashing.calls) >= 6 + 6 * 3 + 2:
            raise Crash()
        return real_batch(*a, **kw)

    crashing.real_batch = dying
    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: crashing)
    with pytest.raises(Crash):
        sgs("distill", "--run-dir", str(tmp_path / "r"), "--method", "dm")
    monkeypatch.setattr(experiment, "load_data", lambda *a, **kw: TinyDomains())
    rc, err = sgs("distill", "--run-dir", str(tmp_path / "r"), "--resume")
    assert rc == 0, err
    assert "resuming from iteration 2 of 4" in err and "checkpoint.pt" in err


def test_phase_times_printed_and_stored(sgs, tmp_path, monkeypatch):
    """The op's extension is loaded before the first progress bar, and each phase is timed."""
    import tqdm.auto

    import sgs_cuda

    events = []
    real_info, real_bar = sgs_cuda.backend_info, tqdm.auto.tqdm
    monkeypatch.setattr(sgs_cuda, "backend_info", lambda *a, **kw: (events.append("extension"), real_info(*a, **kw))[1])
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **kw: (events.append("bar"), real_bar(*a, **kw))[1])
    rc, err = sgs("run", "--run-dir", str(tmp_path / "r"), "--method", "dm_sgs")
    assert rc == 0, err
    assert events[:2] == ["extension", "bar"]
    phases = json.loads((tmp_path / "r" / "metrics.json").read_text())["phase_seconds"]
    assert set(phases) == {"extension", "data", "distill", "evaluate", "total"}
    assert phases["distill"] > 0 and phases["evaluate"] > 0 and phases["extension"] >= 0
    assert phases["total"] >= phases["distill"] + phases["evaluate"] + phases["data"]
    timing = [line for line in err.splitlines() if line.startswith("time:")]
    assert len(timing) == 1
    for word in ("SGS op load/build", "data", "distillation", "evaluation", "total"):
        assert word in timing[0]


# --- the run-folder I/O module itself ---------------------------------------------------------

def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from sgs_cuda import _io

    path = _io.write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(ZeroDivisionError):
        _io.atomic_write(path, lambda f: (f.write(b"{partial"), 1 / 0))
    assert json.loads(path.read_text()) == {"a": 1} and temporaries(tmp_path) == []


def test_atomic_write_to_a_full_device(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (/dev/full) inside torch.save: one line, the old file kept."""
    import builtins

    from sgs_cuda import _io

    path = _io.save_torch({"x": 1}, tmp_path / "c.pt")
    monkeypatch.setattr(_io, "open", lambda name, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(_io.RunFolderError, match=r"c\.pt: no space left"):
        _io.save_torch({"x": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert _io.load_torch(path, "") == {"x": 1} and temporaries(tmp_path) == []


def test_loads_name_the_damaged_file(tmp_path):
    from sgs_cuda import _io

    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "cut.json").write_text('{"a": ')
    (tmp_path / "junk.pt").write_bytes(b"not a zip archive at all")
    for name, needle in (("list.json", "not a mapping"), ("cut.json", "damaged"), ("junk.pt", "damaged")):
        load = _io.load_torch if name.endswith(".pt") else _io.load_json
        with pytest.raises(_io.RunFolderError, match="damaged") as info:
            load(tmp_path / name, "delete it")
        message = str(info.value)
        assert str(tmp_path / name) in message and needle in message and message.endswith("delete it")
        assert "\n" not in message
    assert _io.try_load_json(tmp_path / "cut.json") is None and _io.try_load_json(tmp_path / "none.json") is None
    assert _io.load_json(tmp_path / "list.json", "", mapping=False) == [1]


def test_stale_temporaries_and_png_completeness(tmp_path):
    from sgs_cuda import _io
    from sgs_cuda.dm.plots import save_image_grid

    (tmp_path / "a" / "b").mkdir(parents=True)
    dead = tmp_path / "a" / "b" / f".checkpoint.pt.tmp{2 ** 22 + 1}"
    mine = tmp_path / f".x.json.tmp{os.getpid()}"  # this process is not writing it: a leftover
    live = tmp_path / f".y.json.tmp{os.getppid()}"
    for p in (dead, mine, live):
        p.write_bytes(b"")
    assert sorted(_io.clean_stale_temporaries(tmp_path)) == sorted([dead, mine])
    assert temporaries(tmp_path) == [live]
    png = save_image_grid(torch.rand(4, 3, 8, 8), torch.tensor([0, 0, 1, 1]), tmp_path / "g.png", [0.0] * 3, [1.0] * 3)
    assert _io.is_complete_png(png)
    truncate(png, 0.9)
    assert not _io.is_complete_png(png) and not _io.is_complete_png(tmp_path / "none.png")


def test_check_writable_dir_creates_nothing(tmp_path):
    from sgs_cuda import _io

    (tmp_path / "f").write_text("")
    for bad in (tmp_path / "f", tmp_path / "f" / "x" / "y"):
        with pytest.raises(_io.RunFolderError, match="is a file|which is a file"):
            _io.check_writable_dir(bad)
    _io.check_writable_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
