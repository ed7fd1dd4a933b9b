"""Multi-domain data sources behind one protocol (:class:`MultiDomainDataset`).

- :class:`ImageFolderDomains` / :data:`PRESETS`: DomainBed-style ``root/<domain>/<class>/<image>``
  trees (PACS, VLCS, Office-Home, DomainNet, TerraIncognita), decoded once into the cache.
- :class:`ImageNetSubset`: ImageNet class subsets (ImageNette ... ImageNet-100, any wnid list) with
  ImageNet-Sketch / -R / -A / -V2 as out-of-distribution targets.
- :class:`DecodeCache`: every folder source decodes its files once, in parallel, into a uint8
  memory-mapped cache; batches are read from it.
- :class:`FashionMNISTStyles`: the embedded benchmark, Fashion-MNIST in four style domains.
- :class:`PseudoDomainDataset`: domains found by clustering low-frequency spectra (no labels needed).
- :func:`sample_domain_batches`: equal-size, per-domain real batches ``[D, n, C, H, W]`` for DM.
- :func:`load_dataset`: any of the above by name or path.
"""
from .base import MultiDomainDataset, denormalize
from .decode_cache import DecodeCache, decode_image
from .fmnist_styles import FashionMNISTStyles
from .folder import ImageFolderDomains
from .grid import save_sample_grid
from .imagenet import ImageNetSubset, imagenet1k_wnids, read_wnid_list, subset_wnids
from .memory import InMemoryDomains
from .presets import PRESETS, Preset, get_preset, load_dataset
from .pseudo_domains import PseudoDomainDataset, assign_pseudo_domains
from .sampling import sample_class_balanced, sample_domain_batches

__all__ = [
    "MultiDomainDataset", "denormalize", "ImageFolderDomains", "FashionMNISTStyles", "InMemoryDomains",
    "load_dataset", "PRESETS", "Preset", "get_preset", "sample_domain_batches", "sample_class_balanced",
    "assign_pseudo_domains", "PseudoDomainDataset", "save_sample_grid", "ImageNetSubset", "imagenet1k_wnids",
    "read_wnid_list", "subset_wnids", "DecodeCache", "decode_image",
]
