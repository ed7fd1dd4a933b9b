"""Multi-domain data sources behind one protocol (:class:`MultiDomainDataset`).

- :class:`ImageFolderDomains` / :data:`PRESETS`: DomainBed-style ``root/<domain>/<class>/<image>``
  trees (PACS, VLCS, Office-Home, DomainNet, TerraIncognita), decoded once into the cache.
- :class:`Digits`: MNIST, MNIST-M, SVHN, SYN, USPS from their native files (or Dassl's Digits-DG).
- :class:`CORe50`: CORe50's 11 sessions as domains, 10 categories (or 50 objects) as classes.
- :class:`ImageNetSubset`: ImageNet class subsets (ImageNette ... ImageNet-100, any wnid list) with
  ImageNet-Sketch / -R / -A / -V2 as out-of-distribution targets.
- :class:`DecodeCache`: every folder source decodes its files once, in parallel, into a uint8
  memory-mapped cache; batches are read from it.
- :class:`FashionMNISTStyles`: the embedded benchmark, Fashion-MNIST in four style domains.
- :class:`PseudoDomainDataset`: domains found by clustering low-frequency spectra (no labels needed).
- :func:`sample_domain_batches`: equal-size, per-domain real batches ``[D, n, C, H, W]`` for DM.
- :func:`load_dataset`: any of the above by name (:data:`DATASETS`, the registry) or path.
- :class:`DataSource`: the base class of the sources (defaults, ``real_batch``).
"""
from .base import DataSource, MultiDomainDataset, denormalize
from .core50 import CORe50
from .decode_cache import DecodeCache, decode_image
from .digits import Digits
from .fmnist_styles import FashionMNISTStyles
from .folder import ImageFolderDomains
from .grid import save_sample_grid
from .imagenet import ImageNetSubset, imagenet1k_wnids, read_wnid_list, subset_wnids
from .memory import InMemoryDomains
from .presets import PRESETS, Preset, get_preset, load_dataset
from .registry import DATASETS, register
from .pseudo_domains import PseudoDomainDataset, assign_pseudo_domains
from .sampling import sample_class_balanced, sample_domain_batches

__all__ = [
    "MultiDomainDataset", "denormalize", "ImageFolderDomains", "FashionMNISTStyles", "InMemoryDomains",
    "load_dataset", "PRESETS", "Preset", "get_preset", "sample_domain_batches", "sample_class_balanced",
    "assign_pseudo_domains", "PseudoDomainDataset", "save_sample_grid", "ImageNetSubset", "imagenet1k_wnids",
    "read_wnid_list", "subset_wnids", "DecodeCache", "decode_image", "DataSource", "Digits", "CORe50", "DATASETS",
    "register",
]
