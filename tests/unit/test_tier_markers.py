"""Every collected test carries a tier marker; the collection hook in tests/conftest.py refuses one without."""

from __future__ import annotations

import pytest

from tests.conftest import TIERS, untiered

pytestmark = pytest.mark.unit


class _Item:
    def __init__(self, nodeid: str, markers: set[str]):
        self.nodeid, self.markers = nodeid, markers

    def get_closest_marker(self, name: str):
        return object() if name in self.markers else None


def test_an_untiered_test_is_reported_and_tiered_ones_are_not():
    items = [_Item("a::unit", {"unit"}), _Item("b::slow_only", {"slow"}), _Item("c::gpu", {"gpu"}),
             _Item("d::nothing", set())]
    assert untiered(items) == ["b::slow_only", "d::nothing"]


def test_the_tiers_are_the_declared_markers(pytestconfig):
    declared = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert set(TIERS) <= declared


def test_this_session_collected_only_tiered_tests(request):
    assert untiered(request.session.items) == []
