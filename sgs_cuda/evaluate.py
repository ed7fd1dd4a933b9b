"""Leave-one-domain-out evaluation of a (synthetic or selected) training set, and the baselines.

``evaluate_synthetic`` trains ``num_eval`` freshly initialised ConvNets on the small set (SGD
with momentum, DSA with a new draw per image and step, learning rate x0.1 at half the epochs, as
in the DM reference) and reports accuracy on the unseen target domain (OOD) and on the held-out
test split of the source domains (in-domain). ``random_real_subset`` and ``herding`` build the
real-image baselines at equal IPC (``shared/docs/sgs-spec.md`` section 6).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ._dictconfig import DictConfig
from .data.sampling import iter_uint8_split
from .dg import add_mixstyle, amplitude_mix
from .dm.architectures import build_network, parse_archs
from .dm.dsa import DEFAULT_STRATEGY, DSAParams, augment, parse_strategy
from .dm.networks import NORMS, build_convnet
from .stats import mean_sd


TARGET_SPLITS = ("all", "test")


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
    depth: int | str = 3  # ConvNet depth, or "auto": follows the resolution (dm.networks.auto_depth)
    norm: str = "instancenorm"
    test_batch: int = 1024
    # the images a target domain is scored on: "all" (every image: the target is never trained or
    # selected on, and the DG literature scores the whole held-out domain), or its "test" split
    target_split: str = "all"
    # post-hoc domain generalisation while training the evaluation networks (sgs_cuda.dg; 0: off):
    # MixStyle's probability per batch (ConvNet only) and its Beta(alpha, alpha); FACT's
    # amplitude-mix strength eta
    mixstyle: float = 0.0
    mixstyle_alpha: float = 0.1
    amp_mix: float = 0.0
    whole_epochs: int = 30  # the whole-source reference's networks (method "whole"): many more images per epoch
    # evaluation network(s): "convnet", "alexnet", "vgg11", "resnet18", comma-separated, each
    # optionally with its own width ("convnet,vgg11:16"; no width: `width`); depth: ConvNet only
    arch: str = "convnet"

    def __post_init__(self):
        for name in ("epochs", "batch", "num_eval", "width", "test_batch", "whole_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth != "auto" and (not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 1):
            raise ValueError(f"depth must be >= 1 or 'auto', got {self.depth!r}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got "
                             f"{self.lr}, {self.weight_decay}, {self.momentum}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0 <= self.mixstyle <= 1 or self.mixstyle_alpha <= 0 or not 0 <= self.amp_mix <= 1:
            raise ValueError(f"need 0 <= mixstyle <= 1, mixstyle_alpha > 0 and 0 <= amp_mix <= 1; got "
                             f"{self.mixstyle}, {self.mixstyle_alpha}, {self.amp_mix}")
        if self.mixstyle and any(name != "convnet" for name, _ in parse_archs(self.arch)):
            raise ValueError("eval.mixstyle is implemented for the ConvNet evaluator only (eval.arch=convnet)")
        if self.target_split not in TARGET_SPLITS:
            raise ValueError(f"target_split must be one of {TARGET_SPLITS}, got {self.target_split!r}")
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
    if cfg.mixstyle:
        add_mixstyle(net, cfg.mixstyle, cfg.mixstyle_alpha, gen)
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
            if cfg.amp_mix:
                xb = amplitude_mix(xb, cfg.amp_mix, gen)
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


def iter_batches(data, domains: Sequence[str], split: str = "test",
                 batch: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of ``split`` of ``domains`` in batches of at most ``batch``, so a large
    test set (ImageNet val, ImageNet-Sketch) is never held in memory whole: the source's own
    ``iter_split`` when it has one, else class by class through its indexed uint8 reads, else
    (sources held in memory anyway) slices of ``split_tensors``."""
    domains = list(domains)
    if hasattr(data, "iter_split"):
        yield from data.iter_split(domains, split, batch)
    elif hasattr(data, "uint8_images") and hasattr(data, "normalize_pixels"):
        yield from iter_uint8_split(data, domains, split, batch)
    else:
        x, y = data.split_tensors(domains, split)
        for start in range(0, len(y), batch):
            yield x[start:start + batch], y[start:start + batch]


def split_size(data, domains: Sequence[str], split: str = "test") -> int:
    """How many images ``split`` of ``domains`` holds (counted, nothing read)."""
    return sum(data.count(d, c, split) for d in domains for c in range(len(data.classes)))


def scored_splits(cfg: "EvalConfig") -> tuple[str, ...]:
    """The splits a target domain is scored on (the sources: always their test split)."""
    return ("train", "test") if cfg.target_split == "all" else ("test",)


