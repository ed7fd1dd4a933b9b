"""CPU benchmark of the SGS operator: the compiled C++ kernel vs the eager torch reference vs
``torch.compile`` of the reference, at the sizes of dataset distillation.

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=param:shape

Results and the machine they came from: ``benchmarks/README.md``.
"""
import os

import pytest
import torch

from sgs_cuda import _build, sgs_reference

SHAPES = [(3, 100, 3, 32, 32), (4, 100, 3, 64, 64), (4, 100, 3, 128, 128)]
PARAMS = dict(tau=1.0, rho=0.25, alpha=1.0, beta=0.25, mask="hard")
_compiled = {}


def run_reference(g, a):
    return sgs_reference(g, a, **PARAMS)


def run_extension(g, a):
    return torch.ops.sgs.surgery(g, a, PARAMS["tau"], PARAMS["rho"], PARAMS["alpha"], PARAMS["beta"], PARAMS["mask"])


def run_compiled(g, a):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(run_reference)
    return _compiled["fn"](g, a)


IMPLS = {"cpp_cpu": run_extension, "torch_eager": run_reference, "torch_compile": run_compiled}


@pytest.fixture(scope="module", autouse=True)
def extension():
    os.environ["SGS_BACKEND"] = "ext"
    assert _build.use_extension(torch.device("cpu"))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sgs_cpu(benchmark, shape, impl):
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(shape, generator=gen)
    assign = torch.randint(0, shape[0], (shape[1],), generator=gen)
    fn = IMPLS[impl]
    out = fn(grads, assign)  # warm-up (and compilation for torch_compile)
    ref = sgs_reference(grads.double(), assign, **PARAMS)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    benchmark.extra_info["bytes_floor"] = (shape[0] + 1) * torch.Size(shape[1:]).numel() * 4
    benchmark.pedantic(fn, args=(grads, assign), rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("path", ["update_only", "with_parts"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_dm_norm_cpu(benchmark, shape, path):
    """The matched step (``normalize="dm_norm"``): the update alone (the DM loop's step: one
    reduction over the inputs for the DM gradient's norm) against the same update through the
    parts (what it cost before: the kernel's mean, shared and diversity outputs)."""
    from sgs_cuda import spectral_gradient_surgery
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(shape, generator=gen)
    assign = torch.randint(0, shape[0], (shape[1],), generator=gen)
    kw = dict(PARAMS, normalize="dm_norm", check_finite=False)
    if path == "update_only":
        fn = lambda: spectral_gradient_surgery(grads, assign, return_diagnostics=True, **kw).update  # noqa: E731
    else:
        fn = lambda: spectral_gradient_surgery(grads, assign, return_parts=True, **kw).update  # noqa: E731
    ref = sgs_reference(grads.double(), assign, **PARAMS)
    mean = grads.double().mean(0)
    ref = ref * (mean.flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))[:, None, None, None]
    assert ((fn().double() - ref).norm() / ref.norm()).item() < 1e-5
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
