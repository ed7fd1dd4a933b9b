"""Multi-domain data sources behind one protocol (:class:`MultiDomainDataset`).

- :class:`ImageFolderDomains` / :data:`PRESETS`: DomainBed-style ``root/<domain>/<class>/<image>``
  trees (PACS, VLCS, Office-Home, DomainNet, TerraIncognita), decoded lazily.
- :class:`FashionMNISTStyles`: the embedded benchmark, Fashion-MNIST in four style domains.
- :class:`PseudoDomainDataset`: domains found by clustering low-frequency spectra (no labels needed).
- :func:`sample_domain_batches`: equal-size, per-domain real batches ``[D, n, C, H, W]`` for DM.
- :func:`load_dataset`: any of the above by name or path.
"""
from .base import MultiDomainDataset, denormalize
from .fmnist_styles import FashionMNISTStyles
from .folder import ImageFolderDomains
from .grid import save_sample_grid
from .memory import InMemoryDomains
from .presets import PRESETS, Preset, get_preset, load_dataset
from .pseudo_domains import PseudoDomainDataset, assign_pseudo_domains
from .sampling import sample_class_balanced, sample_domain_batches

__all__ = [
    "MultiDomainDataset", "denormalize", "ImageFolderDomains", "FashionMNISTStyles", "InMemoryDomains",
    "load_dataset", "PRESETS", "Preset", "get_preset", "sample_domain_batches", "sample_class_balanced",
    "assign_pseudo_domains", "PseudoDomainDataset", "save_sample_grid",
]
