"""The DomainBed folder layouts (:class:`Preset`, :data:`PRESETS`) and :func:`load_dataset`, the
single entry point by name (looked up in :mod:`sgs_cuda.data.registry`) or path.

A layout preset (not to be confused with the run presets of ``sgs_cuda/configs``) fixes the domain order (so ``leave-one-domain-out`` indices mean the same thing in every
run), the class order where the benchmark defines one, and the resolution the distillation uses.
Folder names are matched ignoring case, spaces, ``_`` and ``-``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FMNIST_STYLES_NAMES = ("fmnist-styles", "fmniststyles", "fashion-mnist-styles", "fashionmniststyles")


@dataclass(frozen=True)
class Preset:
    name: str
    domains: tuple[str, ...] | None  # None: every sub-folder of the root
    classes: tuple[str, ...] | None  # None: discovered from the class folders (sorted)
    resolution: int = 64  # what the distillation uses; ``native_resolution`` is the usual backbone input
    native_resolution: int = 224
    note: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("PACS", ("art_painting", "cartoon", "photo", "sketch"),
           ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
           note="images are 227x227; DGDD work distils at 64x64 (the default), pass resolution=224 for "
                "backbone-sized inputs"),
    Preset("VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), ("bird", "car", "chair", "dog", "person")),
    Preset("OfficeHome", ("Art", "Clipart", "Product", "Real_World"), None,
           note="65 classes discovered from the folders; 'Real World' folders match 'Real_World'"),
    Preset("DomainNet", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), None,
           note="345 classes discovered from the folders"),
    Preset("TerraIncognita", ("location_38", "location_43", "location_46", "location_100"), None,
           note="classes discovered from the folders (DomainBed ships 10 animal classes)"),
    Preset("imagefolder", None, None, note="any root/<domain>/<class>/<image> tree"),
]}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_preset(name: str) -> Preset:
    """Look a preset up by name, ignoring case and punctuation (``office-home`` works)."""
    for preset in PRESETS.values():
        if _key(preset.name) == _key(name):
            return preset
    raise ValueError(f"unknown dataset preset {name!r}; known: {sorted(PRESETS)} and 'fmnist-styles'")


def load_dataset(name_or_path, root=None, pseudo_domains: int | None = None, **kw):
    """Return a data source implementing :class:`~sgs_cuda.data.base.MultiDomainDataset`.

    - a registered name (:data:`sgs_cuda.data.registry.DATASETS`): ``"fmnist-styles"`` (``root``
      optional: where the Fashion-MNIST IDX files are); a DomainBed preset (``"PACS"``, ``"vlcs"``,
      ``"office-home"`` ...); an ImageNet subset (``"imagenette"`` ... ``"imagenet-100"``,
      ``"imagenet:<list file>"``, ``root`` = the folder holding ``train/`` and ``val/``);
      ``"digits"``; ``"CORe50"``. ``kw`` go to the dataset's class.
    - a path to a ``root/<domain>/<class>/<image>`` tree (:class:`~sgs_cuda.data.folder.ImageFolderDomains`).

    With ``pseudo_domains=k`` the result's training domains are pooled and re-split into ``k``
    pseudo-domains.
    """
    from .folder import ImageFolderDomains
    from .registry import find, names

    name = str(name_or_path)
    found = find(name)
    if found is not None:
        entry, argument = found
        data = entry.build(root, argument, **kw)
    elif Path(name).expanduser().exists():
        if root is not None:
            raise ValueError(f"give either a path ({name!r}) or root=, not both")
        data = ImageFolderDomains(name, **kw)
    else:
        raise FileNotFoundError(f"{name!r} is neither a known dataset ({', '.join(names())}) nor an existing path")
    if pseudo_domains is not None:
        from .pseudo_domains import PseudoDomainDataset
        data = PseudoDomainDataset(data, pseudo_domains, seed=kw.get("seed", 0),
                                   domains=getattr(data, "train_domains", None))
    return data