def target_label(targets: Sequence[str]) -> str:
    """The name of a run's target(s): the domain, or ``a+b+c`` for several OOD targets."""
    return "+".join(targets)


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, data, source_domains: Sequence[str],
                       target_domain: str | Sequence[str], cfg: EvalConfig | None = None, device="cpu",
                       seed: int = 0, nets: Sequence[int] | None = None) -> dict:
    """Train ``cfg.num_eval`` fresh networks of each architecture of ``cfg.arch`` on
    ``(images, labels)`` once, and test each on every target domain and on the pooled test
    split of the source domains. The test images are streamed (:func:`iter_batches`), read once
    for all networks.

    ``target_domain``: one domain (leave-one-domain-out) or several (ImageNet-Sketch, -R, -A,
    -V2 for an ImageNet subset). A class of the subset that a target lacks
    (``data.missing_classes[target]``) has no images there, so it is left out of that target's
    score; following the ImageNet-R / ImageNet-A protocol, the networks' predictions on such a
    target are restricted to the classes it has (the logits of the missing classes are
    ignored), and the unrestricted accuracy is recorded beside it.

    Returns, for the first architecture listed: ``ood_acc`` (one per net: the target's accuracy,
    or with several targets the mean over the targets, each weighted equally), ``in_domain_acc``
    (pooled source test split), their ``*_mean``/``*_std`` (sample std over nets),
    ``targets`` ``{target: {"ood_acc", "ood_acc_mean", "ood_acc_std", "unrestricted_acc_mean",
    "missing_classes", "test_images"}}``, ``per_domain`` (mean accuracy per domain) and
    ``train_loss`` (final loss per net); ``per_arch``: the same numbers for every architecture;
    ``target_domain`` (:func:`target_label`) and ``target_domains``. Accuracies are fractions in [0, 1].

    ``nets``: which of the ``cfg.num_eval`` networks to train (default: all). Network ``k`` is
    seeded the same whichever others are trained, so processes that score disjoint blocks of
    networks (:func:`score_networks`) merge into the whole evaluation (:func:`merge_scores`).
    """
    return evaluation_metrics(score_networks(images, labels, data, source_domains, target_domain, cfg, device,
                                             seed, nets))


def score_networks(images: torch.Tensor, labels: torch.Tensor, data, source_domains: Sequence[str],
                   target_domain: str | Sequence[str], cfg: EvalConfig | None = None, device="cpu",
                   seed: int = 0, nets: Sequence[int] | None = None) -> dict:
    """What :func:`evaluate_synthetic` measures, raw: per architecture and domain the counts of
    each network (``[correct, unrestricted correct, images]``), its final training loss, and the
    seconds; :func:`evaluation_metrics` turns them into the metrics."""
    cfg = cfg or EvalConfig()
    nets_to_train = list(range(cfg.num_eval) if nets is None else nets)
    if any(not 0 <= k < cfg.num_eval for k in nets_to_train):
        raise ValueError(f"nets must index the {cfg.num_eval} evaluation networks, got {nets_to_train}")
    source_domains = list(source_domains)
    targets = [target_domain] if isinstance(target_domain, str) else list(target_domain)
    if not targets:
        raise ValueError("no target domain to evaluate on")
    for d in [*source_domains, *targets]:
        if d not in data.domains:
            raise ValueError(f"unknown domain {d!r}; the dataset has {list(data.domains)}")
    for t in targets:
        if t in source_domains:
            raise ValueError(f"the target domain {t!r} is also a source domain: that is not an OOD test")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need a non-empty training set with one label per image, got {len(images)} "
                         f"images and {len(labels)} labels")
    target_splits = scored_splits(cfg)
    for t in targets:
        if sum(split_size(data, [t], s) for s in target_splits) == 0:
            raise ValueError(f"the target domain {t!r} has no {'' if cfg.target_split == 'all' else 'test '}images")
    t0 = time.perf_counter()
    K = len(data.classes)
    missing = {t: list((getattr(data, "missing_classes", None) or {}).get(t, [])) for t in targets}
    index = {name: i for i, name in enumerate(data.classes)}
    allowed = {}  # target -> bool [K]: the classes a prediction may take (None: all)
    for t in targets:
        unknown = [c for c in missing[t] if c not in index]
        if unknown:
            raise ValueError(f"missing_classes[{t!r}] names classes outside the dataset: {unknown[:5]}")
        if missing[t]:
            keep = torch.ones(K, dtype=torch.bool)
            keep[[index[c] for c in missing[t]]] = False
            allowed[t] = keep
    per_cfg = cfg.per_arch()
    nets, losses, seconds = {}, {}, {}
    for name, arch_cfg in per_cfg.items():
        t_arch = time.perf_counter()
        trained = [train_classifier(images, labels, K, arch_cfg, device, seed=_seed_for(seed, k + 1))
                   for k in nets_to_train]
        nets[name], losses[name] = [n for n, _ in trained], [loss for _, loss in trained]
        seconds[name] = time.perf_counter() - t_arch
    t_test = time.perf_counter()
    splits = {**{t: target_splits for t in targets}, **{d: ("test",) for d in source_domains}}
    counts = _score(nets, data, splits, allowed, device, cfg.test_batch)
    test_share = (time.perf_counter() - t_test) / len(per_cfg)
    return {"targets": targets, "source_domains": source_domains, "missing": missing, "config": cfg.to_dict(),
            "widths": {name: c.width for name, c in per_cfg.items()}, "counts": counts, "train_loss": losses,
            "arch_seconds": {name: seconds[name] + test_share for name in per_cfg},
            "seconds": time.perf_counter() - t0}


