"""How much memory a distillation iteration needs, and how many classes fit in one chunk.

One iteration of the loop holds, per process (``n = chunk_classes * ipc`` synthetic images of
the chunk, ``B = D * n_real`` real images per class, ``E = C * H * W``):

- the synthetic set: images, their gradient and SGD's momentum, ``3 * N * E`` float32 values
  (``N``: this process's images, all chunks), and the embedding network;
- the chunk's real batches, as loaded and augmented: ``2 * chunk_classes * B * E``;
- the embedding activations: the synthetic forward keeps every layer's activations for the
  backward (per image and layer about ``width * h * w`` values for the convolution output,
  the norm output and, under autocast, the bfloat16 copy of the layer input), the backward
  adds three gradients of the largest map (``D`` at once in the batched backward on GPUs);
  the real forward runs without a graph, one class at a time, so only its largest maps count;
- the domain-gradient stack ``[D, n, C, H, W]`` (DM+SGS only; twice on the CPU, where the D
  gradients of the backward loop are stacked);
- the surgery op's workspace, bounded by the reference implementation's: the ``D`` spectra
  (``D * n * E`` values) plus about 8 ``n * E`` arrays (masks, mean, shared and diversity
  spectra, the parts);
- what some options add: ``agree_on="contrast"`` a second domain-gradient stack; ``ema`` the
  moving average of every image's ``D`` gradients (``D * N * E``, kept across iterations);
  ``amp_decay`` each image's amplitude floor (``N`` half spectra); ``dm_dam`` the mask logits
  with their gradient and momentum (``3 * D * N * E``) and ``D`` more synthetic forwards (the
  views, kept for the backward);
- the framework's own buffers: 64 MiB on the CPU (measured: libraries' workspaces and the
  allocator, ``benchmarks/bench_scaling.py``), 1 GiB on CUDA (cuDNN/cuBLAS workspaces and the
  caching allocator's slack: an allowance, not yet measured).

:func:`plan_memory` compares the total with the device's free memory (``torch.cuda.mem_get_info``
on CUDA, ``MemAvailable`` on the CPU; or ``memory_gib`` when set) and takes the largest chunk of
classes that fits; when even one class does not fit it says so before the run starts. The
estimate errs on the high side (allocator slack, the framework's own buffers), by a margin of
10 % of the budget.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

GIB = 1024 ** 3
SAFETY = 0.9  # the share of the free memory a plan may use
WORKSPACE_ARRAYS = 8  # n*E-sized arrays of the op's workspace besides the D spectra
FRAMEWORK_CPU, FRAMEWORK_CUDA = 64 * 1024 ** 2, GIB  # the framework's own buffers


class DoesNotFit(ValueError):
    """A run that cannot fit in memory (one line: what it needs, what there is, what to change)."""


def _layer_maps(image_shape, width: int, depth: int) -> list[int]:
    """Spatial size ``h * w`` of each convolution's output (28x28 inputs are padded to 32x32)."""
    h, w = (int(s) for s in image_shape[1:])
    if (h, w) == (28, 28):
        h = w = 32
    maps = []
    for _ in range(depth):
        maps.append(h * w)
        h, w = h // 2, w // 2
    return maps


