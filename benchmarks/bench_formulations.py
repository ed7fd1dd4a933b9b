#!/usr/bin/env python3
"""What each surgery formulation costs: seconds per distillation iteration of DM and of every arm
of ``formulation_study.py``, side by side in one process, as a ratio to DM.

    python benchmarks/bench_formulations.py --out docs/results/formulations-cost.json

The quick preset's shapes (10 classes, 3x32x32, IPC 10, 3 source domains, real batch 48 per class,
width-32 ConvNet) on generated in-memory data (``bench_scaling.SyntheticDomains``), through
:func:`sgs_cuda.dm.distill` itself. Time per iteration = (a run of ``warmup + iters`` iterations -
a run of ``warmup``) / ``iters``; the arms are measured in turn, ``rounds`` times, and the median
is reported, so a neighbour's load falls on all arms alike. One thread (``--threads``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scaling import SyntheticDomains, _timed_run  # noqa: E402
from formulation_study import ARMS  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the numbers")
    p.add_argument("--note", default="", help="what else ran on the machine (kept with the numbers)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sgs_cuda.distributed import SOLO
    from sgs_cuda.dm import DistillConfig

    data = SyntheticDomains(num_classes=10, num_domains=3, resolution=32)
    device = torch.device("cpu")
    base = DistillConfig(ipc=10, batch_real=48, width=32, log_every=10 ** 6, method="dm")
    configs = {}
    for name, (method, sgs, init) in ARMS.items():
        if init is not None:  # an initialisation: the same iterations as DM
            continue
        cfg = dataclasses.replace(base, method=method)
        configs[name] = cfg if sgs is None else dataclasses.replace(cfg, sgs=sgs)
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            short = _timed_run(data, dataclasses.replace(cfg, iterations=args.warmup), device, SOLO)
            long = _timed_run(data, dataclasses.replace(cfg, iterations=args.warmup + args.iters), device, SOLO)
            times[name].append((long - short) / args.iters)
    dm = statistics.median(times["DM"])
    rows = {name: {"seconds_per_iteration": statistics.median(t), "ratio_to_dm": statistics.median(t) / dm,
                   "rounds": t} for name, t in times.items()}
    print("| arm | s / iteration | × DM |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds_per_iteration']:.3f} | {r['ratio_to_dm']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "machine": f"{platform.node()} ({platform.processor() or platform.machine()})", "threads": args.threads,
            "date": datetime.date.today().isoformat(), "iters": args.iters, "warmup": args.warmup,
            "rounds": args.rounds, "torch": torch.__version__, "note": args.note, "arms": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
