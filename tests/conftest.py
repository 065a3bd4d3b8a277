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
def examples():
    """The example inputs bundled in the repository's examples/ folder (reference photos, 24 kHz speech,
    and the held-out synthetic faces in examples/faces/)."""
    from services.common.examples import examples_dir

    path = examples_dir()
    if not path.is_dir():
        pytest.fail(f"the examples folder is missing: {path}")
    return path


#: The tiers of pytest.ini; every test belongs to at least one, set once per module with ``pytestmark``.
TIERS = ("unit", "integration", "e2e", "gpu")


def untiered(items) -> list[str]:
    """The node ids of collected tests that carry no tier marker."""
    return [item.nodeid for item in items if not any(item.get_closest_marker(t) for t in TIERS)]


def pytest_collection_modifyitems(config, items):
    """A test without a tier marker would silently drop out of every tiered run (``-m unit``): refuse it."""
    missing = untiered(items)
    if missing:
        raise pytest.UsageError("tests without a tier marker (add `pytestmark = pytest.mark.<tier>` to the "
                                f"module; tiers: {', '.join(TIERS)}):\n  " + "\n  ".join(missing[:20]))
