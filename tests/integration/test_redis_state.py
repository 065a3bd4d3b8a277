"""The Redis state store against the real Redis: namespacing, expiry, tenancy, lanes, cursors, usage."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from services.common.messages import AudioIn, Tensor
from services.common.redis_state import LANE_TTL_S, SessionRecord, StateStore

pytestmark = pytest.mark.integration


@pytest.fixture()
def store(redis_url):
    return StateStore(redis.Redis.from_url(redis_url), namespace=f"t{uuid.uuid4().hex[:6]}", session_ttl_s=600)


def test_sessions_are_namespaced_expire_and_stay_inside_their_tenant(store):
    store.put_session(SessionRecord("s1", "acme", options={"seed": 1}))
    store.put_session(SessionRecord("s2", "globex"))
    assert store.get_session("s1", tenant="acme").options == {"seed": 1}
    assert store.get_session("s1", tenant="globex") is None
    assert [r.session_id for r in store.list_sessions("acme")] == ["s1"]
    keys = [k.decode() for k in store.r.keys(f"{store.ns}:*")]
    assert keys and all(k.startswith(f"{store.ns}:") for k in keys)
    assert all(0 < store.r.ttl(k) <= 600 for k in keys)
    store.delete_session("s1")
    assert store.get_session("s1") is None and store.list_sessions("acme") == []


def test_sink_and_anchor_round_trip(store):
    h = AudioIn(session_id="s1", tenant_id="acme", seq=0, kind="start", options={"seed": 9})
    t = {"ref": Tensor("float32", (2,), b"\x00" * 8)}
    store.put_sink("s1", t, h)
    msg = store.get_sink("s1")
    assert msg.tensors == t and msg.header.options == {"seed": 9}
    store.put_anchor("s1", Tensor("uint8", (3,), b"abc"), h)
    assert store.get_anchor("s1") == Tensor("uint8", (3,), b"abc")


def test_cursor_only_moves_forward(store):
    assert store.advance_cursor("s1", "lane_block", 3)
    assert not store.advance_cursor("s1", "lane_block", 2)
    assert not store.advance_cursor("s1", "lane_block", 3)
    assert store.cursor_int("s1", "lane_block") == 3
    assert store.cursor_int("s9", "lane_block") == -1


def test_lane_claims_are_atomic_and_pool_scoped(store):
    for i in range(3):
        store.register_lane(f"lane-{i}", i, pool="a" if i < 2 else "b")
    got, lock = [], threading.Lock()

    def claim(n):
        lane = store.claim_lane(f"s{n}", pool="a")
        with lock:
            got.append(lane)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(x for x in got if x) == ["lane-0", "lane-1"] and got.count(None) == 4
    assert store.claim_lane("sb", pool="b") == "lane-2"
    owner = store.get_lane("lane-0")["session"]
    store.release_lane("lane-0", "not-the-owner")
    assert store.get_lane("lane-0")["status"] == "serving"
    store.release_lane("lane-0", owner)
    assert store.get_lane("lane-0")["status"] == "idle"
    assert 0 < store.r.ttl(store.k("lane", "lane-0")) <= LANE_TTL_S
    store.set_lane_drain("lane-0", True)                       # draining: never claimed again
    assert store.claim_lane("sx", pool="a") is None
    store.set_lane_drain("lane-0", False)
    assert store.claim_lane("sx", pool="a") == "lane-0"
    store.r.delete(store.k("lane", "lane-1"))                  # a lane whose heartbeat expired
    assert "lane-1" not in store.list_lanes()


def test_usage_counters(store):
    store.add_usage("acme", 0.48, day="20261125")
    store.add_usage("acme", 0.48, day="20261125")
    assert store.get_usage("acme", day="20261125") == pytest.approx(0.96)
    assert store.get_usage("globex", day="20261125") == 0.0
