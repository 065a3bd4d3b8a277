"""Lane controller: the pure parts (desired lane count, pool parsing, settings, namespace resolution).

The scaling behaviour against a Kubernetes API emulator and a real Redis is in
tests/integration/test_lane_controller.py.
"""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from services.lane_controller.controller import (
    LanePool,
    PoolConfigError,
    desired_lanes,
    lane_id,
    pool_ceiling,
    resolve_namespace,
)
from services.lane_controller.settings import LaneControllerSettings

pytestmark = pytest.mark.unit


def _reference_desired(demand: int, lo: int, hi: int, headroom: int, quota: int | None) -> int:
    """Brute force: among the allowed lane counts, the smallest that covers demand + headroom, else the largest."""
    allowed = [n for n in range(lo, hi + 1) if quota is None or n <= quota or n == lo]
    covering = [n for n in allowed if n >= demand + headroom]
    return min(covering) if covering else max(allowed)


def test_desired_lanes_matches_a_brute_force_search():
    for lo, hi, demand, headroom, quota in itertools.product(range(0, 4), range(0, 6), range(0, 9), range(0, 3),
                                                             (None, 0, 1, 2, 4, 7)):
        if hi < lo:
            continue
        want = _reference_desired(demand, lo, hi, headroom, quota)
        assert desired_lanes(demand, lo, hi, headroom, quota) == want, (lo, hi, demand, headroom, quota)
        assert lo <= want <= hi


def test_bad_bounds_and_inputs_raise_value_errors():
    with pytest.raises(PoolConfigError, match="min <= max"):
        pool_ceiling(3, 2)
    with pytest.raises(PoolConfigError, match="min <= max"):
        pool_ceiling(-1, 2)
    with pytest.raises(PoolConfigError, match="quota"):
        pool_ceiling(1, 2, quota=-1)
    with pytest.raises(ValueError, match="demand"):
        desired_lanes(-1, 1, 2)
    assert issubclass(PoolConfigError, ValueError)


def _lws(**over) -> dict:
    obj = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": {"name": "la-lane-acme", "namespace": "ns", "uid": "u-1", "resourceVersion": "42",
                     "labels": {"liveavatar.io/lane-pool": "acme", "liveavatar.io/tenant": "acme-t"},
                     "annotations": {"liveavatar.io/lane-pool-min": "2", "liveavatar.io/lane-pool-max": "5"}},
        "spec": {"replicas": 3},
    }
    for path, value in over.items():
        node = obj
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return obj


def test_lane_pool_is_parsed_from_its_leaderworkerset():
    pool = LanePool.from_object(_lws())
    assert (pool.lws, pool.namespace, pool.pool, pool.tenant) == ("la-lane-acme", "ns", "acme", "acme-t")
    assert (pool.min_lanes, pool.max_lanes, pool.replicas, pool.uid, pool.resource_version) == (2, 5, 3, "u-1", "42")
    assert [pool.lane_id(i) for i in range(3)] == ["la-lane-acme-0", "la-lane-acme-1", "la-lane-acme-2"]
    assert lane_id("x-lane-p", 11) == "x-lane-p-11"
    # LWS defaults spec.replicas to 1
    assert LanePool.from_object(_lws(spec__replicas=None)).replicas == 1


@pytest.mark.parametrize("override,message", [
    ({"metadata__labels": {"liveavatar.io/tenant": "t"}}, "label liveavatar.io/lane-pool is missing"),
    ({"metadata__labels": {"liveavatar.io/lane-pool": "p"}}, "label liveavatar.io/tenant is missing"),
    ({"metadata__annotations": {"liveavatar.io/lane-pool-min": "1"}}, "annotation liveavatar.io/lane-pool-max"),
    ({"metadata__annotations": {"liveavatar.io/lane-pool-min": "one", "liveavatar.io/lane-pool-max": "2"}},
     "must be an integer"),
    ({"metadata__annotations": {"liveavatar.io/lane-pool-min": "4", "liveavatar.io/lane-pool-max": "2"}},
     "min <= max"),
    ({"spec__replicas": -1}, "spec.replicas must be >= 0"),
    ({"spec__replicas": "many"}, "spec.replicas must be an integer"),
])
def test_invalid_leaderworkersets_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(PoolConfigError, match=message):
        LanePool.from_object(_lws(**override))


def test_chart_rendered_leaderworkersets_are_valid_pools():
    """The chart's LWS objects carry exactly the labels and annotations the controller reads."""
    from tests.unit.chart import chartlib as cl

    cl.helm()
    values = cl.merged_values("two-tenants")
    docs = cl.of_kind(cl.render_scenario("two-tenants"), "LeaderWorkerSet")
    pools = {p.pool: p for p in map(LanePool.from_object, docs)}
    assert set(pools) == {p["name"] for p in values["lanePools"]}
    for p in values["lanePools"]:
        got = pools[p["name"]]
        assert (got.tenant, got.min_lanes, got.max_lanes, got.replicas) == (p["tenant"], p["min"], p["max"], p["min"])


def test_settings_come_from_the_environment_and_are_validated(monkeypatch):
    monkeypatch.setenv("LIVEAVATAR_NAMESPACE", "lanes")
    monkeypatch.setenv("LIVEAVATAR_INTERVAL_S", "2.5")
    monkeypatch.setenv("LIVEAVATAR_SCALE_DOWN_IDLE_S", "60")
    monkeypatch.setenv("LIVEAVATAR_HEADROOM", "1")
    monkeypatch.setenv("LIVEAVATAR_REDIS_URL", "redis://:hunter2@r:6379/0")
    s = LaneControllerSettings()
    assert (s.namespace, s.interval_s, s.scale_down_idle_s, s.headroom) == ("lanes", 2.5, 60.0, 1)
    assert "hunter2" not in str(s.log_safe())
    for bad in ({"interval_s": 0}, {"scale_down_idle_s": -1}, {"headroom": -1}, {"label_selector": ""}):
        with pytest.raises(ValidationError):
            LaneControllerSettings(**bad)
    assert issubclass(ValidationError, ValueError)


def test_namespace_is_configured_else_the_pods_else_default(tmp_path, monkeypatch):
    import services.lane_controller.controller as ctl

    monkeypatch.setattr(ctl, "SA_NAMESPACE_FILE", tmp_path / "absent")
    assert resolve_namespace("") == "default"
    sa = tmp_path / "namespace"
    sa.write_text("liveavatar\n")
    monkeypatch.setattr(ctl, "SA_NAMESPACE_FILE", sa)
    assert resolve_namespace("") == "liveavatar"
    assert resolve_namespace("other") == "other"
