"""PNG outputs of a run: the synthetic images and the training curves (matplotlib, no pyplot,
so no global backend state is touched and it works headless), written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from .. import _io


def _denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def save_image_grid(images: torch.Tensor, labels: torch.Tensor, path, mean: Sequence[float], std: Sequence[float],
                    classes: Sequence[str] | None = None, scale: int = 2, max_per_class: int = 10) -> Path:
    """One row per class (up to ``max_per_class`` images each), denormalised to [0, 1]."""
    from matplotlib.figure import Figure

    images = _denormalize(images.detach().float().cpu(), mean, std)
    labels = labels.cpu()
    present = sorted(set(labels.tolist()))
    rows = [images[labels == c][:max_per_class] for c in present]
    cols = max(len(r) for r in rows)
    c, h, w = images.shape[1:]
    fig = Figure(figsize=(cols * w * scale / 100 + 1.2, len(rows) * (h * scale / 100 + 0.05) + 0.3), dpi=100)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (cls, row) in enumerate(zip(present, rows)):
        for j in range(cols):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("on" if j < len(row) else "off")
            if j < len(row):
                a = row[j].permute(1, 2, 0).numpy()
                ax.imshow(a[..., 0] if c == 1 else a, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                          interpolation="nearest")
            if j == 0:
                ax.set_ylabel(str(classes[cls])[:12] if classes else str(cls), fontsize=8)
    fig.tight_layout(pad=0.2)
    return _io.save_figure(fig, path)


def save_curves(histories: Mapping[str, dict], path, smooth: int = 0) -> Path:
    """Loss (log scale) of every history and, where present, the surgery's mask fraction and
    shared energy over the iterations. ``histories``: label -> history dict of a run."""
    from matplotlib.figure import Figure

    has_sgs = any(h.get("mask_fraction") for h in histories.values())
    fig = Figure(figsize=(10 if has_sgs else 5.5, 3.6), dpi=100)
    axes = fig.subplots(1, 2 if has_sgs else 1, squeeze=False)[0]
    for label, h in histories.items():
        if h.get("loss"):
            axes[0].plot(h["iteration"], _smooth(h["loss"], smooth), label=label, lw=1)
        if has_sgs and h.get("mask_fraction"):
            axes[1].plot(h["iteration"], _smooth(h["mask_fraction"], smooth), label=f"{label}: mask fraction", lw=1)
            axes[1].plot(h["iteration"], _smooth(h["shared_energy"], smooth), label=f"{label}: shared energy",
                         lw=1, ls="--")
    if any(v > 0 for h in histories.values() for v in h.get("loss") or []):  # (a run of no steps has none)
        axes[0].set_yscale("log")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("pooled DM loss")
    axes[0].legend(fontsize=7)
    if has_sgs:
        axes[1].set_xlabel("iteration")
        axes[1].set_ylim(0, 1)
        axes[1].set_title("surgery diagnostics", fontsize=9)
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _io.save_figure(fig, path)


def _smooth(values: Sequence[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` points (``k <= 1``: unchanged)."""
    if k <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def save_band_curves(histories: Mapping[str, dict], path, smooth: int = 0) -> Path:
    """The surgery's diagnostics per radial frequency band over the iterations
    (``history["bands"]``, :mod:`sgs_cuda.dm.bands`): mask fraction, shared energy and diversity
    energy, one colour per band (low to high frequency), one line style per history."""
    from matplotlib.figure import Figure

    from .bands import BAND_EDGES, band_labels

    runs = {label: h["bands"] for label, h in histories.items() if h.get("bands", {}).get("iteration")}
    if not runs:
        raise ValueError("no history has band diagnostics (a DM+SGS run with the spectral mask records them)")
    panels = (("mask_fraction", "mask fraction"), ("shared_energy", "shared energy / mean energy"),
              ("diversity_energy", "diversity energy / mean energy"))
    fig = Figure(figsize=(13, 3.8), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = ("-", "--", ":", "-.")
    for r, (label, bands) in enumerate(runs.items()):
        names = band_labels(bands.get("edges", BAND_EDGES))
        for (key, title), ax in zip(panels, axes):
            columns = list(zip(*bands[key]))  # per band: its values over the recorded iterations
            for b, values in enumerate(columns):
                ax.plot(bands["iteration"], _smooth(list(values), smooth), color=f"C{b}", ls=styles[r % len(styles)],
                        lw=1, label=f"{label}: radius {names[b]}" if len(runs) > 1 else f"radius {names[b]}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("iteration")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
