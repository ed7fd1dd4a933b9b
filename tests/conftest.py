"""Fixtures shared by the op's test files: a test that takes ``impl`` runs on both backends, one
that takes ``device`` on every device this machine has."""
import pytest
import torch
from sgs_inputs import DEVICES, IMPLS


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """The op's backend (``SGS_BACKEND``): the C++/CUDA extension or the torch reference."""
    monkeypatch.setenv("SGS_BACKEND", request.param)
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
