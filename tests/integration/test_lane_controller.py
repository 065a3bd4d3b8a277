"""Lane controller against kmock (an in-process Kubernetes API emulator) and the real Redis of the session.

kmock serves the LeaderWorkerSet and Event APIs over real HTTP from a background thread; the controller
talks to it through the official ``kubernetes`` client, exactly as in a cluster. Lanes and sessions are
put into Redis through :class:`StateStore` (register_lane / claim_lane / release_lane), as the lane and
audio-encoder services do. Time is a fake clock, so the idle period costs no wall time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

kmock = pytest.importorskip("kmock", reason="kmock is not installed: pip install kmock")

from kubernetes import client as k8s  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from infra.local.stack import free_port  # noqa: E402
from services.common.redis_state import SessionRecord, StateStore  # noqa: E402
from services.lane_controller.controller import LaneController  # noqa: E402
from services.lane_controller.settings import LaneControllerSettings  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
G, V, P = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
NS = "lanes"
IDLE_S = 1.0


class KubeEmulator:
    """kmock's KubernetesEmulator + HTTP server on its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kmock", daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> str:
        self.handler = kmock.KubernetesEmulator()
        await self.handler.__aenter__()
        self.server = kmock.Server(self.handler)
        await self.server.__aenter__()
        return str(self.server.url).rstrip("/")

    async def _stop(self) -> None:
        await self.server.__aexit__(None, None, None)
        await self.handler.__aexit__(None, None, None)

    def api(self) -> k8s.ApiClient:
        cfg = k8s.Configuration()
        cfg.host = self.url
        return k8s.ApiClient(cfg)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def kube():
    emu = KubeEmulator()
    yield emu
    emu.close()


@pytest.fixture()
def store(redis_url):
    st = StateStore.from_url(redis_url, namespace=f"lc{uuid.uuid4().hex[:8]}")
    yield st
    keys = list(st.r.scan_iter(f"{st.ns}:*"))
    if keys:
        st.r.delete(*keys)


# ---- helpers ----------------------------------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def create_pool(api: k8s.ApiClient, pool: str, tenant: str, lo: int, hi: int, replicas: int) -> str:
    """A LeaderWorkerSet shaped like the chart's (charts/liveavatar/templates/lanes/leaderworkerset.yaml)."""
    name = f"la-lane-{pool}"
    body = {"apiVersion": f"{G}/{V}", "kind": "LeaderWorkerSet",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"app.kubernetes.io/component": "lane", "liveavatar.io/lane-pool": pool,
                                    "liveavatar.io/tenant": tenant},
                         "annotations": {"liveavatar.io/lane-pool-min": str(lo),
                                         "liveavatar.io/lane-pool-max": str(hi)}},
            "spec": {"replicas": replicas, "leaderWorkerTemplate": {"size": 5}}}
    k8s.CustomObjectsApi(api).create_namespaced_custom_object(G, V, NS, P, body)
    return name


def replicas(api: k8s.ApiClient, name: str) -> int:
    return k8s.CustomObjectsApi(api).get_namespaced_custom_object(G, V, NS, P, name)["spec"]["replicas"]


def events(api: k8s.ApiClient, lws: str | None = None) -> list[tuple[str, str, str]]:
    """(reason, type, message) of the Events recorded on ``lws`` (all LWS when None)."""
    try:
        items = k8s.CoreV1Api(api).list_namespaced_event(NS).items
    except ApiException as exc:
        if exc.status == 404:  # kmock knows the resource only once one was created
            return []
        raise
    return [(e.reason, e.type, e.message) for e in items
            if e.involved_object.kind == "LeaderWorkerSet" and (lws is None or e.involved_object.name == lws)]


def reasons(api: k8s.ApiClient, lws: str) -> list[str]:
    return [r for r, _, _ in events(api, lws)]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def add_sessions(st: StateStore, tenant: str, states: list[str]) -> list[str]:
    sids = []
    for state in states:
        sid = uuid.uuid4().hex
        st.put_session(SessionRecord(session_id=sid, tenant_id=tenant, state=state))
        sids.append(sid)
    return sids


def register_lanes(st: StateStore, lws: str, pool: str, n: int) -> list[str]:
    lanes = [f"{lws}-{i}" for i in range(n)]
    for i, lane in enumerate(lanes):
        st.register_lane(lane, i, pool)
    return lanes


def draining(st: StateStore, lanes: list[str]) -> list[bool]:
    return [(st.get_lane(lane) or {}).get("drain") == "1" for lane in lanes]


