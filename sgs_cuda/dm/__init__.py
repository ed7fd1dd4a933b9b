"""Distribution Matching with Spectral Gradient Surgery: the ConvNet, DSA and the loop
(:mod:`sgs_cuda.dm.loop`; ``sgs_cuda.dm.distill`` is its function).

>>> from sgs_cuda.dm import DistillConfig, distill
>>> result = distill(data, ["cartoon", "sketch", "painting"], DistillConfig(method="dm_sgs", iterations=500))
>>> result.images, result.labels, result.history["mask_fraction"]
"""
from .loop import (METHODS, DistillConfig, DistillResult, RandomStreams, class_domains, distill,
                   draw_class_batches, matching_losses)
from .dsa import DEFAULT_STRATEGY, DSAParams, augment, augment_pair
from .matching import MATCHINGS
from .networks import ConvNet, build_convnet

__all__ = ["ConvNet", "build_convnet", "DSAParams", "augment", "augment_pair", "DEFAULT_STRATEGY",
           "DistillConfig", "DistillResult", "distill", "matching_losses",
           "draw_class_batches", "class_domains", "RandomStreams", "METHODS", "MATCHINGS"]
