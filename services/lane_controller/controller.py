"""The lane controller: scales each tenant lane pool's LeaderWorkerSet to the pool's session demand.

One LeaderWorkerSet (LWS) per tenant lane pool, labelled ``liveavatar.io/lane-pool=<pool>`` and
``liveavatar.io/tenant=<tenant>`` and annotated with the pool's bounds ``liveavatar.io/lane-pool-min``
/ ``-max``. ``spec.replicas`` is the number of lanes (LWS groups); group ``i`` of LWS ``<name>`` is the lane
``<name>-<i>`` in Redis. LWS removes the highest group indices first when replicas shrink.

One reconcile pass, per pool (see :meth:`LaneController.reconcile_once`)::

    demand  = sessions of the tenant in state preparing | waiting | active          (Redis)
    ceiling = min(max, tenant quota max_lanes if set), never below min
    desired = clamp(demand + headroom, min, ceiling)

    desired >= replicas  -> scale up at once (patch spec.replicas); forget the low-since time;
                            undrain every lane that is kept
    desired <  replicas  -> remember since when (Redis ``la:pool:{pool}:low_since``); once that is
                            scale_down_idle_s ago (or at once when replicas exceed the ceiling):
                            drain lanes desired..replicas-1, then patch replicas down only when
                            none of them serves a session (idle, or gone)

Every input is read afresh from the cluster and Redis in each pass; the controller keeps no decision
state in memory, so a restarted controller carries on where the previous one stopped.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, Histogram

from services.common.health import HealthServer
from services.common.logging import get_logger
from services.common.redis_state import LANE_TTL_S, StateStore
from services.common.worker import GracefulStop
from services.lane_controller.settings import POOL_LABEL, LaneControllerSettings

SERVICE = "lane-controller"
log = get_logger(SERVICE)

# ---- the LeaderWorkerSet API and our labels / annotations ---------------------------------------
LWS_GROUP = "leaderworkerset.x-k8s.io"
LWS_VERSION = "v1"
LWS_PLURAL = "leaderworkersets"
LWS_KIND = "LeaderWorkerSet"
TENANT_LABEL = "liveavatar.io/tenant"
MIN_ANNOTATION = "liveavatar.io/lane-pool-min"
MAX_ANNOTATION = "liveavatar.io/lane-pool-max"
#: Session states that need (or will soon need) a lane.
DEMAND_STATES = frozenset({"preparing", "waiting", "active"})
#: Field of ``la:tenantcfg:{tenant}`` with the tenant's optional lane quota.
QUOTA_FIELD = "max_lanes"
#: Reporting component of our Kubernetes Events.
EVENT_COMPONENT = "liveavatar.io/lane-controller"
#: Service-account namespace file of a pod (the default namespace in-cluster).
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# ---- metrics ------------------------------------------------------------------------------------
POOL_DESIRED = Gauge("liveavatar_lane_pool_desired_replicas", "Lanes the controller wants in the pool", ["pool"])
POOL_CURRENT = Gauge("liveavatar_lane_pool_current_replicas", "spec.replicas of the pool's LeaderWorkerSet",
                     ["pool"])
POOL_DEMAND = Gauge("liveavatar_lane_pool_demand_sessions", "Sessions of the pool's tenant that need a lane",
                    ["pool"])
POOL_DRAINING = Gauge("liveavatar_lane_pool_draining_lanes", "Lanes drained for removal", ["pool"])
DECISIONS = Counter("liveavatar_lane_controller_decisions",
                    "Scaling decisions (kind: scale_up, scale_down, drain, undrain; drain/undrain count lanes)",
                    ["pool", "kind"])
ERRORS = Counter("liveavatar_lane_controller_errors", "Failed reconcile passes or pools ('' = whole pass)",
                 ["pool"])
RECONCILE_SECONDS = Histogram("liveavatar_lane_controller_reconcile_seconds", "Duration of one reconcile pass",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

# ---- Redis scripts (atomic per lane) --------------------------------------------------------------
#: Mark a lane draining. An absent lane hash is created with the lane TTL, so a lane pod that registers
#: right after (register_lane keeps other fields) is born draining and can never be claimed. Returns 1
#: when the flag changed.
_DRAIN = """
local was = redis.call('HGET', KEYS[1], 'drain')
redis.call('HSET', KEYS[1], 'drain', '1')
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if was == '1' then return 0 end
return 1
"""
#: Clear a lane's drain flag, only when the lane hash exists and is draining (never creates a key).
_UNDRAIN = """
if redis.call('HGET', KEYS[1], 'drain') == '1' then
  redis.call('HSET', KEYS[1], 'drain', '0')
  return 1