def _url(st: StateStore) -> str:
    kw = st.r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def controller(kube: KubeEmulator, st: StateStore, clock: FakeClock) -> LaneController:
    """A fresh controller with its own API client and Redis connection, as after a restart."""
    s = LaneControllerSettings(namespace=NS, scale_down_idle_s=IDLE_S, redis_namespace=st.ns)
    return LaneController(s, kube.api(), StateStore.from_url(_url(st), namespace=st.ns), clock=clock)


def serving_on_last_lane(st: StateStore, lws: str, pool: str, tenant: str, n: int) -> tuple[list[str], str]:
    """n registered lanes, n sessions claimed in order, all but the last ended: one session on lane n-1."""
    lanes = register_lanes(st, lws, pool, n)
    sids = add_sessions(st, tenant, ["active"] * n)
    assert [st.claim_lane(s, pool) for s in sids] == lanes
    for s, lane in zip(sids[:-1], lanes[:-1], strict=True):
        st.update_session(s, state="ended")
        st.release_lane(lane, s)
    return lanes, sids[-1]


# ---- scale up -----------------------------------------------------------------------------------------
def test_scales_up_at_once_to_demand_within_max_and_tenant_quota(kube, store):
    api = kube.api()
    pa, pb = unique("a"), unique("b")
    lws_a = create_pool(api, pa, tenant=f"t-{pa}", lo=1, hi=3, replicas=1)
    lws_b = create_pool(api, pb, tenant=f"t-{pb}", lo=1, hi=5, replicas=1)
    states_a = ["active", "active", "waiting", "preparing", "ended", "failed", "created"]
    add_sessions(store, f"t-{pa}", states_a)
    add_sessions(store, f"t-{pb}", ["active"] * 4)
    store.r.hset(store.k("tenantcfg", f"t-{pb}"), mapping={"name": pb, "max_sessions": 8, "max_lanes": 2})
    demand_a = sum(s in ("preparing", "waiting", "active") for s in states_a)

    ctl = controller(kube, store, FakeClock())
    by_pool = {d.pool: d for d in ctl.reconcile_once()}

    assert by_pool[pa].demand == demand_a == 4
    assert (by_pool[pa].action, by_pool[pa].desired) == ("scale_up", 3)   # max 3 < demand 4
    assert (by_pool[pb].action, by_pool[pb].desired) == ("scale_up", 2)   # quota 2 < demand 4 < max 5
    assert replicas(api, lws_a) == 3 and replicas(api, lws_b) == 2
    assert reasons(api, lws_a) == ["ScaleUp"] and reasons(api, lws_b) == ["ScaleUp"]
    assert "1 -> 3" in events(api, lws_a)[0][2]
    for pool, want in ((pa, 3), (pb, 2)):
        assert metric("liveavatar_lane_pool_desired_replicas", pool=pool) == want
        assert metric("liveavatar_lane_pool_current_replicas", pool=pool) == want
        assert metric("liveavatar_lane_controller_decisions_total", pool=pool, kind="scale_up") == 1

    # more demand, same pass again: nothing above max / quota, no new patch, no new event
    add_sessions(store, f"t-{pa}", ["active"] * 5)
    again = {d.pool: d for d in controller(kube, store, FakeClock()).reconcile_once()}
    assert again[pa].action == again[pb].action == "steady"
    assert replicas(api, lws_a) == 3 and replicas(api, lws_b) == 2
    assert len(events(api)) == 2
    assert metric("liveavatar_lane_controller_decisions_total", pool=pa, kind="scale_up") == 1


