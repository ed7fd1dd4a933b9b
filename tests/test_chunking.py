"""Classes in chunks, the memory plan, depth/precision/layout settings and the per-class streams.

Chunked domain gradients are compared with unchunked ones bitwise: a class's loss terms touch
only its own synthetic images (instance norm, one DSA draw per class), and the convolutions of
the CPU backend give every image the same result whatever the batch around it.
"""
import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda import SGSConfig
from sgs_cuda.dm import DSAParams, DistillConfig, build_convnet, distill
from sgs_cuda.dm.loop import RandomStreams, stream_seed
from sgs_cuda.dm.matching import matching_losses
from sgs_cuda.dm.memory import GIB, DoesNotFit, estimate, plan_memory
from sgs_cuda.dm.networks import auto_depth
from sgs_cuda.surgery import domain_gradients

DOMAINS = ["d0", "d1", "d2"]


def tiny_cfg(**kw):
    base = dict(method="dm_sgs", ipc=2, iterations=4, batch_real=6, width=8, depth=2, log_every=2)
    base.update(kw)
    return DistillConfig(**base)


def quiet(**kw):
    return distill(TinyDomains(K=5), DOMAINS, progress=False, log=lambda m: None, **kw)


# --- chunked gradients ----------------------------------------------------------------------------

@pytest.mark.parametrize("matching", ["dm", "m3d"])
def test_chunked_domain_gradients_equal_unchunked(matching):
    g = torch.Generator().manual_seed(0)
    K, D, n, ipc = 5, 3, 4, 3
    net = build_convnet((3, 16, 16), K, width=8, depth=2, generator=g)
    for p in net.parameters():
        p.requires_grad_(False)
    real = [torch.randn(D, n, 3, 16, 16, generator=g) for _ in range(K)]
    params = [DSAParams.sample(generator=g, mode="all") for _ in range(K)]
    syn = torch.randn(K * ipc, 3, 16, 16, generator=g, requires_grad=True)
    losses, _ = matching_losses(net, real, syn, params, matching=matching)
    whole = domain_gradients(losses, syn, "loop")
    for lo, hi in [(0, 2), (2, 3), (3, 5)]:
        part = syn[lo * ipc:hi * ipc]
        chunk_losses, _ = matching_losses(net, real[lo:hi], part, params[lo:hi], matching=matching)
        chunk = domain_gradients(chunk_losses, part, "loop")
        assert chunk.shape == (D, (hi - lo) * ipc, 3, 16, 16)
        assert torch.equal(chunk, whole[:, lo * ipc:hi * ipc]), "chunked gradients differ from unchunked ones"
    assert whole.abs().sum() > 0


@pytest.mark.parametrize("kw", [dict(method="dm"), dict(method="dm_sgs"),
                                dict(method="dm_sgs", sgs=SGSConfig(assignment="fixed", normalize="dm_norm")),
                                dict(method="dm_sgs", matching="m3d"),
                                dict(method="dm_sgs", sgs=SGSConfig(space="spatial"))])
def test_chunked_run_equals_one_pass(kw):
    whole = quiet(cfg=tiny_cfg(**kw))
    for chunk in (1, 2):
        chunked = quiet(cfg=tiny_cfg(class_chunk=chunk, **kw))
        assert torch.equal(chunked.images, whole.images)  # bitwise
        # the recorded sums are added chunk by chunk: the history to rounding
        for key in whole.history:
            if key != "bands":
                torch.testing.assert_close(torch.tensor(chunked.history[key]), torch.tensor(whole.history[key]),
                                           rtol=1e-6, atol=1e-9)
        if "bands" in whole.history:
            for key, values in whole.history["bands"].items():
                torch.testing.assert_close(torch.tensor(chunked.history["bands"][key]), torch.tensor(values),
                                           rtol=1e-6, atol=1e-9)


def test_chunks_resume_from_an_unchunked_checkpoint(tmp_path):
    cfg = tiny_cfg(iterations=6, checkpoint_every=3)
    full = quiet(cfg=cfg)
    quiet(cfg=tiny_cfg(iterations=3, checkpoint_every=3), run_dir=tmp_path)
    resumed = quiet(cfg=tiny_cfg(iterations=6, checkpoint_every=3, class_chunk=2), run_dir=tmp_path, resume=True)
    assert torch.equal(resumed.images, full.images)


# --- the memory plan ----------------------------------------------------------------------------

def plan(**kw):
    base = dict(ipc=10, classes=100, num_domains=3, n_real=85, width=128, depth=5, num_classes=100, surgery=True,
                device="cpu")
    base.update(kw)
    return plan_memory((3, 128, 128), **base)


