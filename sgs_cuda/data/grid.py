"""A PNG overview of a multi-domain dataset: one row per domain, one column per class.

Seeing the domains side by side is the quickest check that they differ in style while the
classes stay recognisable.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import denormalize


def save_sample_grid(data, path, per_domain: int = 10, seed: int = 0, scale: int = 3) -> Path:
    """Write a PNG with ``per_domain`` train images per domain row, cycling over the classes
    (column ``j`` shows class ``j % K``), labelled with domain and class names."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    if per_domain < 1:
        raise ValueError(f"per_domain must be >= 1, got {per_domain}")
    g = torch.Generator().manual_seed(seed)
    k = len(data.classes)
    per_class = -(-per_domain // k)
    rows = []
    for d in data.domains:
        batches = [denormalize(data.real_batch(d, cls, per_class, generator=g), data.mean, data.std)
                   for cls in range(min(k, per_domain))]
        rows.append([batches[j % k][j // k] for j in range(per_domain)])
    c, h, w = data.image_shape
    fig = Figure(figsize=(per_domain * w * scale / 100 + 1.2, len(rows) * (h * scale / 100 + 0.25) + 0.4), dpi=100)
    axes = fig.subplots(len(rows), per_domain, squeeze=False)
    for r, (domain, row) in enumerate(zip(data.domains, rows)):
        for j, img in enumerate(row):
            ax = axes[r][j]
            a = img.permute(1, 2, 0).numpy()
            ax.imshow(a[..., 0] if c == 1 else a, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(str(data.classes[j % k])[:12], fontsize=8)
            if j == 0:
                ax.set_ylabel(domain, fontsize=9)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