# ---- scale down ---------------------------------------------------------------------------------------
def test_scale_down_drains_first_and_never_removes_a_serving_lane(kube, store):
    api = kube.api()
    pool = unique("d")
    tenant = f"t-{pool}"
    lws = create_pool(api, pool, tenant, lo=1, hi=4, replicas=3)
    lanes, s2 = serving_on_last_lane(store, lws, pool, tenant, 3)
    clock = FakeClock()
    ctl = controller(kube, store, clock)

    # demand 1 < 3 lanes: the idle period starts, nothing is drained yet
    (d,) = ctl.reconcile_once()
    assert (d.action, d.desired, d.low_since) == ("wait_idle", 1, clock.t)
    clock.t += IDLE_S / 2
    (d,) = ctl.reconcile_once()
    assert d.action == "wait_idle" and replicas(api, lws) == 3
    assert draining(store, lanes) == [False] * 3

    # idle period over: lanes 1 and 2 are drained, but lane 2 serves s2, so no scale-down
    clock.t += IDLE_S
    (d,) = ctl.reconcile_once()
    assert (d.action, d.drained, d.busy) == ("wait_drain", tuple(lanes[1:]), (lanes[2],))
    assert replicas(api, lws) == 3
    assert draining(store, lanes) == [False, True, True]
    assert reasons(api, lws) == ["Drain"]
    assert metric("liveavatar_lane_pool_draining_lanes", pool=pool) == 2
    # a drained lane takes no new session even though it is idle
    newcomer = add_sessions(store, tenant, ["preparing"])[0]
    assert store.claim_lane(newcomer, pool) == lanes[0]
    assert store.claim_lane(uuid.uuid4().hex, pool) is None
    store.update_session(newcomer, state="ended")
    store.release_lane(lanes[0], newcomer)

    clock.t += 10 * IDLE_S
    (d,) = ctl.reconcile_once()
    assert (d.action, d.drained, d.busy) == ("wait_drain", (), (lanes[2],))   # still serving: still 3
    assert replicas(api, lws) == 3 and reasons(api, lws) == ["Drain"]

    # s2 ends: lane 2 goes idle, the pool shrinks to its min
    store.update_session(s2, state="ended")
    store.release_lane(lanes[2], s2)
    (d,) = ctl.reconcile_once()
    assert (d.action, d.replicas_after) == ("scale_down", 1)
    assert replicas(api, lws) == 1
    assert reasons(api, lws) == ["Drain", "ScaleDown"]
    assert store.r.get(store.k("pool", pool, "low_since")) is None
    assert metric("liveavatar_lane_controller_decisions_total", pool=pool, kind="drain") == 2
    assert metric("liveavatar_lane_controller_decisions_total", pool=pool, kind="scale_down") == 1
    assert metric("liveavatar_lane_pool_current_replicas", pool=pool) == 1


def test_drained_lanes_are_undrained_when_demand_returns(kube, store):
    api = kube.api()
    pool = unique("u")
    tenant = f"t-{pool}"
    lws = create_pool(api, pool, tenant, lo=1, hi=4, replicas=3)
    lanes, _ = serving_on_last_lane(store, lws, pool, tenant, 3)
    clock = FakeClock()
    ctl = controller(kube, store, clock)
    ctl.reconcile_once()
    clock.t += IDLE_S * 1.5
    (d,) = ctl.reconcile_once()
    assert d.action == "wait_drain" and draining(store, lanes) == [False, True, True]

    # one more session: 2 lanes wanted -> lane 1 is open again, lane 2 stays drained
    add_sessions(store, tenant, ["waiting"])
    clock.t += 0.1
    (d,) = ctl.reconcile_once()
    assert (d.desired, d.action, d.undrained) == (2, "wait_drain", (lanes[1],))
    assert draining(store, lanes) == [False, False, True]
    # and another: all 3 lanes are wanted, the pool is no longer low
    add_sessions(store, tenant, ["preparing"])
    (d,) = ctl.reconcile_once()
    assert (d.desired, d.action, d.undrained) == (3, "steady", (lanes[2],))
    assert draining(store, lanes) == [False] * 3
    assert store.r.get(store.k("pool", pool, "low_since")) is None
    assert replicas(api, lws) == 3
    assert reasons(api, lws) == ["Drain", "Undrain", "Undrain"]
    assert metric("liveavatar_lane_controller_decisions_total", pool=pool, kind="undrain") == 2
    assert store.claim_lane(uuid.uuid4().hex, pool) == lanes[0]


def test_a_restarted_controller_continues_from_cluster_and_redis(kube, store):
    api = kube.api()
    pool = unique("r")
    tenant = f"t-{pool}"
    lws = create_pool(api, pool, tenant, lo=1, hi=4, replicas=3)
    lanes, sid = serving_on_last_lane(store, lws, pool, tenant, 3)
    clock = FakeClock()

    # controller #1 sees the pool low and starts the idle period, then goes away
    (d,) = controller(kube, store, clock).reconcile_once()
    assert (d.action, d.low_since) == ("wait_idle", clock.t)
    started = clock.t

    # controller #2, after the idle period: the timer came from Redis, so it drains at once
    clock.t += IDLE_S + 0.1
    (d,) = controller(kube, store, clock).reconcile_once()
    assert (d.action, d.low_since, d.drained) == ("wait_drain", started, tuple(lanes[1:]))

    # controller #3 finds the lanes drained (no second Drain event) and scales down once lane 2 is idle
    store.update_session(sid, state="ended")
    store.release_lane(lanes[2], sid)
    clock.t += 0.1
    (d,) = controller(kube, store, clock).reconcile_once()
    assert (d.action, d.drained, d.replicas_after) == ("scale_down", (), 1)
    assert replicas(api, lws) == 1
    assert reasons(api, lws) == ["Drain", "ScaleDown"]


