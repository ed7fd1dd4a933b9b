"""Named multi-domain datasets and :func:`load_dataset`, the single entry point by name or path.

A preset fixes the domain order (so ``leave-one-domain-out`` indices mean the same thing in every
run), the class order where the benchmark defines one, and the resolution the distillation uses.
Folder names are matched ignoring case, spaces, ``_`` and ``-``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FMNIST_STYLES_NAMES = ("fmnist-styles", "fmniststyles", "fashion-mnist-styles", "fashionmniststyles")
FMNIST_CUES_NAMES = ("fmnist-cues", "fashion-mnist-cues")


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


def _imagenet_classes(name: str):
    """The class subset named by ``name`` when it is an ImageNet dataset name, else None."""
    from .imagenet import SUBSET_NAMES

    if name.lower().startswith("imagenet:"):
        return name.split(":", 1)[1]
    if _key(name) in {_key(n) for n in SUBSET_NAMES}:
        return name
    return None


def load_dataset(name_or_path, root=None, pseudo_domains: int | None = None, **kw):
    """Return a data source implementing :class:`~sgs_cuda.data.base.MultiDomainDataset`.

    - ``"fmnist-cues"``: the premise benchmark, the styles with a planted class-correlated cue
      (:class:`~sgs_cuda.data.fmnist_cues.FashionMNISTCues`; ``cue``, ``cue_strength``, ``cue_free``).
    - ``"fmnist-styles"``: the embedded benchmark (``root`` = where the Fashion-MNIST IDX files
      are, optional); ``kw`` go to :class:`~sgs_cuda.data.fmnist_styles.FashionMNISTStyles`.
    - an ImageNet subset: ``"imagenette"``, ``"imagewoof"``, ``"imagefruit"``, ``"imagemeow"``,
      ``"imagesquawk"``, ``"imageyellow"``, ``"imagenet-100"``, or ``"imagenet:<list file>"``,
      with ``root`` = the ImageNet folder (``train/``, ``val/``); ``kw`` go to
      :class:`~sgs_cuda.data.imagenet.ImageNetSubset` (``sketch_root``, ``r_root``, ``a_root``,
      ``v2_root``, ``resolution`` ...).
    - a preset name (``"PACS"``, ``"vlcs"``, ``"office-home"`` ...) with ``root`` = its folder.
    - a path to a ``root/<domain>/<class>/<image>`` tree.

    ``kw`` go to :class:`~sgs_cuda.data.folder.ImageFolderDomains` for folders. With
    ``pseudo_domains=k`` the result's training domains are pooled and re-split into ``k``
    pseudo-domains.
    """
    from .fmnist_styles import FashionMNISTStyles
    from .folder import ImageFolderDomains

    name = str(name_or_path)
    imagenet_classes = _imagenet_classes(name)
    if _key(name) in {_key(n) for n in FMNIST_STYLES_NAMES}:
        data = FashionMNISTStyles(root=root, **kw)
    elif _key(name) in {_key(n) for n in FMNIST_CUES_NAMES}:
        from .fmnist_cues import FashionMNISTCues
        data = FashionMNISTCues(root=root, **kw)
    elif imagenet_classes is not None:
        from .imagenet import ImageNetSubset
        if root is None:
            raise ValueError(f"dataset {name!r} needs root=<the ImageNet folder holding train/ and val/> "
                             f"(--data-root on the command line)")
        if "classes" in kw:
            raise ValueError(f"dataset {name!r} already names its classes; drop classes=")
        data = ImageNetSubset(root, classes=imagenet_classes, **kw)
    elif any(_key(p.name) == _key(name) for p in PRESETS.values()):
        preset = get_preset(name)
        if root is None:
            raise ValueError(f"dataset {preset.name!r} needs root=<folder holding {preset.name}'s domain folders> "
                             f"(--data-root on the command line)")
        data = ImageFolderDomains(root, preset=preset, **kw)
    elif Path(name).expanduser().exists():
        if root is not None:
            raise ValueError(f"give either a path ({name!r}) or root=, not both")
        data = ImageFolderDomains(name, **kw)
    else:
        from .imagenet import SUBSET_NAMES
        raise FileNotFoundError(f"{name!r} is neither a known dataset ({sorted(PRESETS)}, 'fmnist-styles', "
                                f"{list(SUBSET_NAMES)}, 'imagenet:<list file>') nor an existing path")
    if pseudo_domains is not None:
        from .pseudo_domains import PseudoDomainDataset
        data = PseudoDomainDataset(data, pseudo_domains, seed=kw.get("seed", 0),
                                   domains=getattr(data, "train_domains", None))
    return data
