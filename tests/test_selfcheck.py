"""The first-use self-check of the CUDA paths (sgs_cuda/selfcheck.py), on the CPU: the same
ladder walk, comparison, warnings and verdict cache as on a GPU, driven by a fake backend whose
paths are the torch reference with a fault injected (a wrong result, a raised error, a NaN).
On a GPU, tests/test_cuda_paths.py runs it on the real paths (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from sgs_cuda import selfcheck
from sgs_cuda.reference import sgs_reference

PARAMS = (1.0, 0.25, 1.0, 0.5, "hard")


class FakePaths:
    """The ladder of CUDA paths, each computing the float32 reference, with faults by path:
    ``wrong`` (a 1 % error in the update), ``wrong_shared`` (in the shared part), ``count`` (the
    diagnostic sums keep 100 components too many), ``raise`` (a CUDA-like error), ``nan``,
    ``dead`` (raises and the context is gone)."""

    def __init__(self, faults=None, cache=None, build="build-a", forced="auto"):
        self.faults, self.cache, self.build, self.forced_path = dict(faults or {}), cache, build, forced
        self.disabled, self.runs, self.capture = [], [], False

    def ident(self, device):
        return {"gpu": "Fake GPU 80GB", "driver": "13000", "build": self.build}

    def cache_file(self):
        return self.cache

    def forced(self):
        return self.forced_path

    def choose(self, grads, outputs):
        if self.forced_path != "auto":
            return self.forced_path
        ladder = [p for p in selfcheck.LADDER if not (p == "dx" and outputs == "parts")]
        return next((p for p in ladder if p not in self.disabled), "cufft")

    def run(self, grads, assign, outputs, params):
        path = self.choose(grads, outputs)
        self.runs.append(path)
        fault = self.faults.get(path)
        if fault in ("raise", "dead"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")
        out = sgs_reference(grads, assign, *params, return_parts=outputs != "update")
        update = out if outputs == "update" else out[0]
        if fault == "wrong":
            update = update * 1.01
        if fault == "nan":
            update = update.clone()
            update.view(-1)[3] = float("nan")
        stats = out[4] if outputs != "update" else None
        if fault == "count":  # 100 components more kept than the reference keeps
            stats = stats + torch.tensor([100.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        if outputs == "update":
            return update.to(grads.dtype)
        if outputs == "stats":
            return update.to(grads.dtype), stats
        shared = out[2] * (1.01 if fault == "wrong_shared" else 1.0)
        return (update.to(grads.dtype), out[1], shared, out[3], stats)

    def disable(self, key, path):
        self.disabled.append(path)

    def context_error(self, device):
        return "cudaErrorIllegalAddress" if "dead" in self.faults.values() else None

    def capturing(self):
        return self.capture


def grads_for(D=3, N=3, C=3, H=16, W=16, dtype=torch.float32):
    return torch.zeros(D, N, C, H, W, dtype=dtype)  # only the shape, dtype and device matter


def route(checker, grads=None, outputs="stats", params=PARAMS):
    return checker.route(grads_for() if grads is None else grads, outputs, params)


@pytest.fixture(autouse=True)
def default_mode(monkeypatch):
    monkeypatch.delenv("SGS_SELF_CHECK", raising=False)


def test_passing_path_is_used_and_checked_once():
    backend = FakePaths()
    checker = selfcheck.SelfCheck(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert route(checker) == "ext" and route(checker) == "ext"
    assert backend.runs == ["dx"] and backend.disabled == []
    (name, verdict), = checker.report()["verdicts"].items()
    assert name == "16x16 D=3 float32 stats hard: dx" and verdict.startswith("pass")


@pytest.mark.parametrize("fault, detail", [("wrong", "largest relative error"), ("raise", "raised RuntimeError"),
                                           ("nan", "NaN or Inf")])
def test_failing_path_is_disabled_with_one_warning_and_the_next_is_checked(fault, detail):
    backend = FakePaths({"dx": fault})
    checker = selfcheck.SelfCheck(backend)
    with pytest.warns(RuntimeWarning) as record:
        assert route(checker) == "ext"
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and detail in message
    assert message.startswith("sgs_cuda: the dx CUDA path failed its self-check for 16x16 D=3 float32 stats hard")
    assert "portable is tried instead" in message and "please report it" in message
    assert backend.disabled == ["dx"] and backend.runs == ["dx", "portable"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert route(checker) == "ext"  # decided: no second check, no second warning
    assert backend.runs == ["dx", "portable"]


def test_wrong_result_states_the_error_size():
    checker = selfcheck.SelfCheck(FakePaths({"dx": "wrong"}))
    with pytest.warns(RuntimeWarning, match=r"largest relative error 0\.01 \(tolerance 1e-05\)"):
        route(checker)


def test_ladder_order_down_to_the_torch_reference():
    backend = FakePaths({"dx": "raise", "portable": "nan", "cufft": "wrong"})
    checker = selfcheck.SelfCheck(backend)
    with pytest.warns(RuntimeWarning) as record:
        assert route(checker) == "torch"
    assert backend.runs == ["dx", "portable", "cufft"] and backend.disabled == ["dx", "portable", "cufft"]
    assert [str(r.message).split(" CUDA path")[0] for r in record] == ["sgs_cuda: the dx", "sgs_cuda: the portable",
                                                                       "sgs_cuda: the cufft"]
    assert "the torch reference is tried instead" in str(record[-1].message)
    assert checker.report()["torch_fallback"] == ["16x16 D=3 float32 stats hard"]


def test_parts_skip_dx_and_are_checked_on_every_output():
    backend = FakePaths({"portable": "wrong_shared"})
    checker = selfcheck.SelfCheck(backend)
    with pytest.warns(RuntimeWarning, match=r"parts hard \(shared: largest relative error 0\.0"):
        assert route(checker, outputs="parts") == "ext"
    assert backend.runs == ["portable", "cufft"]


def test_diagnostic_sums_are_checked():
    with pytest.warns(RuntimeWarning, match=r"\(kept-component count: largest relative error 0\.0"):
        route(selfcheck.SelfCheck(FakePaths({"dx": "count"})))


def test_a_dead_context_stops_with_one_clear_error():
    checker = selfcheck.SelfCheck(FakePaths({"dx": "dead"}))
    with pytest.raises(RuntimeError) as info:
        route(checker)
    text = str(info.value)
    assert "\n" not in text and "no longer usable" in text and "cudaErrorIllegalAddress" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_a_forced_path_that_fails_raises():
    checker = selfcheck.SelfCheck(FakePaths({"portable": "wrong"}, forced="portable"))
    with pytest.raises(RuntimeError, match="SGS_CUDA_PATH=portable but that path failed its self-check"):
        route(checker)


def test_no_check_inside_graph_capture():
    backend = FakePaths()
    backend.capture = True
    with pytest.raises(RuntimeError, match="cannot run inside CUDA graph capture: call the op once before"):
        route(selfcheck.SelfCheck(backend))
    assert backend.runs == []


def test_half_inputs_pass_within_their_rounding():
    backend = FakePaths()
    checker = selfcheck.SelfCheck(backend)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert route(checker, grads_for(dtype=dtype), outputs="update") == "ext"
    assert selfcheck.tolerance(torch.float32) == 1e-5 and selfcheck.tolerance(torch.bfloat16) > 1e-3


def test_the_callers_small_shape_is_checked_too_and_large_ones_are_not():
    seen = []

    class Recording(FakePaths):
        def run(self, grads, assign, outputs, params):
            seen.append(tuple(grads.shape))
            return super().run(grads, assign, outputs, params)

    checker = selfcheck.SelfCheck(Recording())
    route(checker, grads_for(D=2, N=5, C=2))
    route(checker, grads_for(D=2, N=4096, C=3, H=32, W=32))
    assert seen == [(2, 3, 3, 16, 16), (2, 5, 2, 16, 16), (2, 3, 3, 32, 32)]


def test_modes(monkeypatch):
    backend = FakePaths()
    checker = selfcheck.SelfCheck(backend)
    monkeypatch.setenv("SGS_SELF_CHECK", "0")
    assert route(checker) == "ext" and backend.runs == []
    assert checker.report()["mode"].startswith("off")
    monkeypatch.setenv("SGS_SELF_CHECK", "always")
    route(checker, grads_for(N=2))
    route(checker, grads_for(N=2))
    route(checker, grads_for(N=4))
    assert len(backend.runs) == 4  # two new shapes, each on the seeded input and on its own shape
    monkeypatch.setenv("SGS_SELF_CHECK", "sometimes")
    with pytest.raises(ValueError, match="SGS_SELF_CHECK must be one of"):
        route(checker)


def key_of(t, outputs="stats", mask="hard", always=False):
    return selfcheck.make_key(selfcheck.tensor_meta(t), outputs, mask, always)


def test_key_separates_what_changes_the_path():
    g = grads_for()
    key = key_of(g)
    assert key.device == -1 and key.NC is None and key.text() == "16x16 D=3 float32 stats hard"
    assert key_of(g.transpose(3, 4)) == key_of(g.transpose(3, 4).contiguous())
    assert key_of(g.half(), mask="soft", always=True).text() == "16x16 D=3 N=3 C=3 float16 stats soft"
    assert key_of(g, outputs="parts") != key


def test_route_under_torch_compile_is_a_constant(monkeypatch):
    """Inside torch.compile(fullgraph=True) the check runs eagerly at trace time and its answer is
    traced as a constant (no graph break)."""
    backend = FakePaths({"dx": "raise", "portable": "raise", "cufft": "raise"})
    monkeypatch.setattr(selfcheck, "_checker", selfcheck.SelfCheck(backend))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1.0 if selfcheck.route(x, "stats", PARAMS) == "ext" else 2.0)

    with pytest.warns(RuntimeWarning):
        out = f(grads_for())
    assert out.flatten()[0].item() == 2.0 and backend.runs == ["dx", "portable", "cufft"]


def test_verdicts_persist_on_disk_keyed_by_gpu_driver_and_build(tmp_path):
    cache = tmp_path / selfcheck.CACHE_NAME
    first = FakePaths({"dx": "wrong"}, cache=cache)
    with pytest.warns(RuntimeWarning):
        selfcheck.SelfCheck(first).route(grads_for(), "stats", PARAMS)
    assert first.runs == ["dx", "portable"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [selfcheck.CACHE_NAME]  # atomic: no temporary left
    entries = json.loads(cache.read_text())
    assert set(entries) == {"Fake GPU 80GB|driver 13000|build build-a|16x16 D=3 float32 stats hard|dx",
                            "Fake GPU 80GB|driver 13000|build build-a|16x16 D=3 float32 stats hard|portable"}

    second = FakePaths({"dx": "wrong"}, cache=cache)  # another process, same build: nothing re-run
    with pytest.warns(RuntimeWarning, match="the dx CUDA path failed"):  # but still disabled, and said so
        assert selfcheck.SelfCheck(second).route(grads_for(), "stats", PARAMS) == "ext"
    assert second.runs == [] and second.disabled == ["dx"]

    rebuilt = FakePaths(cache=cache, build="build-b")  # the build changed: checked again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selfcheck.SelfCheck(rebuilt).route(grads_for(), "stats", PARAMS)
    assert rebuilt.runs == ["dx"]
    assert len(json.loads(cache.read_text())) == 3


def test_a_damaged_cache_file_is_ignored_and_replaced(tmp_path):
    cache = tmp_path / selfcheck.CACHE_NAME
    cache.write_text("{not json")
    backend = FakePaths(cache=cache)
    selfcheck.SelfCheck(backend).route(grads_for(), "stats", PARAMS)
    assert backend.runs == ["dx"] and len(json.loads(cache.read_text())) == 1


def test_backend_info_cuda_reports_the_self_check():
    from sgs_cuda import backend_info
    info = backend_info("cuda")
    assert info["self_check"]["mode"] == "once per path and shape class"
    assert isinstance(info["self_check"]["verdicts"], dict)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: benchmarks/gpu_check.sh runs it for real")
def test_cli_self_check_without_a_gpu(capsys):
    from sgs_cuda import cli
    assert cli.main(["self-check"]) == 0
    assert "no CUDA extension to check" in capsys.readouterr().out