def merge_scores(blocks: Sequence[dict]) -> dict:
    """The scores of all networks from the scores of consecutive blocks of them (in network
    order, as processes share them): the per-network counts and losses are concatenated, the
    times are the longest block's."""
    first = blocks[0]
    return {**first,
            "counts": {a: {d: [row for b in blocks for row in b["counts"][a][d]] for d in first["counts"][a]}
                       for a in first["counts"]},
            "train_loss": {a: [x for b in blocks for x in b["train_loss"][a]] for a in first["train_loss"]},
            "arch_seconds": {a: max(b["arch_seconds"][a] for b in blocks) for a in first["arch_seconds"]},
            "seconds": max(b["seconds"] for b in blocks)}


def evaluation_metrics(scores: dict) -> dict:
    """The metrics of :func:`evaluate_synthetic` from the networks' scores."""
    targets, sources = scores["targets"], scores["source_domains"]
    per_arch = {name: _arch_metrics(scores["counts"][name], scores["train_loss"][name], targets, sources,
                                    scores["missing"], scores["widths"][name], scores["arch_seconds"][name])
                for name in scores["counts"]}
    first = next(iter(per_arch.values()))
    return {"target_domain": target_label(targets), "target_domains": targets, "source_domains": sources,
            "num_eval": len(first["train_loss"]), **{k: v for k, v in first.items() if k not in ("width", "seconds")},
            "per_arch": per_arch, "seconds": scores["seconds"], "config": scores["config"]}


@torch.no_grad()
def _score(nets: dict[str, list], data, splits: dict[str, Sequence[str]], allowed: dict, device, batch: int) -> dict:
    """``{arch: {domain: [(correct, unrestricted_correct, total) per net]}}`` over the splits
    ``splits[domain]`` of each domain, every batch read once and scored by every network."""
    device = torch.device(device)
    for group in nets.values():
        for net in group:
            net.eval()
    counts = {name: {d: [[0, 0, 0] for _ in group] for d in splits} for name, group in nets.items()}
    for d, domain_splits in splits.items():
        keep = allowed.get(d)
        batches = (b for split in domain_splits if split_size(data, [d], split)
                   for b in iter_batches(data, [d], split, batch))
        for x, y in batches:
            x = x.to(device, torch.float32)
            for name, group in nets.items():
                for k, net in enumerate(group):
                    logits = net(x).float().cpu()
                    free = int((logits.argmax(1) == y).sum())
                    hit = int((logits.masked_fill(~keep, float("-inf")).argmax(1) == y).sum()) if keep is not None \
                        else free
                    row = counts[name][d][k]
                    row[0], row[1], row[2] = row[0] + hit, row[1] + free, row[2] + len(y)
    for group in nets.values():
        for net in group:
            net.train()
    return counts


def _arch_metrics(counts: dict, losses: list[float], targets: Sequence[str], source_domains: Sequence[str],
                  missing: dict, width: int, seconds: float) -> dict:
    n_nets = len(losses)
    acc = {d: [hit / max(1, total) for hit, _, total in rows] for d, rows in counts.items()}
    per_target = {}
    for t in targets:
        (m, sd), (free, _) = mean_sd(acc[t]), mean_sd([f / max(1, n) for _, f, n in counts[t]])
        per_target[t] = {"ood_acc": acc[t], "ood_acc_mean": m, "ood_acc_std": sd, "unrestricted_acc_mean": free,
                         "missing_classes": missing[t], "test_images": counts[t][0][2]}
    ood = [sum(acc[t][k] for t in targets) / len(targets) for k in range(n_nets)]
    ind = []
    for k in range(n_nets):
        n_src = sum(counts[d][k][2] for d in source_domains)
        ind.append(sum(counts[d][k][0] for d in source_domains) / n_src if n_src else float("nan"))
    (om, osd), (im, isd) = mean_sd(ood), mean_sd(ind)
    return {"width": width, "ood_acc_mean": om, "ood_acc_std": osd, "ood_acc": ood,
            "in_domain_acc_mean": im, "in_domain_acc_std": isd, "in_domain_acc": ind, "targets": per_target,
            "per_domain": {d: mean_sd(v)[0] for d, v in acc.items()},
            "train_loss": losses, "seconds": seconds}


# Options added since metrics were first saved, at the values those evaluations used.
ADDED_EVAL_OPTIONS = {"target_split": "test", "mixstyle": 0.0, "mixstyle_alpha": 0.1, "amp_mix": 0.0,
                      "whole_epochs": 30}


def same_eval_config(saved: dict | None, cfg: EvalConfig) -> bool:
    """Whether a saved evaluation config (e.g. a ``metrics.json``'s ``config``, possibly written
    before some option existed: missing options take the values those runs used) equals ``cfg``."""
    try:
        return saved is not None and EvalConfig.from_dict({**ADDED_EVAL_OPTIONS, **saved}) == cfg
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


def whole_sources(data, source_domains: Sequence[str]):
    """Every training image of the source domains: ``(images [M, C, H, W], labels [M])``."""
    return data.split_tensors(list(source_domains), "train")

