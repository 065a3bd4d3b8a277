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


@pytest.fixture(scope="session")
def shared_examples():
    """The real example inputs in ../shared/examples (reference images and 24 kHz speech)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1].parent / "shared" / "examples"
    if not path.is_dir():
        pytest.fail(f"the shared examples are missing: {path}")
    return path
