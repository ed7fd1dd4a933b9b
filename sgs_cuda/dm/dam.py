"""Domain-aware masks for DM (``dm_dam``): DAM-style domain awareness within the DM family.

After DAM (Choi et al., "DAM: Domain-Aware Module for Multi-Domain Dataset Condensation", 2025):
each synthetic image ``x`` carries ``D`` learnable mask logits ``z_d`` (one per source domain,
per pixel and channel, initialised to the same small value so that every view starts as
``x / D``); a per-element softmax over the domains at temperature ``T`` splits the image into
``D`` domain views that sum back to it,

    alpha_d = softmax_d(z / T),    x_d = x * alpha_d,    sum_d x_d = x,

and the loss adds, to DM's pooled class-mean matching of ``x``, ``weight`` times the matching of
each view ``x_d`` with domain ``d``'s real images of the class (:func:`~sgs_cuda.dm.matching.matching_losses`
``views``). The masks are optimised with the images (same optimizer and step) and discarded at
the end: the set keeps its images per class. What this reading fixes that the paper's abstract
does not: the domains are the benchmark's labelled source domains (DAM labels pseudo-domains by
low-frequency amplitude when none are given), the view loss is DM's (or M3D's) own domain term,
and ``T`` and ``weight`` are parameters (``DistillConfig.dam_temperature``, ``dam_weight``).
"""
from __future__ import annotations

import torch

INITIAL_LOGIT = 0.01  # every domain's logit starts equal: each view is x / D


def initial_logits(num_images: int, num_domains: int, image_shape, device) -> torch.Tensor:
    """``[N, D, C, H, W]`` mask logits, rows first (sharded and checkpointed like the images)."""
    return torch.full((num_images, num_domains, *image_shape), INITIAL_LOGIT, device=device)


def domain_views(images: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[D, N, C, H, W]``: the views ``x * softmax_d(z / T)`` of ``images`` ``[N, C, H, W]``."""
    alpha = torch.softmax(logits / temperature, dim=1)  # [N, D, C, H, W]
    return (images[:, None] * alpha).transpose(0, 1)