end
return 0
"""


class PoolConfigError(ValueError):
    """A LeaderWorkerSet's pool labels or bounds annotations are missing or invalid."""


def lane_id(lws_name: str, group_index: int) -> str:
    """The lane id of group ``group_index`` of LeaderWorkerSet ``lws_name`` (what the lane registers as)."""
    return f"{lws_name}-{group_index}"


def pool_ceiling(min_lanes: int, max_lanes: int, quota: int | None = None) -> int:
    """The most lanes a pool may have: its max, lowered by the tenant quota, but never below its min."""
    if min_lanes < 0 or max_lanes < min_lanes:
        raise PoolConfigError(f"lane pool bounds must satisfy 0 <= min <= max, got min={min_lanes} max={max_lanes}")
    if quota is None:
        return max_lanes
    if quota < 0:
        raise PoolConfigError(f"tenant lane quota must be >= 0, got {quota}")
    return max(min_lanes, min(max_lanes, quota))


def desired_lanes(demand: int, min_lanes: int, max_lanes: int, headroom: int = 0, quota: int | None = None) -> int:
    """Lanes the pool should have: ``clamp(demand + headroom, min, ceiling)``."""
    if demand < 0 or headroom < 0:
        raise ValueError(f"demand and headroom must be >= 0, got demand={demand} headroom={headroom}")
    return max(min_lanes, min(pool_ceiling(min_lanes, max_lanes, quota), demand + headroom))


def _int_field(value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise PoolConfigError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class LanePool:
    """One lane pool, as read from its LeaderWorkerSet."""

    lws: str                   # LeaderWorkerSet name
    namespace: str
    pool: str                  # liveavatar.io/lane-pool
    tenant: str                # liveavatar.io/tenant
    min_lanes: int             # liveavatar.io/lane-pool-min
    max_lanes: int             # liveavatar.io/lane-pool-max
    replicas: int              # spec.replicas: lanes (groups) now
    uid: str = ""
    resource_version: str = ""

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> LanePool:
        """Parse a LeaderWorkerSet object (a dict as the API returns it); PoolConfigError when it is not a pool."""
        meta = obj.get("metadata") or {}
        name = meta.get("name") or ""
        labels = meta.get("labels") or {}
        ann = meta.get("annotations") or {}
        if not name:
            raise PoolConfigError("LeaderWorkerSet without metadata.name")
        for key in (POOL_LABEL, TENANT_LABEL):
            if not labels.get(key):
                raise PoolConfigError(f"LeaderWorkerSet {name}: label {key} is missing")
        for key in (MIN_ANNOTATION, MAX_ANNOTATION):
            if key not in ann:
                raise PoolConfigError(f"LeaderWorkerSet {name}: annotation {key} is missing")
        lo = _int_field(ann[MIN_ANNOTATION], f"LeaderWorkerSet {name}: annotation {MIN_ANNOTATION}")
        hi = _int_field(ann[MAX_ANNOTATION], f"LeaderWorkerSet {name}: annotation {MAX_ANNOTATION}")
        pool_ceiling(lo, hi)  # validates 0 <= min <= max
        spec = obj.get("spec") or {}
        replicas = _int_field(spec.get("replicas", 1), f"LeaderWorkerSet {name}: spec.replicas")
        if replicas < 0:
            raise PoolConfigError(f"LeaderWorkerSet {name}: spec.replicas must be >= 0, got {replicas}")
        return cls(lws=name, namespace=meta.get("namespace") or "", pool=labels[POOL_LABEL],
                   tenant=labels[TENANT_LABEL], min_lanes=lo, max_lanes=hi, replicas=replicas,
                   uid=meta.get("uid") or "", resource_version=str(meta.get("resourceVersion") or ""))

    def lane_id(self, group_index: int) -> str:
        return lane_id(self.lws, group_index)


@dataclass(frozen=True)
class LaneState:
    """One lane's Redis record as the controller sees it (``present`` False: no hash, the lane is gone)."""

    lane_id: str
    present: bool
    serving: bool
    draining: bool

    @classmethod
    def from_hash(cls, lane: str, raw: dict[bytes, bytes]) -> LaneState:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(lane, bool(d), d.get("status") == "serving", d.get("drain") == "1")


@dataclass(frozen=True)
class PoolDecision:
    """What one reconcile pass decided and did for one pool (also logged and exported)."""

    pool: str
    lws: str
    tenant: str
    demand: int
    desired: int
    replicas_before: int
    replicas_after: int
    #: scale_up | scale_down | steady | wait_idle (low, idle period running) | wait_drain (draining lanes
    #: still serve) | error
    action: str
    drained: tuple[str, ...] = ()
    undrained: tuple[str, ...] = ()
    busy: tuple[str, ...] = ()           # lanes to be removed that still serve a session
    low_since: float | None = None
    error: str = ""


@dataclass
class _Seen:
    """Warnings already reported as Events by this process (noise control only, never decision state)."""

    warnings: set[tuple[str, str]] = field(default_factory=set)


def resolve_namespace(configured: str) -> str:
    """The configured namespace, else the pod's own (service-account file), else ``default``."""
    if configured:
        return configured
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def kube_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """An API client from ``kubeconfig``, else the in-cluster service account, else ``~/.kube/config``."""
    cfg = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=cfg)
    return k8s.ApiClient(cfg)


