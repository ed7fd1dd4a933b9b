"""Test inputs for the operator, built away from the hard mask's decision boundaries: see
``sgs_cuda.reference.separated_grads`` (in the package, because the CUDA self-check uses them too)."""
from sgs_cuda.reference import separated_grads  # noqa: F401