@dataclass
class MemoryPlan:
    """Bytes per part for one chunk of ``chunk_classes`` classes, the budget and the chunks."""
    parts: dict[str, float]
    budget: float
    where: str
    classes: int  # this process's classes
    chunk_classes: int

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """``(lo, hi)`` class ranges (local to this process) of the chunks, in order."""
        step = max(1, self.chunk_classes)
        return [(lo, min(lo + step, self.classes)) for lo in range(0, self.classes, step)]

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in self.parts.items())
        chunking = (f"all {self.classes} classes in one pass" if self.chunk_classes >= self.classes
                    else f"{self.classes} classes in {len(self.chunks)} chunks of up to {self.chunk_classes}")
        return (f"memory estimate per process: {format_bytes(self.total)} ({parts}) of {format_bytes(self.budget)} "
                f"{self.where}; {chunking}")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def estimate(image_shape, *, ipc: int, classes: int, chunk_classes: int, num_domains: int, n_real: int,
             width: int, depth: int, num_classes: int, surgery: bool, precision: str = "float32",
             batched_backward: bool = False, cuda: bool = False, contrast: bool = False, ema: bool = False,
             amplitude_floor: bool = False, dam: bool = False) -> dict[str, float]:
    """Bytes of each part of one iteration (see the module docstring) for ``classes`` classes of
    this process taken ``chunk_classes`` at a time."""
    C = int(image_shape[0])
    E = C * math.prod(int(s) for s in image_shape[1:])
    D, f32 = num_domains, 4
    act = 2 if precision == "bfloat16" else 4
    maps = _layer_maps(image_shape, width, depth)
    # kept per synthetic image for the backward: each layer's convolution, norm and pooling
    # outputs, under autocast the bfloat16 copy of each layer's input, and the DSA intermediates
    saved = sum(width * m * (act + f32) + width * (m // 4) * f32 for m in maps) + 3 * E * f32
    if act != f32:
        saved += (C * maps[0] + sum(width * m for m in maps[1:])) * act
    largest = width * maps[0] * f32
    n = chunk_classes * ipc
    backward = n * 3 * largest * (D if surgery and batched_backward else 1)
    real_forward = D * n_real * (E * f32 + 2 * largest)  # one class, no graph
    params = sum(width * cin * 9 + 3 * width for cin in [C] + [width] * (depth - 1)) * f32
    params += (width * maps[-1] // 4 + 1) * num_classes * f32
    N = classes * ipc
    views = D if dam else 0  # DAM's domain views go through the net as well
    parts = {
        "synthetic set": 3 * N * E * f32 + params,
        "real batches": 2 * chunk_classes * D * n_real * E * f32,
        "activations": (1 + views) * n * saved + views * n * E * f32 + backward + real_forward,
    }
    if surgery:
        parts["domain gradients"] = D * n * E * f32 * (1 if batched_backward else 2) * (2 if contrast else 1)
        parts["surgery workspace"] = (D + WORKSPACE_ARRAYS) * n * E * f32
        if ema:
            parts["moving average"] = D * N * E * f32
        if amplitude_floor:
            parts["amplitude floor"] = N * E // int(image_shape[-1]) * (int(image_shape[-1]) // 2 + 1) * f32
    if dam:
        parts["domain masks"] = 3 * D * N * E * f32
    parts["framework"] = FRAMEWORK_CUDA if cuda else FRAMEWORK_CPU
    return parts


def free_memory(device: torch.device) -> tuple[float, str]:
    """``(bytes, description)`` of the memory this process can still use on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(free), f"of the {format_bytes(free)} free on {device}"
    return float(_available_ram()), "of the RAM available"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def plan_memory(image_shape, *, ipc: int, classes: int, num_domains: int, n_real: int, width: int, depth: int,
                num_classes: int, surgery: bool, device, precision: str = "float32", chunk_classes: int = 0,
                memory_gib: float = 0.0, splittable: bool = True, **options: bool) -> MemoryPlan:
    """The chunk size for this process's ``classes`` classes: ``chunk_classes`` when given
    (> 0), else the most that fit in the budget (``memory_gib`` GiB when > 0, else 90 % of what
    the device has free). ``splittable=False`` (batch norm pools over all classes): one chunk.
    ``options``: what the run's options add (:func:`estimate`'s ``contrast``, ``ema``,
    ``amplitude_floor``, ``dam``).

    Raises :class:`DoesNotFit` when the chunk (one class, if chosen automatically) does not fit.
    """
    device = torch.device(device)
    if memory_gib > 0:
        budget, where = memory_gib * GIB, "allowed (memory_gib)"
    else:
        free, where = free_memory(device)
        budget = SAFETY * free
        where = f"usable (90% {where})"
    common = dict(ipc=ipc, classes=classes, num_domains=num_domains, n_real=n_real, width=width, depth=depth,
                  num_classes=num_classes, surgery=surgery, precision=precision,
                  batched_backward=device.type == "cuda", cuda=device.type == "cuda", **options)

    def parts_for(k: int) -> dict[str, float]:
        return estimate(image_shape, chunk_classes=k, **common)

    if chunk_classes > 0 or not splittable:
        k = classes if not splittable else min(chunk_classes, classes)
    else:  # the total grows linearly in k: the largest k that fits, found by bisection
        lo, hi = 1, classes
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(parts_for(mid).values()) <= budget:
                lo = mid
            else:
                hi = mid - 1
        k = lo
    plan = MemoryPlan(parts_for(k), budget, where, classes, k)
    if plan.total > budget:
        what = (f"{k} class(es) at a time" if splittable else
                f"all {classes} classes at once (batch norm pools its statistics over every class)")
        raise DoesNotFit(
            f"this distillation does not fit in memory: {what} need about {format_bytes(plan.total)} "
            f"({', '.join(f'{n} {format_bytes(v)}' for n, v in plan.parts.items())}) but {format_bytes(budget)} "
            f"{'is' if memory_gib > 0 else 'are'} {where}; lower batch_real, ipc or width, use more processes "
            "(each holds only its classes), or a device with more memory")
    return plan
