"""Test inputs for the operator, built away from the hard mask's decision boundaries: see
``sgs_cuda.reference.separated_grads`` (in the package, because the CUDA self-check uses them too);
and the backends and devices every op test runs on (the fixtures in conftest.py)."""
import torch

from sgs_cuda.reference import separated_grads  # noqa: F401

IMPLS = ["ext", "torch"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
