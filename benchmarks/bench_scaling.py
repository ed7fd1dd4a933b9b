#!/usr/bin/env python3
"""How a DM / DM+SGS distillation iteration scales: time per iteration, peak memory and the
DM+SGS / DM time ratio as the resolution (32/64/128), IPC (1/10/50), classes (10/100), source
domains (2-6) and processes (1, 2) grow, one factor at a time from a base point.

    python benchmarks/bench_scaling.py                     # CPU: a few minutes
    python benchmarks/bench_scaling.py --device cuda       # GPU (2 ranks need 2 GPUs: NCCL)
    python benchmarks/bench_scaling.py --out benchmarks/results/scaling-cpu-DATE.json \\
        --plot benchmarks/results/scaling-cpu-DATE.png

Every point runs in a fresh process (its memory peak is its own) on synthetic in-memory data
(``SyntheticDomains``: per request, uint8 noise around a class pattern and a domain shift,
normalised like a decoded image source), through :func:`sgs_cuda.dm.distill` itself with the
defaults of the loop (ConvNet depth following the resolution, instance norm, DSA, real init;
on CUDA bfloat16 autocast and channels_last). Time per iteration = (time of a run of
``warmup + iters`` iterations - time of a run of ``warmup``) / ``iters``, both in the same warm
process, so setup (network, initial images) cancels; on CUDA around ``torch.cuda.synchronize()``.
Diagnostics are read back once per run (``log_every`` beyond the run), as a long run amortises
them. Peak memory, in another fresh process: the growth of the peak resident memory (``VmHWM``)
over a first run of ``warmup + 1`` iterations on the CPU (a warm process would reuse memory the
allocator kept), ``torch.cuda.max_memory_allocated`` above what was allocated before on CUDA;
the planner's estimate (:mod:`sgs_cuda.dm.memory`) is printed next to it. With 2 processes
(gloo on the CPU, one thread each; NCCL on 2 GPUs) each holds half the classes; times are the
slowest rank's, memory the largest rank's. ``parallel capacity`` (CPU) says how much of a second
core the machine gave: two processes run a fixed matrix loop side by side, against one alone
(1.0: a whole second core; 0: none, e.g. while other jobs hold it).

The target for GPU runs: a DM+SGS iteration at most 1.15x the time of a DM iteration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 1.15
FACTORS = {"resolution": [32, 64, 128], "ipc": [1, 10, 50], "classes": [10, 100], "domains": [2, 3, 4, 6],
           "ranks": [1, 2]}
BASE = {"resolution": 32, "ipc": 10, "classes": 10, "domains": 3, "ranks": 1}


class SyntheticDomains:
    """The MultiDomainDataset protocol on generated images: class ``c`` of domain ``d`` is uint8
    noise around a fixed pattern plus a domain shift, drawn per request (nothing is held)."""

    def __init__(self, num_classes: int, num_domains: int, resolution: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.domains = [f"domain{d}" for d in range(num_domains)]
        self.classes = [f"class{c}" for c in range(num_classes)]
        self.image_shape = (3, resolution, resolution)
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        self._pattern = torch.randint(40, 216, (num_classes, 3, 8, 8), generator=g, dtype=torch.uint8)
        self._shift = torch.randint(-30, 30, (num_domains, 3, 1, 1), generator=g)
        self._m = torch.tensor(self.mean).view(3, 1, 1) * 255
        self._s = torch.tensor(self.std).view(3, 1, 1) * 255

    def count(self, domain, label, split="train"):
        return 500

    def real_batch(self, domain, label, n, generator=None, split="train"):
        d, r = self.domains.index(domain), self.image_shape[1]
        base = torch.nn.functional.interpolate(self._pattern[label][None].float(), size=(r, r), mode="nearest")[0]
        noise = torch.randint(-40, 41, (n, 3, r, r), generator=generator, dtype=torch.int16)
        x = (base + self._shift[d] + noise).clamp_(0, 255)  # as a decoded uint8 image would be
        return x.sub_(self._m).div_(self._s)

    def split_tensors(self, domains, split="test"):
        raise RuntimeError("the scaling benchmark's generated source has no test split: it times distillation only")


# --- one point, in its own process -----------------------------------------------------------------

def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device) -> int:
    """Reset the peak-memory counter; return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return _vm("VmRSS")  # a fresh process: VmHWM is the start-up's peak, below this point's


