"""Leave-one-domain-out evaluation of a (synthetic or selected) training set, and the baselines.

``evaluate_synthetic`` trains ``num_eval`` freshly initialised ConvNets on the small set (SGD
with momentum, DSA with a new draw per image and step, learning rate x0.1 at half the epochs, as
in the DM reference) and reports accuracy on the unseen target domain (OOD) and on the held-out
test split of the source domains (in-domain). ``random_real_subset`` and ``herding`` build the
real-image baselines at equal IPC (``shared/docs/sgs-spec.md`` section 6).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ._config import DictConfig
from .dm.architectures import build_network, parse_archs
from .dm.dsa import DEFAULT_STRATEGY, DSAParams, augment, parse_strategy
from .dm.networks import NORMS, build_convnet


@dataclass
class EvalConfig(DictConfig):
    """Training of the evaluation networks (defaults: the DM reference / the paper)."""
    _kind = "evaluation"
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch: int = 256
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    num_eval: int = 5
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    test_batch: int = 1024
    # evaluation network(s): "convnet", "alexnet", "vgg11", "resnet18", comma-separated, each
    # optionally with its own width ("convnet,vgg11:16"; no width: `width`); depth: ConvNet only
    arch: str = "convnet"

    def __post_init__(self):
        for name in ("epochs", "batch", "num_eval", "width", "depth", "test_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got "
                             f"{self.lr}, {self.weight_decay}, {self.momentum}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        parse_strategy(self.dsa_strategy)
        parse_archs(self.arch)

    def per_arch(self) -> dict[str, "EvalConfig"]:
        """One single-architecture config per listed architecture (its width filled in)."""
        return {name: dataclasses.replace(self, arch=name, width=width or self.width)
                for name, width in parse_archs(self.arch)}



def _seed_for(seed: int, k: int) -> int:
    return (int(seed) * 1_000_003 + k) % (2 ** 63)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: EvalConfig,
                     device="cpu", seed: int = 0):
    """Train one fresh network of ``cfg.arch`` (one architecture) on ``(images, labels)``;
    returns ``(net, final_train_loss)``."""
    device = torch.device(device)
    (arch, width), *more = parse_archs(cfg.arch)
    if more:
        raise ValueError(f"train_classifier trains one architecture, got arch={cfg.arch!r} (see EvalConfig.per_arch)")
    gen = torch.Generator().manual_seed(_seed_for(seed, 0))
    net = build_network(arch, images.shape[1:], num_classes, width or cfg.width, cfg.depth, cfg.norm,
                        generator=gen, device=device)
    net.train()
    x, y = images.to(device, torch.float32), labels.to(device, torch.long)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    strategy = cfg.dsa_strategy if cfg.dsa else "none"
    loss = torch.zeros((), device=device)
    for epoch in range(cfg.epochs):
        if epoch == cfg.epochs // 2 and cfg.epochs > 1:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.1
        order = torch.randperm(len(x), generator=gen).to(device)
        for start in range(0, len(x), cfg.batch):
            idx = order[start:start + cfg.batch]
            xb = augment(x[idx], DSAParams.sample(strategy, gen, device=device, batch=len(idx)))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net, float(loss.detach())


@torch.no_grad()
def predict(net, images: torch.Tensor, device="cpu", batch: int = 1024) -> torch.Tensor:
    """Predicted labels (CPU int64) of ``images``, in batches."""
    net.eval()
    out = [net(images[i:i + batch].to(device, torch.float32)).argmax(1).cpu() for i in range(0, len(images), batch)]
    net.train()
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, data, source_domains: Sequence[str],
                       target_domain: str, cfg: EvalConfig | None = None, device="cpu", seed: int = 0) -> dict:
    """Train ``cfg.num_eval`` fresh networks of each architecture of ``cfg.arch`` on
    ``(images, labels)`` and test them.

    Returns a dict with ``ood_acc`` (target-domain test accuracy, one per net), ``in_domain_acc``
    (pooled test split of the source domains), their ``*_mean``/``*_std`` (sample std over
    nets), ``per_domain`` (mean accuracy per domain) and ``train_loss`` (final loss per net), for
    the first architecture listed, and ``per_arch``: the same numbers for every architecture.
    Accuracies are fractions in [0, 1].
    """
    cfg = cfg or EvalConfig()
    source_domains = list(source_domains)
    for d in [*source_domains, target_domain]:
        if d not in data.domains:
            raise ValueError(f"unknown domain {d!r}; the dataset has {list(data.domains)}")
    if target_domain in source_domains:
        raise ValueError(f"the target domain {target_domain!r} is also a source domain: that is not an OOD test")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need a non-empty training set with one label per image, got {len(images)} "
                         f"images and {len(labels)} labels")
    t0 = time.perf_counter()
    tests = {d: data.split_tensors([d], "test") for d in [target_domain, *source_domains]}
    if len(tests[target_domain][1]) == 0:
        raise ValueError(f"the target domain {target_domain!r} has no test images")
    per_arch = {name: _evaluate_arch(images, labels, len(data.classes), tests, source_domains, target_domain,
                                     arch_cfg, device, seed)
                for name, arch_cfg in cfg.per_arch().items()}
    first = next(iter(per_arch.values()))
    return {"target_domain": target_domain, "source_domains": source_domains, "num_eval": cfg.num_eval,
            **{k: v for k, v in first.items() if k not in ("width", "seconds")},
            "per_arch": per_arch, "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}


def _evaluate_arch(images, labels, K, tests, source_domains, target_domain, cfg: EvalConfig, device, seed) -> dict:
    t0 = time.perf_counter()
    ood, ind, per_domain, losses = [], [], {d: [] for d in tests}, []
    for k in range(cfg.num_eval):
        net, loss = train_classifier(images, labels, K, cfg, device, seed=_seed_for(seed, k + 1))
        losses.append(loss)
        correct = {}
        for d, (x, y) in tests.items():
            hit = (predict(net, x, device, cfg.test_batch) == y)
            correct[d] = (int(hit.sum()), len(y))
            per_domain[d].append(correct[d][0] / max(1, correct[d][1]))
        ood.append(per_domain[target_domain][-1])
        n_src = sum(correct[d][1] for d in source_domains)
        ind.append(sum(correct[d][0] for d in source_domains) / n_src if n_src else float("nan"))
    (om, osd), (im, isd) = _mean_std(ood), _mean_std(ind)
    return {"width": cfg.width, "ood_acc_mean": om, "ood_acc_std": osd, "ood_acc": ood,
            "in_domain_acc_mean": im, "in_domain_acc_std": isd, "in_domain_acc": ind,
            "per_domain": {d: _mean_std(v)[0] for d, v in per_domain.items()},
            "train_loss": losses, "seconds": time.perf_counter() - t0}


def same_eval_config(saved: dict | None, cfg: EvalConfig) -> bool:
    """Whether a saved evaluation config (e.g. a ``metrics.json``'s ``config``, possibly written
    before some option existed: missing options take their defaults) equals ``cfg``."""
    try:
        return saved is not None and EvalConfig.from_dict(saved) == cfg
    except (TypeError, ValueError):
        return False


# --- baselines ------------------------------------------------------------------------------

def _per_domain_counts(ipc: int, n_domains: int) -> list[int]:
    return [ipc // n_domains + (i < ipc % n_domains) for i in range(n_domains)]


def random_real_subset(data, source_domains: Sequence[str], ipc: int, seed: int = 0):
    """``ipc`` random real training images per class, spread evenly over the source domains.

    Returns ``(images [K*ipc, C, H, W], labels [K*ipc])``, class-ordered.
    """
    source_domains = list(source_domains)
    gen = torch.Generator().manual_seed(_seed_for(seed, 7))
    images = []
    for c in range(len(data.classes)):
        for d, k in zip(source_domains, _per_domain_counts(ipc, len(source_domains))):
            if k:
                images.append(data.real_batch(d, c, k, generator=gen))
    return torch.cat(images).float(), torch.arange(len(data.classes)).repeat_interleave(ipc)


@torch.no_grad()
def herding(data, source_domains: Sequence[str], ipc: int, seed: int = 0, width: int = 128, depth: int = 3,
            norm: str = "instancenorm", device="cpu", max_pool: int = 2000, batch: int = 512):
    """Herding selection: per class, greedily add the real image that brings the mean embedding
    of the selection closest to the class mean (over all source domains), with the features of
    a randomly initialised ConvNet (the same kind of embedding DM matches).

    ``max_pool`` caps the candidates per class (a random subset, spread evenly over the source
    domains) to bound memory and decoding time.
    Returns ``(images [K*ipc, C, H, W], labels [K*ipc])``, class-ordered.
    """
    source_domains = list(source_domains)
    gen = torch.Generator().manual_seed(_seed_for(seed, 11))
    net = build_convnet(data.image_shape, len(data.classes), width, depth, norm, generator=gen, device=device)
    net.train()  # instance norm is per image; batch norm uses batch statistics as in the DM loop
    images = []
    for c in range(len(data.classes)):
        share = -(-max_pool // len(source_domains))  # candidates per domain (decode no more than needed)
        pool = torch.cat([data.real_batch(d, c, min(share, data.count(d, c, "train")), generator=gen)
                          for d in source_domains])
        if len(pool) < ipc:
            raise ValueError(f"class {data.classes[c]!r} has only {len(pool)} training images in "
                             f"{source_domains}; herding needs ipc={ipc}")
        feats = torch.cat([net.embed(pool[i:i + batch].to(device)).double() for i in range(0, len(pool), batch)])
        chosen = herding_select(feats, ipc)
        images.append(pool[chosen])
    return torch.cat(images).float(), torch.arange(len(data.classes)).repeat_interleave(ipc)


def herding_select(features: torch.Tensor, k: int) -> list[int]:
    """Greedy herding on ``features [M, F]``: ``k`` distinct row indices, each step adding the
    row that brings the running mean of the selection closest to the mean of all rows."""
    if not 0 <= k <= len(features):
        raise ValueError(f"cannot select {k} of {len(features)} rows")
    target, total = features.mean(0), torch.zeros_like(features[0])
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    chosen: list[int] = []
    for step in range(k):
        dist = ((target - (total + features) / (step + 1)) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        total += features[i]
    return chosen


BASELINES = {"random": random_real_subset, "herding": herding}