def test_a_pool_above_its_max_is_drained_without_waiting(kube, store):
    """After `helm upgrade` lowered max (or a quota shrank), the surplus lanes go as soon as they are idle."""
    api = kube.api()
    pool = unique("m")
    tenant = f"t-{pool}"
    lws = create_pool(api, pool, tenant, lo=1, hi=2, replicas=4)
    register_lanes(store, lws, pool, 4)
    add_sessions(store, tenant, ["active"] * 4)
    (d,) = controller(kube, store, FakeClock()).reconcile_once()
    assert (d.desired, d.action, d.drained) == (2, "scale_down", (f"{lws}-2", f"{lws}-3"))
    assert replicas(api, lws) == 2
    assert reasons(api, lws) == ["Drain", "ScaleDown"]


def test_an_invalid_pool_is_reported_once_and_the_others_still_scale(kube, store):
    api = kube.api()
    good, bad = unique("g"), unique("x")
    lws_good = create_pool(api, good, f"t-{good}", lo=0, hi=2, replicas=0)
    lws_bad = create_pool(api, bad, f"t-{bad}", lo=3, hi=2, replicas=1)
    add_sessions(store, f"t-{good}", ["waiting"])
    ctl = controller(kube, store, FakeClock())
    for _ in range(2):
        decisions = ctl.reconcile_once()
    assert [d.pool for d in decisions] == [good]
    assert replicas(api, lws_good) == 1 and replicas(api, lws_bad) == 1
    ((reason, kind, message),) = events(api, lws_bad)
    assert (reason, kind) == ("InvalidLanePool", "Warning") and "min <= max" in message
    assert metric("liveavatar_lane_controller_errors_total", pool=bad) == 2


def test_two_leaderworkersets_claiming_one_pool_are_left_alone(kube, store):
    """The Redis keys are per pool name: two LWS of one pool would fight, so neither is scaled."""
    api = kube.api()
    pool = unique("dup")
    first = create_pool(api, pool, f"t-{pool}", lo=1, hi=3, replicas=1)
    body = k8s.CustomObjectsApi(api).get_namespaced_custom_object(G, V, NS, P, first)
    body["metadata"]["name"] = f"{first}-copy"
    k8s.CustomObjectsApi(api).create_namespaced_custom_object(G, V, NS, P, body)
    add_sessions(store, f"t-{pool}", ["active"] * 3)
    assert controller(kube, store, FakeClock()).reconcile_once() == []
    assert replicas(api, first) == 1 and replicas(api, f"{first}-copy") == 1
    assert [r for r, _, _ in events(api)] == ["InvalidLanePool", "InvalidLanePool"]
    assert "claimed by 2 LeaderWorkerSets" in events(api, first)[0][2]


# ---- the service process ------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_service_process_scales_serves_health_and_stops_gracefully(kube, store, tmp_path):
    api = kube.api()
    pool = unique("s")
    lws = create_pool(api, pool, f"t-{pool}", lo=1, hi=3, replicas=1)
    add_sessions(store, f"t-{pool}", ["active", "waiting"])
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": kube.url}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "nobody", "namespace": NS}}]}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEAVATAR_")}
    env.update(LIVEAVATAR_NAMESPACE=NS, LIVEAVATAR_KUBECONFIG=str(kubeconfig), LIVEAVATAR_REDIS_URL=_url(store),
               LIVEAVATAR_REDIS_NAMESPACE=store.ns, LIVEAVATAR_INTERVAL_S="0.2", LIVEAVATAR_HEALTH_PORT=str(port),
               LIVEAVATAR_JSON_LOGS="true", PYTHONPATH=str(REPO))
    log_path = tmp_path / "controller.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "services.lane_controller"], cwd=REPO, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and replicas(api, lws) != 2:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        assert replicas(api, lws) == 2, log_path.read_text()
        while time.monotonic() < deadline and _get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        code, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert f'liveavatar_lane_pool_desired_replicas{{pool="{pool}"}} 2.0' in text
        assert f'liveavatar_lane_controller_decisions_total{{kind="scale_up",pool="{pool}"}} 1.0' in text
        assert reasons(api, lws) == ["ScaleUp"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    scaled = [x for x in lines if x.get("event") == "lane pool reconciled" and x.get("action") == "scale_up"]
    assert scaled and scaled[0]["pool"] == pool and scaled[0]["replicas_after"] == 2
    assert any(x.get("event") == "stopping" for x in lines)
