"""Every dataset the pipeline knows by name, in one table (DomainBed's ``DATASETS`` is the model).

:func:`~sgs_cuda.data.presets.load_dataset`, the pipeline (:mod:`sgs_cuda.experiment`: which
options a dataset takes, whether it needs ``--data-root``) and the CLI's ``--dataset`` help all
read :data:`DATASETS`. Adding a dataset is one module with its source class and one
:func:`register` line at the end of this file. Names are matched ignoring case and punctuation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


def key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


@dataclass(frozen=True)
class Dataset:
    """One registered dataset.

    name: its canonical name (``aliases`` are other accepted spellings).
    cls: the source class; built as ``cls(root=root, **fixed, **options)``, and its ``__init__``
        keywords are the dataset's options (``--data-option``).
    root: what ``--data-root`` must be (said in errors), or None when the dataset finds its files
        itself (``root`` is then optional).
    kind: a short tag (``"folder"``, ``"imagenet"`` ...) and ``about`` the phrase errors use.
    fixed: keywords the name itself sets (a folder layout, a class subset): not user options.
    argument: the keyword a ``"name:<value>"`` passes ``<value>`` as (``"name"`` alone is then unknown).
    listed: shown in the ``--dataset`` help.
    """
    name: str
    cls: type
    root: str | None
    kind: str
    about: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    argument: str | None = None
    listed: bool = True

    def build(self, root=None, argument: str | None = None, **options):
        fixed = dict(self.fixed)
        if argument is not None:
            fixed[self.argument] = argument
        for k in fixed:
            if k in options:
                raise ValueError(f"dataset {self.name!r} already names its {k}; drop {k}=")
        if self.root is not None and root is None:
            raise ValueError(f"dataset {self.name!r} needs root=<{self.root}> (--data-root on the command line)")
        return self.cls(root=root, **fixed, **options)


DATASETS: dict[str, Dataset] = {}


def register(name: str, cls: type, root: str | None, kind: str, about: str, **more) -> Dataset:
    entry = Dataset(name, cls, root, kind, about, **more)
    for k in dict.fromkeys(key(n) for n in (name, *entry.aliases)):
        if k in DATASETS:
            raise ValueError(f"dataset name {name!r} clashes with {DATASETS[k].name!r}")
        DATASETS[k] = entry
    return entry


def find(name) -> tuple[Dataset, str | None] | None:
    """``(entry, argument)`` for a registered name (``"imagenet:<file>"`` gives the argument), else None."""
    name = str(name)
    entry = DATASETS.get(key(name))
    if entry is not None and entry.argument is None:  # "imagenet" alone names no class subset
        return entry, None
    head, sep, tail = name.partition(":")
    entry = DATASETS.get(key(head)) if sep else None
    if entry is not None and entry.argument is not None:
        return entry, tail
    return None


def names() -> list[str]:
    """The canonical names, in registration order (each once)."""
    seen: dict[str, None] = {}
    for entry in DATASETS.values():
        if entry.listed:
            seen.setdefault(f"{entry.name}:<{entry.argument}>" if entry.argument else entry.name)
    return list(seen)


# -- the table -------------------------------------------------------------------------------
def _register_all() -> None:
    from .core50 import CORe50
    from .digits import Digits
    from .fmnist_cues import FashionMNISTCues
    from .fmnist_styles import FashionMNISTStyles
    from .folder import ImageFolderDomains
    from .imagenet import SUBSET_NAMES, ImageNetSubset
    from .presets import FMNIST_STYLES_NAMES, PRESETS

    register("fmnist-styles", FashionMNISTStyles, None, "fmnist-styles", "the embedded benchmark",
             aliases=FMNIST_STYLES_NAMES[1:])
    register("fmnist-cues", FashionMNISTCues, None, "fmnist-styles", "the premise benchmark (planted cues)",
             aliases=("fashion-mnist-cues",))
    for p in PRESETS.values():  # DomainBed folder layouts (PACS, VLCS ...)
        register(p.name, ImageFolderDomains, f"folder holding {p.name}'s domain folders", "folder",
                 "an image-folder dataset", fixed={"preset": p})
    for n in SUBSET_NAMES:
        register(n, ImageNetSubset, "the ImageNet folder holding train/ and val/", "imagenet",
                 "an ImageNet subset", fixed={"classes": n})
    register("imagenet", ImageNetSubset, "the ImageNet folder holding train/ and val/", "imagenet",
             "an ImageNet subset", argument="classes")
    register("digits", Digits, "folder holding the digit domains (mnist/, mnist_m/, svhn/, syn/, usps/ "
             "or digits_dg/)", "digits", "the digits benchmark", aliases=("digits-dg", "digit-five"))
    register("CORe50", CORe50, "core50_128x128 folder (s1/ ... s11/)", "core50", "the CORe50 benchmark")


_register_all()