class LaneController:
    """Reconciles every lane pool of one namespace; see the module docstring for the algorithm.

    ``clock`` gives wall-clock seconds (the low-since time is shared through Redis, so it must be the
    same clock across restarts); tests inject a fake one.
    """

    def __init__(self, settings: LaneControllerSettings, api: k8s.ApiClient, store: StateStore,
                 clock: Callable[[], float] = time.time):
        # 1. settings and clients
        self.s = settings
        self.namespace = resolve_namespace(settings.namespace)
        self.custom = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)
        self.store = store
        self.clock = clock
        # 2. atomic lane drain / undrain (Lua, same key layout as StateStore)
        self._drain = store.r.register_script(_DRAIN)
        self._undrain = store.r.register_script(_UNDRAIN)
        # 3. process-local bits that never drive a decision
        self._seen = _Seen()
        self._event_seq = itertools.count()
        self._instance = socket.gethostname()
        self._ready = False

    # ---- one pass ----------------------------------------------------------------------------------
    def reconcile_once(self) -> list[PoolDecision]:
        """Read every pool's LeaderWorkerSet and Redis state, act, and return what was decided per pool.

        A Kubernetes error on one pool (e.g. a 409 conflict on the patch) is logged and reported as an
        ``error`` decision; the other pools go on. A failure to list or to reach Redis raises.
        """
        t0 = time.perf_counter()
        now = self.clock()
        # 1. the pools, from the cluster
        pools = self._list_pools()
        # 2. one decision per pool
        decisions = []
        for pool in pools:
            try:
                decisions.append(self._reconcile_pool(pool, now))
            except ApiException as exc:
                ERRORS.labels(pool.pool).inc()
                log.error("reconcile failed", pool=pool.pool, lws=pool.lws, status=exc.status, reason=exc.reason)
                decisions.append(PoolDecision(pool.pool, pool.lws, pool.tenant, 0, 0, pool.replicas, pool.replicas,
                                              "error", error=f"{exc.status} {exc.reason}"))
        self._ready = True
        RECONCILE_SECONDS.observe(time.perf_counter() - t0)
        return decisions

    def _list_pools(self) -> list[LanePool]:
        # {"items": [LWS object dicts]}
        listing = self.custom.list_namespaced_custom_object(
            LWS_GROUP, LWS_VERSION, self.namespace, LWS_PLURAL, label_selector=self.s.label_selector,
            _request_timeout=self.s.request_timeout_s)
        pools: list[LanePool] = []
        for obj in listing.get("items", []):
            try:
                pools.append(LanePool.from_object(obj))
            except PoolConfigError as exc:
                self._warn_invalid(obj, str(exc))
        by_name: dict[str, list[LanePool]] = {}
        for p in pools:
            by_name.setdefault(p.pool, []).append(p)
        out = []
        for name, group in by_name.items():
            if len(group) > 1:  # the Redis keys are per pool name: two LWS of one pool would fight
                for p in group:
                    self._warn_invalid({"metadata": {"name": p.lws, "uid": p.uid, "labels": {POOL_LABEL: name}}},
                                       f"lane pool {name!r} is claimed by {len(group)} LeaderWorkerSets "
                                       f"({', '.join(sorted(g.lws for g in group))}); not scaling it")
                continue
            out.append(group[0])
        return out

    def _reconcile_pool(self, pool: LanePool, now: float) -> PoolDecision:
        # 1. demand, quota, desired
        demand = self.demand(pool.tenant)
        quota = self.tenant_quota(pool.tenant)
        ceiling = pool_ceiling(pool.min_lanes, pool.max_lanes, quota)
        desired = desired_lanes(demand, pool.min_lanes, pool.max_lanes, self.s.headroom, quota)
        current = pool.replicas
        low_key = self.store.k("pool", pool.pool, "low_since")
        low_since: float | None = None
        drained: list[str] = []
        busy: list[str] = []
        after = current

        # 2. enough or too few lanes: scale up at once, forget the low-since time
        if desired >= current:
            self.store.r.delete(low_key)
            keep = desired
            action = "steady"
            if desired > current:
                self._patch_replicas(pool, desired)
                after, action = desired, "scale_up"
        # 3. too many lanes: wait for the idle period, then drain, then scale down once drained lanes are idle
        else:
            low_since = self._low_since(low_key, now)
            over_ceiling = current > ceiling
            if not over_ceiling and now - low_since < self.s.scale_down_idle_s:
                keep, action = current, "wait_idle"
            else:
                keep = desired
                to_remove = [pool.lane_id(i) for i in range(desired, current)]
                drained = [lane for lane in to_remove if self._drain(keys=[self.store.k("lane", lane)],
                                                                     args=[LANE_TTL_S])]
                # read the statuses only after the drain flags are set: from now on no lane here is claimed
                busy = [s.lane_id for s in self._lane_states(to_remove) if s.serving]
                if busy:
                    action = "wait_drain"
                else:
                    self._patch_replicas(pool, desired)
                    self.store.r.delete(low_key)
                    after, action = desired, "scale_down"

        # 4. every lane that stays is open for sessions (also clears stale flags of re-created groups)
        undrained = [pool.lane_id(i) for i in range(keep)
                     if self._undrain(keys=[self.store.k("lane", pool.lane_id(i))])]

        decision = PoolDecision(pool.pool, pool.lws, pool.tenant, demand, desired, current, after, action,
                                tuple(drained), tuple(undrained), tuple(busy), low_since)
        self._report(pool, decision, ceiling)
        return decision

    # ---- Redis reads -------------------------------------------------------------------------------
    def demand(self, tenant: str) -> int:
        """Sessions of the tenant that need a lane (states preparing, waiting, active)."""
        return sum(1 for rec in self.store.list_sessions(tenant) if rec.state in DEMAND_STATES)

    def tenant_quota(self, tenant: str) -> int | None:
        """The tenant's optional lane quota (``la:tenantcfg:{tenant}`` field ``max_lanes``); None when unset."""
        raw = self.store.r.hget(self.store.k("tenantcfg", tenant), QUOTA_FIELD)
        if raw is None or raw.decode().strip() == "":
            return None
        try:
            value = int(raw.decode())
        except ValueError:
            value = -1
        if value < 0:
            log.warning("ignored invalid tenant lane quota", tenant=tenant, value=raw.decode())
            return None
        return value

    def _lane_states(self, lanes: list[str]) -> list[LaneState]:
        p = self.store.r.pipeline()
        for lane in lanes:
            p.hgetall(self.store.k("lane", lane))
        return [LaneState.from_hash(lane, raw) for lane, raw in zip(lanes, p.execute(), strict=True)]

    def _low_since(self, key: str, now: float) -> float:
        """When the pool first had more lanes than wanted (set once; survives restarts; refreshed TTL)."""
        ttl = int(max(3600.0, 10 * self.s.scale_down_idle_s))
        p = self.store.r.pipeline()
        p.set(key, repr(now), nx=True, ex=ttl)
        p.expire(key, ttl)
        p.get(key)
        return float(p.execute()[-1])

    # ---- Kubernetes writes -------------------------------------------------------------------------
    def _patch_replicas(self, pool: LanePool, replicas: int) -> None:
        body: dict[str, Any] = {"spec": {"replicas": replicas}}
        if pool.resource_version:  # optimistic concurrency: a 409 if someone changed the LWS since we read it
            body["metadata"] = {"resourceVersion": pool.resource_version}
        self.custom.patch_namespaced_custom_object(LWS_GROUP, LWS_VERSION, self.namespace, LWS_PLURAL, pool.lws,
                                                   body, _request_timeout=self.s.request_timeout_s)

    def _event(self, lws: str, uid: str, reason: str, message: str, kind: str = "Normal") -> None:
        """Record a core/v1 Event on the LeaderWorkerSet; a failure is logged, never fatal."""
        stamp = datetime.now(UTC)
        ev = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(name=f"{lws}.{time.time_ns():x}{next(self._event_seq):x}",
                                      namespace=self.namespace),
            involved_object=k8s.V1ObjectReference(api_version=f"{LWS_GROUP}/{LWS_VERSION}", kind=LWS_KIND,
                                                  name=lws, namespace=self.namespace, uid=uid or None),
            reason=reason, message=message, type=kind, count=1, first_timestamp=stamp, last_timestamp=stamp,
            source=k8s.V1EventSource(component=SERVICE), reporting_component=EVENT_COMPONENT,
            reporting_instance=self._instance)
        try:
            self.core.create_namespaced_event(self.namespace, ev, _request_timeout=self.s.request_timeout_s)
        except ApiException as exc:
            log.warning("event not recorded", lws=lws, reason=reason, status=exc.status)

    def _warn_invalid(self, obj: dict[str, Any], message: str) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name") or "?"
        ERRORS.labels((meta.get("labels") or {}).get(POOL_LABEL, "")).inc()
        log.warning("lane pool skipped", lws=name, error=message)
        if name != "?" and (name, message) not in self._seen.warnings:
            self._seen.warnings.add((name, message))
            self._event(name, meta.get("uid") or "", "InvalidLanePool", message, kind="Warning")

    # ---- reporting ---------------------------------------------------------------------------------
    def _report(self, pool: LanePool, d: PoolDecision, ceiling: int) -> None:
        """Metrics, one JSON log line and Kubernetes Events for what changed."""
        POOL_DESIRED.labels(pool.pool).set(d.desired)
        POOL_CURRENT.labels(pool.pool).set(d.replicas_after)
        POOL_DEMAND.labels(pool.pool).set(d.demand)
        POOL_DRAINING.labels(pool.pool).set((d.replicas_before - d.desired) if d.action == "wait_drain" else 0)
        bounds = f"demand {d.demand}, min {pool.min_lanes}, max {pool.max_lanes}, ceiling {ceiling}"
        if d.undrained:
            DECISIONS.labels(pool.pool, "undrain").inc(len(d.undrained))
            self._event(pool.lws, pool.uid, "Undrain", f"lanes {', '.join(d.undrained)} take sessions again "
                                                      f"({bounds})")
        if d.drained:
            DECISIONS.labels(pool.pool, "drain").inc(len(d.drained))
            self._event(pool.lws, pool.uid, "Drain", f"draining lanes {', '.join(d.drained)} before scaling "
                                                    f"{d.replicas_before} -> {d.desired} ({bounds})")
        if d.action in ("scale_up", "scale_down"):
            DECISIONS.labels(pool.pool, d.action).inc()
            reason = "ScaleUp" if d.action == "scale_up" else "ScaleDown"
            self._event(pool.lws, pool.uid, reason, f"scaled lanes {d.replicas_before} -> {d.replicas_after} "
                                                   f"({bounds})")
        changed = d.action in ("scale_up", "scale_down") or d.drained or d.undrained
        (log.info if changed else log.debug)(
            "lane pool reconciled", pool=d.pool, lws=d.lws, tenant=d.tenant, action=d.action, demand=d.demand,
            desired=d.desired, replicas_before=d.replicas_before, replicas_after=d.replicas_after,
            drained=list(d.drained), undrained=list(d.undrained), busy=list(d.busy), low_since=d.low_since)

    # ---- the service loop --------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Ready once a pass succeeded and Redis answers."""
        return self._ready and bool(self.store.r.ping())

    def run(self, stop: GracefulStop) -> None:
        """Reconcile every ``interval_s`` until ``stop`` is set, serving /healthz, /readyz and /metrics."""
        health = HealthServer(self.s.health_host, self.s.health_port, self.is_ready, SERVICE).start()
        log.info("started", namespace=self.namespace, health_port=health.port, interval_s=self.s.interval_s,
                 scale_down_idle_s=self.s.scale_down_idle_s, label_selector=self.s.label_selector)
        try:
            while not stop.stopping:
                try:
                    self.reconcile_once()
                except Exception as exc:  # noqa: BLE001 - the loop survives API / Redis outages
                    self._ready = False
                    ERRORS.labels("").inc()
                    log.error("reconcile pass failed", error=f"{type(exc).__name__}: {exc}")
                stop.event.wait(self.s.interval_s)
        finally:
            log.info("stopping")
            health.stop()
