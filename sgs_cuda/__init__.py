"""sgs_cuda: Spectral Gradient Surgery for Domain-Generalizable Dataset Distillation.

The operator layer (``spectral_gradient_surgery``, ``SGSConfig``, ``SpectralGradientSurgery``)
knows nothing of datasets or models; ``sgs_cuda.data``, ``sgs_cuda.dm``, ``sgs_cuda.evaluate``
and ``sgs_cuda.cli`` build the distillation pipeline on top of it.
"""
from ._build import backend_info
from .ops import SGSParts, spatial_gradient_surgery, spectral_gradient_surgery
from .options import NORMALIZE_MODES, SGSConfig
from .reference import sgs_reference
from .surgery import SpectralGradientSurgery, domain_gradients

__all__ = ["spectral_gradient_surgery", "spatial_gradient_surgery", "SGSParts", "SGSConfig",
           "SpectralGradientSurgery", "domain_gradients", "sgs_reference", "backend_info",
           "NORMALIZE_MODES"]
__version__ = "0.1.0"