def test_memory_plan_chunks_to_the_budget_and_refuses_what_cannot_fit():
    roomy = plan(memory_gib=10_000)
    assert roomy.chunk_classes == 100 and roomy.chunks == [(0, 100)]
    assert "all 100 classes in one pass" in roomy.describe()
    one = sum(estimate((3, 128, 128), chunk_classes=1, **_common()).values())
    two = sum(estimate((3, 128, 128), chunk_classes=2, **_common()).values())
    tight = plan(memory_gib=(one + two) / 2 / GIB)  # room for one class at a time, not two
    assert tight.chunk_classes == 1 and len(tight.chunks) == 100 and tight.total <= tight.budget
    assert "100 classes in 100 chunks of up to 1" in tight.describe()
    ten = plan(memory_gib=sum(estimate((3, 128, 128), chunk_classes=10, **_common()).values()) / GIB * 1.0001)
    assert ten.chunk_classes == 10 and ten.chunks[-1] == (90, 100)
    with pytest.raises(DoesNotFit, match=r"does not fit in memory: 1 class\(es\) at a time need about .* GiB .* "
                                         r"but 1 GiB is allowed \(memory_gib\); lower batch_real"):
        plan(memory_gib=1.0)
    with pytest.raises(DoesNotFit, match="batch norm pools"):
        plan(memory_gib=(one + two) / 2 / GIB, splittable=False)
    # the parts grow as they should: the gradient stack with D, activations with the resolution
    a = estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3, "num_domains": 2})
    b = estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3, "num_domains": 6})
    assert b["domain gradients"] == 3 * a["domain gradients"]
    c = estimate((3, 64, 64), chunk_classes=10, **{**_common(), "depth": 4})
    assert c["activations"] > 3.5 * estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3})["activations"]
    assert "domain gradients" not in estimate((3, 32, 32), chunk_classes=1, **{**_common(), "surgery": False})
    # what the options add: a second gradient stack, the moving average over every image, DAM's masks and views
    base = estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3})
    more = estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3}, contrast=True, ema=True,
                    amplitude_floor=True)
    assert more["domain gradients"] == 2 * base["domain gradients"]
    assert more["moving average"] == 3 * 100 * 10 * 3 * 32 * 32 * 4
    assert more["amplitude floor"] == 100 * 10 * 3 * 32 * 17 * 4
    dam = estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3, "surgery": False}, dam=True)
    plain = estimate((3, 32, 32), chunk_classes=10, **{**_common(), "depth": 3, "surgery": False})
    assert dam["domain masks"] == 3 * 3 * 100 * 10 * 3 * 32 * 32 * 4 and "domain masks" not in plain
    assert dam["activations"] - plain["activations"] > 3 * 10 * 10 * 3 * 32 * 32 * 4  # the three views at least


def _common():
    return dict(ipc=10, classes=100, num_domains=3, n_real=85, width=128, depth=5, num_classes=100, surgery=True)


def test_distill_prints_the_estimate_and_chunks_or_refuses_before_starting():
    data = TinyDomains(K=5)
    lines = []
    shape, kw = data.image_shape, dict(ipc=2, classes=5, num_domains=3, n_real=2, width=8, depth=2, num_classes=5,
                                       surgery=True)
    two = sum(estimate(shape, chunk_classes=2, **kw).values())
    three = sum(estimate(shape, chunk_classes=3, **kw).values())
    res = distill(data, DOMAINS, tiny_cfg(memory_gib=(two + three) / 2 / GIB), progress=False, log=lines.append)
    assert lines[0].startswith("memory estimate per process:") and "5 classes in 3 chunks of up to 2" in lines[0]
    assert torch.equal(res.images, quiet(cfg=tiny_cfg()).images)
    data.calls.clear()
    with pytest.raises(DoesNotFit, match="does not fit in memory") as info:
        distill(data, DOMAINS, tiny_cfg(memory_gib=1e-7), progress=False, log=lambda m: None)
    assert "\n" not in str(info.value) and not data.calls  # refused before a single image was drawn
    with pytest.raises(ValueError, match="kept_fraction"):
        quiet(cfg=tiny_cfg(class_chunk=2, sgs=SGSConfig(normalize="kept_fraction")))


# --- networks and compute settings ------------------------------------------------------------------

def test_depth_follows_the_resolution():
    assert [auto_depth((3, s, s)) for s in (28, 32, 64, 128, 256)] == [3, 3, 4, 5, 6]
    assert auto_depth((1, 28, 28)) == 3 and auto_depth((3, 96, 96)) == 4 and auto_depth((3, 8, 8)) == 1
    net = build_convnet((3, 128, 128), 10, width=4, depth="auto")
    assert net.depth == 5 and net.num_features == 4 * 4 * 4  # ConvNetD5: a 4x4 map
    cfg = DistillConfig()
    assert cfg.depth == "auto" and cfg.resolved((3, 32, 32), "cpu").depth == 3
    assert cfg.resolved((3, 128, 128), "cpu").depth == 5
    assert DistillConfig(depth=4).resolved((3, 32, 32), "cpu").depth == 4
    with pytest.raises(ValueError, match="depth"):
        DistillConfig(depth="deep")
    with pytest.raises(ValueError, match="depth"):
        DistillConfig(depth=0)


