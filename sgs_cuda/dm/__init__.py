"""Distribution Matching with Spectral Gradient Surgery: the ConvNet, DSA and the loop."""
from .distill import METHODS, DistillConfig, DistillResult, distill, initial_images
from .dsa import DEFAULT_STRATEGY, DSAParams, augment, augment_pair
from .networks import ConvNet, build_convnet

__all__ = ["ConvNet", "build_convnet", "DSAParams", "augment", "augment_pair", "DEFAULT_STRATEGY",
           "DistillConfig", "DistillResult", "distill", "initial_images", "METHODS"]
