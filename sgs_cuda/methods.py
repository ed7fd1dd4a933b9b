"""The methods a run compares, in one registry: what each produces and how it is evaluated.

A method is one entry of :data:`METHODS`; the CLI (``--method``), the configuration, the
:class:`~sgs_cuda.experiment.Experiment`, ``sgs-dgdd compare`` and the study scripts all read it.
Three kinds:

- ``distilled``: a DM-family distillation (:func:`sgs_cuda.dm.distill`, ``DistillConfig.method``);
- ``real``: real images chosen from the sources (random, herding, or all of them: the
  whole-source reference, the upper line of a distillation table);
- ``evaluated``: another method's set (``set_of``), evaluated differently: post-hoc domain
  generalisation in the evaluation networks (:mod:`sgs_cuda.dg`).

``eval_options`` maps the run's evaluation section to the options this method overrides. Adding
a method is one entry here (and, for a new producer, one function).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .evaluate import herding, random_real_subset, whole_sources

KINDS = ("distilled", "real", "evaluated")


# real: ``select(data, sources, seed, settings, device) -> (images, labels)``, ``settings`` being the
# set's resolved configuration (ipc; for herding its embedding network's width, depth and norm)
def _random(data, sources, seed, settings, device):
    return random_real_subset(data, sources, settings["ipc"], seed)


def _herding(data, sources, seed, settings, device):
    return herding(data, sources, settings["ipc"], seed, width=settings["width"], depth=settings["depth"],
                   norm=settings["norm"], device=device)


def _whole(data, sources, seed, settings, device):
    return whole_sources(data, sources)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how tables and plots name it
    kind: str
    help: str
    distill: str | None = None  # distilled: DistillConfig.method
    select: Callable | None = None  # real: how the images are chosen (above)
    set_of: str | None = None  # evaluated: the method whose set it evaluates
    eval_options: Callable[[Mapping], dict] = field(default=lambda ecfg: {})
    store_images: bool = True  # False: the set is rebuilt from the data when needed (the whole sources)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("random", "random real", "real", "random real images, equally from every source domain", select=_random),
    Method("herding", "herding", "real", "herding selection of real images in a random ConvNet's features",
           select=_herding),
    Method("whole", "whole sources", "real", "every training image of the source domains (the reference line; "
           "its networks train eval.whole_epochs epochs)", select=_whole,
           eval_options=lambda e: {"epochs": e["whole_epochs"]}, store_images=False),
    Method("dm", "DM", "distilled", "Distribution Matching", distill="dm"),
    Method("dm_sgs", "DM+SGS", "distilled", "DM with Spectral Gradient Surgery", distill="dm_sgs"),
    Method("dm_dam", "DM+DAM", "distilled", "DM with DAM-style domain-aware masks (per-domain views of each image "
           "matched with their domain; distill.dam_weight, dam_temperature)", distill="dm_dam"),
    Method("dm_mixstyle", "DM+MixStyle", "evaluated", "DM's set, evaluation networks trained with MixStyle "
           "(eval.mixstyle, default 0.5)", set_of="dm", eval_options=lambda e: {"mixstyle": e["mixstyle"] or 0.5}),
    Method("dm_fact", "DM+FACT", "evaluated", "DM's set, evaluation networks trained with FACT's amplitude mix "
           "(eval.amp_mix, default 1)", set_of="dm", eval_options=lambda e: {"amp_mix": e["amp_mix"] or 1.0}),
]}

ALIASES = {"both": ["dm", "dm_sgs"], "all": ["random", "herding", "dm", "dm_sgs"],
           "posthoc": ["dm", "dm_mixstyle", "dm_fact"]}
DISTILLED = tuple(n for n, m in METHODS.items() if m.kind == "distilled")
REAL = tuple(n for n, m in METHODS.items() if m.kind == "real")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)} or {list(ALIASES)}") from None


def base_method(name: str) -> str:
    """The method whose set ``name`` evaluates (itself unless it is of kind ``evaluated``)."""
    return get_method(name).set_of or name


def method_help() -> str:
    """One line per method, for the CLI's help."""
    return "; ".join(f"{n}: {m.help}" for n, m in METHODS.items()) + \
        "; aliases: " + ", ".join(f"{a} = {' '.join(v)}" for a, v in ALIASES.items())