def test_precision_and_layout_resolve_per_device_and_are_recorded():
    cpu = DistillConfig().resolved((3, 32, 32), "cpu")
    assert (cpu.precision, cpu.channels_last) == ("float32", False)
    res = quiet(cfg=tiny_cfg(iterations=1))
    assert res.config.precision == "float32" and res.config.channels_last is False and res.config.depth == 2
    with pytest.raises(ValueError, match="precision"):
        DistillConfig(precision="float16")
    with pytest.raises(ValueError, match="channels_last"):
        DistillConfig(channels_last="yes")


def test_bfloat16_autocast_keeps_the_images_and_their_gradients_float32():
    net = build_convnet((3, 16, 16), 3, width=8, depth=2, generator=torch.Generator().manual_seed(0))
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want = net.embed(x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    net.set_compute("bfloat16")
    got = net.embed(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    assert got.dtype == torch.float32 and g_got.dtype == torch.float32
    assert not torch.equal(got, want)  # really computed in bfloat16
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    assert torch.nn.functional.cosine_similarity(g_got.flatten(), g_want.flatten(), dim=0) > 0.99
    # the loop: the images stay float32 and follow the float32 run closely
    fp32 = quiet(cfg=tiny_cfg(iterations=3))
    bf16 = quiet(cfg=tiny_cfg(iterations=3, precision="bfloat16"))
    assert bf16.images.dtype == torch.float32 and bf16.config.precision == "bfloat16"
    assert (bf16.images - fp32.images).abs().max() < 0.05 * fp32.images.abs().max()


def test_channels_last_gives_the_same_features():
    net = build_convnet((3, 16, 16), 3, width=8, depth=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want = net.embed(x)
    net.set_compute("float32", channels_last=True)
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net.embed(x), want, rtol=1e-5, atol=1e-6)
    a = quiet(cfg=tiny_cfg(iterations=3))
    b = quiet(cfg=tiny_cfg(iterations=3, channels_last=True))
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-5)


# --- the random streams ---------------------------------------------------------------------------

def test_per_class_streams_do_not_depend_on_the_other_classes():
    a = RandomStreams(0, torch.device("cpu"))
    b = RandomStreams(0, torch.device("cpu"))
    x = torch.rand(3, generator=a.for_class("data", 5, 2))
    torch.rand(100, generator=b.for_class("data", 5, 1))  # other classes' draws in between
    torch.rand(7, generator=b.for_class("dsa", 5, 2))
    assert torch.equal(torch.rand(3, generator=b.for_class("data", 5, 2)), x)
    seeds = {stream_seed(s, k, it, c) for s in range(2) for k in ("data", "dsa") for it in range(3) for c in range(4)}
    assert len(seeds) == 48 and all(0 <= v < 2 ** 64 for v in seeds)
    full = a.assignment(3, range(0, 4), 2, 3, "random")
    assert torch.equal(torch.cat([b.assignment(3, range(0, 1), 2, 3, "random"),
                                  b.assignment(3, range(1, 4), 2, 3, "random")]), full)
    assert torch.equal(a.assignment(3, range(2, 4), 2, 3, "fixed"), torch.arange(4, 8) % 3)


def test_scaling_benchmark_measures_a_point():
    """benchmarks/bench_scaling.py's measurement on a tiny point (the sweep itself takes minutes)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scaling.py"
    spec = importlib.util.spec_from_file_location("bench_scaling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    point = {"resolution": 16, "ipc": 2, "classes": 3, "domains": 2, "ranks": 1}
    settings = {"width": 4, "batch_real": 4, "iters": 1, "warmup": 1, "threads": 1, "what": "time", "method": "dm"}
    timed = bench.measure_point(point, settings, torch.device("cpu"))
    assert set(timed) == {"dm", "dm_sgs"} and all(timed[m]["depth"] == 2 for m in timed)
    memory = bench.measure_point(point, {**settings, "what": "memory", "method": "dm_sgs"}, torch.device("cpu"))
    assert memory["dm_sgs"]["peak_bytes"] >= 0 and memory["dm_sgs"]["estimate_bytes"] > 0
    row = {"factor": "base", "value": "-", "dm": {**timed["dm"], "peak_bytes": 1}, "dm_sgs": {**timed["dm_sgs"],
                                                                                         **memory["dm_sgs"]}}
    table = bench.format_table([row])
    assert table.count("\n") == 2 and "| base | - |" in table
    assert [f for f, _ in bench.sweep_points(bench.FACTORS)].count("resolution") == 2
    data = bench.SyntheticDomains(3, 2, 16)
    batch = data.real_batch("domain1", 2, 5, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == torch.float32
