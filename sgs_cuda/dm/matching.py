"""Domain-wise matching losses of the DM family: DM (feature means) and M3D (kernel MMD).

Both compare, per class, the embeddings of real images with those of the synthetic images and
return one loss per source domain plus the pooled-batch loss:

- ``dm``: ``L_d = sum_c || mean psi(real_{c,d}) - mean psi(syn_c) ||^2`` (Zhao & Bilen, DM).
- ``m3d``: ``L_d = sum_c h_c / 2 * MMD^2_k(psi(real_{c,d}), psi(syn_c))`` with the Gaussian
  kernel ``k(x, y) = exp(-||x - y||^2 / h_c)`` (Zhang et al., M3D, AAAI 2024: MMD in the RKHS of
  a Gaussian kernel, a universal kernel, so all moments are matched, not only the mean), biased
  (V-statistic) estimate.

M3D's bandwidth: the paper's text reachable from here does not fix it, so it is the median
heuristic (Gretton et al. 2012), ``h_c = 2 * median ||x - x'||^2`` over the pooled real
embeddings of class ``c`` (all source domains, this iteration), without gradient. The factor
``h_c / 2`` puts the loss in DM units: as ``h -> inf``, ``h/2 * MMD^2 -> ||mean x - mean y||^2``
(``k ~ 1 - d^2/h``), so one ``lr_img`` scale fits both methods.

Why the mean of the domain-wise gradients is the pooled gradient (equal real batch sizes ``n``
per domain): DM's ``L_d`` depends on the synthetic images through ``-2 mu_d . mu_s + |mu_s|^2``,
linear in ``mu_d``, and ``mean_d mu_d`` is the pooled mean. M3D's ``MMD^2(R_d, S) = kxx_d +
kyy - 2 kxy_d`` with ``kxy_d = 1/(n m) sum_{i in R_d, a} k(r_i, s_a)``: ``kxx_d`` does not depend
on ``S``, ``kyy`` is the same for every domain and the pooled loss, and ``mean_d kxy_d`` is the
pooled cross term when every ``R_d`` has ``n`` images. So ``mean_d L_d = pooled + const`` and the
gradients agree, *provided the bandwidth is the same for all domain terms and the pooled term and
carries no gradient* (one ``h_c`` per class from the pooled real batch, as here). A bandwidth
chosen per domain batch, unequal batch sizes or a gradient through ``h`` break the identity.
The surgery's ``mean`` term is then M3D's own update, so DM+SGS with ``alpha = beta = 0`` is
plain M3D, exactly as for DM.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .dsa import DSAParams, augment

MATCHINGS = ("dm", "m3d")


def matching_losses(net, real: Sequence[torch.Tensor], syn: torch.Tensor, params: Sequence[DSAParams | None],
                    pool_all: bool = False, present: Sequence[Sequence[int]] | None = None,
                    num_domains: int | None = None, matching: str = "dm", contrast: bool = False,
                    views: torch.Tensor | None = None):
    """``(L [D], pooled)``: the domain-wise losses and the pooled-batch loss of ``matching``;
    with ``contrast`` also the domain-wise class-contrast losses (:func:`contrast_losses`), in the
    same forward pass: ``(L, pooled, contrast)``; with ``views`` (``[D, K * ipc, C, H, W]``, the
    domain views of ``syn``, :mod:`sgs_cuda.dm.dam`) also ``sum_d`` of view ``d``'s loss against
    domain ``d``'s real images alone, the real features shared: ``(L, pooled, view_loss)``.

    ``real[c]``: ``[D, n, C, H, W]`` real images of class ``c``; ``syn``: ``[K * ipc, C, H, W]``
    class-ordered; ``params[c]``: the DSA draw of class ``c`` (applied to both sides).
    Real features need no gradient; the synthetic images go through the net in one forward
    (its graph is shared by all D losses). ``pool_all`` (batch norm): the real images of all
    classes also go through one forward, so both sides see batch statistics over all classes.

    ``present[c]`` (with ``num_domains = D``): the domains ``real[c]`` comes from, when some
    domain lacks the class (pseudo-domains). A missing domain's class term is the pooled class
    term (for DM: its class mean is the mean over the domains that have it), so it pulls toward
    the pooled class distribution and ``mean_d L_d`` keeps the pooled loss's gradient.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    K = len(real)
    ipc = syn.shape[0] // K
    real_aug = [augment(r.flatten(0, 1), p) for r, p in zip(real, params)]
    syn_aug = _augment_classes(syn, params, ipc)
    with torch.no_grad():
        if pool_all:
            feats = net.embed(torch.cat(real_aug)).split([len(r) for r in real_aug])
        else:
            feats = [net.embed(r) for r in real_aug]
        feats = [f.view(r.shape[0], r.shape[1], -1) for f, r in zip(feats, real)]  # [D_c, n, F]
    syn_feats = net.embed(torch.cat(syn_aug)).view(K, ipc, -1)  # [K, ipc, F]
    if matching == "dm":
        out = _dm_losses(feats, syn_feats, present, num_domains)
    else:
        out = _m3d_losses(feats, syn_feats, present, num_domains)
    if contrast:
        out = (*out, contrast_losses(_class_means(feats, present, num_domains), syn_feats.mean(1)))
    if views is not None:
        out = (*out, _view_losses(net, feats, views, params, ipc, present, num_domains, matching))
    return out


