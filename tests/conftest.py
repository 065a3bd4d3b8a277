"""Shared pytest configuration: deterministic, small torch on CPU."""

import pytest

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency
    torch = None


@pytest.fixture(autouse=True)
def _torch_determinism():
    """Every test starts from the same RNG state and a fixed thread count."""
    if torch is not None:
        torch.manual_seed(0)
        torch.set_num_threads(1)
    yield