def _peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _vm("VmHWM")


def _timed_run(data, cfg, device, world):
    from sgs_cuda.dm import distill

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    distill(data, data.domains, cfg, device=device, progress=False, log=lambda m: None, world=world)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure_point(point: dict, settings: dict, device, world=None) -> dict:
    """Per method: seconds per iteration (``settings["what"] == "time"``), or the peak memory
    growth of a first run (``"memory"``, one method per fresh process) and the planner's estimate."""
    from sgs_cuda.distributed import SOLO
    from sgs_cuda.dm import DistillConfig
    from sgs_cuda.dm.memory import plan_memory

    world = world or SOLO
    data = SyntheticDomains(point["classes"], point["domains"], point["resolution"])
    out = {}
    methods = ("dm", "dm_sgs") if settings["what"] == "time" else (settings["method"],)
    for method in methods:
        base = dict(method=method, ipc=point["ipc"], batch_real=settings["batch_real"], width=settings["width"],
                    log_every=10_000, seed=0)
        warm = DistillConfig(iterations=settings["warmup"], **base)
        full = DistillConfig(iterations=settings["warmup"] + settings["iters"], **base)
        resolved = full.resolved(data.image_shape, device)
        if settings["what"] == "memory":
            before = _reset_peak(device)
            _timed_run(data, DistillConfig(iterations=settings["warmup"] + 1, **base), device, world)
            out[method] = {"peak_bytes": _peak(device) - before}
        else:
            _timed_run(data, warm, device, world)  # warms the process (allocator, kernels, extension)
            short = _timed_run(data, warm, device, world)
            long = _timed_run(data, full, device, world)
            out[method] = {"seconds_per_iteration": (long - short) / settings["iters"]}
        plan = plan_memory(data.image_shape, ipc=point["ipc"], classes=len(world.shard(point["classes"])),
                           num_domains=point["domains"], n_real=max(1, settings["batch_real"] // point["domains"]),
                           width=settings["width"], depth=resolved.depth, num_classes=point["classes"],
                           surgery=method == "dm_sgs", device=device, precision=resolved.precision,
                           memory_gib=1e6)
        out[method].update(estimate_bytes=plan.total, depth=resolved.depth, precision=resolved.precision,
                           channels_last=resolved.channels_last)
    return out


def _rank_worker(rank, port, point, settings, device_name, out_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(point["ranks"]), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(settings["threads"])
    from sgs_cuda import distributed

    world, device = distributed.init_from_env(device_name)
    try:
        result = measure_point(point, settings, device, world)
        results = world.gather(result)
        if world.is_main:  # the slowest rank's time, the largest rank's memory
            merged = {m: {k: max(r[m][k] for r in results) if isinstance(v, (int, float)) and not isinstance(v, bool)
                          else v for k, v in results[0][m].items()} for m in results[0]}
            Path(out_path).write_text(json.dumps(merged))
    finally:
        distributed.shutdown()


def run_point(point: dict, settings: dict, device_name: str) -> dict:
    """``measure_point`` in this process (one rank) or in ``point["ranks"]`` spawned ones."""
    torch.set_num_threads(settings["threads"])
    if point["ranks"] == 1:
        return measure_point(point, settings, torch.device(device_name))
    import tempfile

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(_rank_worker, args=(port, point, settings, "cpu" if device_name == "cpu" else "cuda", str(out)),
                 nprocs=point["ranks"], join=True)
        return json.loads(out.read_text())


def _matrix_loop(rank=0, out=None):
    torch.set_num_threads(1)
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(400):
        a = (a @ a).tanh_()
    seconds = time.perf_counter() - t0
    if out is not None:
        out.put(seconds)
    return seconds


def parallel_capacity() -> float:
    """How much of a second core two processes get: 1 - (their time side by side / one alone - 1)
    (1: a whole second core; 0: none)."""
    import torch.multiprocessing as mp

    alone = min(_matrix_loop() for _ in range(2))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_matrix_loop, args=(r, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    side_by_side = max(queue.get() for _ in procs)
    return max(0.0, min(1.0, 2 - side_by_side / alone))


# --- the sweep -----------------------------------------------------------------------------------

def sweep_points(factors: dict) -> list[tuple[str, dict]]:
    """The base point, then each factor's other values with everything else at the base."""
    points = [("base", dict(BASE))]
    for factor, values in factors.items():
        for value in values:
            if value != BASE[factor]:
                points.append((factor, {**BASE, factor: value}))
    return points


def machine_info(device_name: str) -> dict:
    info = {"host": platform.node(), "cpu": _cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_before": os.getloadavg()}
    if device_name.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def format_table(rows: list[dict]) -> str:
    head = ("| factor | value | DM s/it | DM+SGS s/it | DM+SGS / DM | <= 1.15x | DM peak MiB (estimate) "
            "| DM+SGS peak MiB (estimate) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        dm, sgs = r["dm"], r["dm_sgs"]
        ratio = sgs["seconds_per_iteration"] / dm["seconds_per_iteration"]
        lines.append(f"| {r['factor']} | {r['value']} | {dm['seconds_per_iteration']:.3f} | "
                     f"{sgs['seconds_per_iteration']:.3f} | {ratio:.2f}x | "
                     f"{'yes' if ratio <= TARGET_RATIO else 'no'} | "
                     f"{dm['peak_bytes'] / 2**20:.0f} ({dm['estimate_bytes'] / 2**20:.0f}) | "
                     f"{sgs['peak_bytes'] / 2**20:.0f} ({sgs['estimate_bytes'] / 2**20:.0f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["factor"] == "base")
    factors = list(FACTORS)
    fig, axes = plt.subplots(3, len(factors), figsize=(3.2 * len(factors), 8), squeeze=False)
    for j, factor in enumerate(factors):
        pts = sorted([r for r in rows if r["factor"] == factor] + [{**base, "value": BASE[factor]}],
                     key=lambda r: r["value"])
        xs = [r["value"] for r in pts]
        for method, label in (("dm", "DM"), ("dm_sgs", "DM+SGS")):
            axes[0, j].plot(xs, [r[method]["seconds_per_iteration"] for r in pts], "o-", label=label)
            axes[2, j].plot(xs, [r[method]["peak_bytes"] / 2**20 for r in pts], "o-", label=f"{label} measured")
        axes[2, j].plot(xs, [r["dm_sgs"]["estimate_bytes"] / 2**20 for r in pts], "x--", label="DM+SGS estimate")
        axes[1, j].plot(xs, [r["dm_sgs"]["seconds_per_iteration"] / r["dm"]["seconds_per_iteration"] for r in pts],
                        "o-", color="C2")
        axes[1, j].axhline(TARGET_RATIO, color="gray", ls=":", label="GPU target 1.15x")
        for i in range(3):
            axes[i, j].set_xticks(xs)
            axes[i, j].grid(alpha=0.3)
        axes[2, j].set_xlabel(factor)
        if factor in ("resolution", "ipc", "classes"):
            for i in (0, 2):
                axes[i, j].set_yscale("log")
    axes[0, 0].set_ylabel("seconds / iteration")
    axes[1, 0].set_ylabel("DM+SGS / DM time")
    axes[2, 0].set_ylabel("peak memory (MiB)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    axes[2, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _in_process(point: dict, settings: dict, device: str, what: str, method: str = "dm") -> dict:
    """:func:`run_point` in a fresh process (its memory peak is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(point), "--device", device,
           "--width", str(settings["width"]), "--batch-real", str(settings["batch_real"]), "--iters",
           str(settings["iters"]), "--warmup", str(settings["warmup"]), "--threads", str(settings["threads"]),
           "--what", what, "--method", method]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]), "MKL_NUM_THREADS": str(settings["threads"])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--width", type=int, help="embedding ConvNet width (default: 32 on the CPU, 128 on CUDA)")
    p.add_argument("--batch-real", type=int, help="real images per class and iteration (default 48 CPU, 256 CUDA)")
    p.add_argument("--iters", type=int, help="timed iterations per run (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, help="iterations before timing (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--only", nargs="+", choices=list(FACTORS), help="vary only these factors")
    p.add_argument("--out", type=Path, help="write the numbers as JSON")
    p.add_argument("--plot", type=Path, help="write the plot (PNG)")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point, print JSON
    p.add_argument("--what", default="time", help=argparse.SUPPRESS)  # internal: time, or memory of --method
    p.add_argument("--method", default="dm", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    settings = {"width": args.width or (128 if cuda else 32), "batch_real": args.batch_real or (256 if cuda else 48),
                "iters": args.iters or (20 if cuda else 3), "warmup": args.warmup or (5 if cuda else 1),
                "threads": args.threads, "what": args.what, "method": args.method}
    if args.point:
        print(json.dumps(run_point(json.loads(args.point), settings, args.device)))
        return 0
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    factors = {k: v for k, v in FACTORS.items() if not args.only or k in args.only}
    if cuda and torch.cuda.device_count() < 2:
        factors["ranks"] = [1]  # 2 ranks need 2 GPUs
        print("ranks 2 skipped: one GPU", file=sys.stderr)
    info = machine_info(args.device)
    if not cuda:
        info["parallel_capacity"] = parallel_capacity()
    print(f"machine: {info['cpu']} ({info['cpus']} CPUs){', ' + info['gpu'] if cuda else ''}; torch {info['torch']}; "
          f"{settings['threads']} thread(s) per process; load average before: "
          + ", ".join(f"{v:.2f}" for v in info["load_average_before"])
          + (f"; parallel capacity {info['parallel_capacity']:.2f} of a second core" if not cuda else ""), flush=True)
    rows = []
    t_start = time.time()
    for factor, point in sweep_points(factors):
        value = point[factor] if factor != "base" else "-"
        try:
            result = _in_process(point, settings, args.device, "time")
            for method in ("dm", "dm_sgs"):
                result[method].update(_in_process(point, settings, args.device, "memory", method)[method])
        except RuntimeError as exc:
            print(f"{factor}={value}: {exc}", file=sys.stderr)
            return 1
        row = {"factor": factor, "value": value, "point": point, **result}
        rows.append(row)
        ratio = result["dm_sgs"]["seconds_per_iteration"] / result["dm"]["seconds_per_iteration"]
        print(f"{factor:>10} {str(value):>5}: DM {result['dm']['seconds_per_iteration']:.3f} s/it, DM+SGS "
              f"{result['dm_sgs']['seconds_per_iteration']:.3f} s/it ({ratio:.2f}x), peak "
              f"{result['dm']['peak_bytes'] / 2**20:.0f} / {result['dm_sgs']['peak_bytes'] / 2**20:.0f} MiB",
              flush=True)
    info["load_average_after"] = os.getloadavg()
    info["minutes"] = (time.time() - t_start) / 60
    table = format_table(rows)
    print()
    print(f"base point: {BASE}; width {settings['width']}, {settings['batch_real']} real images per class and "
          f"iteration; target for GPU runs: DM+SGS <= {TARGET_RATIO}x DM")
    print(table)
    ratios = [r["dm_sgs"]["seconds_per_iteration"] / r["dm"]["seconds_per_iteration"] for r in rows]
    print(f"DM+SGS / DM: median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x (target <= {TARGET_RATIO}x)")
    date = datetime.date.today().isoformat()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": date, "device": args.device, "machine": info, "settings": settings,
                                        "base": BASE, "target_ratio": TARGET_RATIO, "rows": rows,
                                        "markdown": table}, indent=2))
    if args.plot:
        where = info.get("gpu") or f"{info['cpu']}, {settings['threads']} thread(s)/process"
        plot(rows, args.plot, f"DM / DM+SGS iteration scaling ({where}; width {settings['width']}, "
                              f"{settings['batch_real']} real/class; base {BASE}) {date}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