def _augment_classes(syn: torch.Tensor, params, ipc: int) -> list[torch.Tensor]:
    return [augment(syn[c * ipc:(c + 1) * ipc], p) for c, p in enumerate(params)]


def _view_losses(net, feats, views, params, ipc, present, num_domains, matching) -> torch.Tensor:
    """``sum_d`` of domain ``d``'s matching loss for view ``d`` (each view through the same DSA draw)."""
    K = len(feats)
    total = views.new_zeros(())
    for d, view in enumerate(views):
        view_feats = net.embed(torch.cat(_augment_classes(view, params, ipc))).view(K, ipc, -1)
        if matching == "dm":
            losses, _ = _dm_losses(feats, view_feats, present, num_domains)
        else:
            losses, _ = _m3d_losses(feats, view_feats, present, num_domains)
        total = total + losses[d]
    return total


def contrast_losses(mu_real: torch.Tensor, mu_syn: torch.Tensor) -> torch.Tensor:
    """``[D]``: per domain d, ``sum_c 2 <mu_syn_c, mean_{c' != c} mu_{c',d} - mu_{c,d}>``, whose gradient
    pulls each class's synthetic mean embedding toward that domain's class mean and pushes it from
    the domain's other class means: the class-discriminative content of domain d, in the same
    random network (``mu_real`` ``[K, D, F]`` without gradient, ``mu_syn`` ``[K, F]``). With one
    class there is nothing to contrast: the pull alone."""
    K = mu_real.shape[0]
    others = (mu_real.sum(0, keepdim=True) - mu_real) / (K - 1) if K > 1 else torch.zeros_like(mu_real)
    return 2 * ((others - mu_real) * mu_syn[:, None]).sum(dim=(0, 2))


def _class_means(feats, present, num_domains) -> torch.Tensor:
    """``[K, D, F]``: each class's mean real embedding per domain (a missing domain: the pooled one)."""
    with torch.no_grad():
        means = [f.mean(1) for f in feats]  # [D_c, F]
        if present is not None:
            means = [_fill_missing(m, idx, num_domains) for m, idx in zip(means, present)]
        return torch.stack(means)


def _dm_losses(feats, syn_feats, present, num_domains):
    mu_real = _class_means(feats, present, num_domains)  # [K, D, F]
    mu_syn = syn_feats.mean(1)  # [K, F]
    losses = ((mu_real - mu_syn[:, None]) ** 2).sum(dim=(0, 2))  # [D]
    pooled = ((mu_real.mean(1) - mu_syn) ** 2).sum()
    return losses, pooled


def _fill_missing(means: torch.Tensor, present: Sequence[int], num_domains: int) -> torch.Tensor:
    if len(present) == num_domains:
        return means
    full = means.mean(0, keepdim=True).expand(num_domains, -1).clone()
    full[list(present)] = means
    return full


def _m3d_losses(feats, syn_feats, present, num_domains):
    terms, pooled = [], []
    for c, f in enumerate(feats):
        per_domain, class_pooled = m3d_class_losses(f, syn_feats[c])
        if present is not None and len(present[c]) != num_domains:
            full = class_pooled.expand(num_domains).clone()
            full[list(present[c])] = per_domain
            per_domain = full
        terms.append(per_domain)
        pooled.append(class_pooled)
    return torch.stack(terms).sum(0), torch.stack(pooled).sum()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` squared Euclidean distances between the rows (clamped at 0)."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def median_bandwidth(x: torch.Tensor) -> torch.Tensor:
    """``2 * median`` of the squared distances between distinct rows of ``x`` (no gradient);
    1 when there are fewer than two rows or all rows coincide."""
    with torch.no_grad():
        n = len(x)
        if n < 2:
            return x.new_ones(())
        d2 = squared_distances(x, x)
        off = d2[~torch.eye(n, dtype=torch.bool, device=x.device)]
        h = 2 * off.median()
        return torch.where(h > 0, h, torch.ones_like(h))


def m3d_class_losses(real: torch.Tensor, syn: torch.Tensor, bandwidth: torch.Tensor | float | None = None):
    """One class's M3D terms: ``(per_domain [D], pooled)``, each ``h / 2 * MMD^2``.

    ``real``: ``[D, n, F]`` embeddings of the class's real images per domain; ``syn``: ``[m, F]``
    embeddings of its synthetic images. ``bandwidth`` ``h`` of ``k(x, y) = exp(-||x-y||^2 / h)``:
    the median heuristic over the pooled ``real`` rows when ``None``.
    """
    D, n, _ = real.shape
    pooled_real = real.reshape(D * n, -1)
    h = median_bandwidth(pooled_real) if bandwidth is None else torch.as_tensor(bandwidth).to(syn)
    with torch.no_grad():
        k_rr = torch.exp(-squared_distances(pooled_real, pooled_real) / h).view(D, n, D, n)
        kxx = k_rr.diagonal(dim1=0, dim2=2).mean(dim=(0, 1))  # [D]: within-domain blocks
        kxx_pooled = k_rr.mean()
    kyy = torch.exp(-squared_distances(syn, syn) / h).mean()
    k_rs = torch.exp(-squared_distances(pooled_real, syn) / h).view(D, n, -1)
    kxy = k_rs.mean(dim=(1, 2))  # [D]
    per_domain = h / 2 * (kxx + kyy - 2 * kxy)
    pooled = h / 2 * (kxx_pooled + kyy - 2 * k_rs.mean())
    return per_domain, pooled
