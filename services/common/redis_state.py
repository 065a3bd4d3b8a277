"""Session, sink, cursor, lane and usage state in Redis.

Every key is namespaced (``<ns>:``, default ``la``) and expires. The layout::

    la:session:{sid}            hash   tenant, state, lane, created, options (JSON), height, width   TTL session
    la:tenant:{tid}:sessions    set    session ids of the tenant                                       TTL session
    la:session:{sid}:image      bytes  the uploaded reference image (until the sink is encoded)       TTL 1 h
    la:sink:{sid}               hash   ref / motion / text tensors (wire-encoded), seed                TTL session
    la:anchor:{sid}             bytes  the re-anchored sink latent (block 0's first frame)             TTL session
    la:cursor:{sid}             hash   audio_seq, audio_pending, features_block, features_end, lane_started, lane_block,
                                       media_block, acked_block, in_seq, accepted_samples, input_closed,
                                       pace_credit, pace_t (the API's no-faster-than-real-time bucket)  TTL session
    la:lane:{lane_id}           hash   partition, pool, status, session, heartbeat, drain              TTL heartbeat
    la:lanesession:{lane_id}    str    the session a lane serves; outlives the lane's heartbeat TTL    TTL session
    la:lanes                    zset   lane id -> partition                                             (members expire
                                                                                                        with their hash)
    la:usage:{tid}:{yyyymmdd}   float  seconds of video generated                                       TTL 2 days
    la:usageblocks:{tid}:{yyyymmdd} int blocks generated                                                TTL 2 days
    la:utterances:{sid}         zset   end_utterance seq -> the utterance's last block (until its
                                       ``utterance.ended`` event is published)                           TTL session

Tenancy: session records carry their tenant; :meth:`StateStore.get_session` with a ``tenant`` argument
returns ``None`` for another tenant's session (callers answer 404 either way).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from services.common.messages import Message, Tensor, _Header, decode, encode

DEFAULT_SESSION_TTL_S = 24 * 3600
LANE_TTL_S = 15


@dataclass
class SessionRecord:
    session_id: str
    tenant_id: str
    state: str = "created"          # created | preparing | waiting | active | ended | failed
    lane: str = ""
    created: float = field(default_factory=time.time)
    options: dict[str, Any] = field(default_factory=dict)
    height: int = 0
    width: int = 0
    error: str = ""

    def to_redis(self) -> dict[str, str]:
        d = asdict(self)
        d["options"] = json.dumps(self.options, sort_keys=True)
        return {k: str(v) for k, v in d.items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> SessionRecord:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(session_id=d["session_id"], tenant_id=d["tenant_id"], state=d["state"], lane=d.get("lane", ""),
                   created=float(d["created"]), options=json.loads(d.get("options") or "{}"),
                   height=int(d.get("height") or 0), width=int(d.get("width") or 0), error=d.get("error", ""))


#: Claim the lowest-partition idle, live lane of a pool for a session (atomic).
_CLAIM_LANE = """
local lanes = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, lane in ipairs(lanes) do
  local key = ARGV[1] .. ':lane:' .. lane
  if redis.call('EXISTS', key) == 1 then
    local status = redis.call('HGET', key, 'status')
    local pool = redis.call('HGET', key, 'pool')
    local draining = redis.call('HGET', key, 'drain')
    if status == 'idle' and draining ~= '1' and (ARGV[3] == '' or pool == ARGV[3]) then
      redis.call('HSET', key, 'status', 'serving', 'session', ARGV[2])
      redis.call('SET', ARGV[1] .. ':lanesession:' .. lane, ARGV[2], 'EX', ARGV[4])
      return lane
    end
  else
    redis.call('ZREM', KEYS[1], lane)
  end
end
return false
"""


class StateStore:
    """All Redis state of the platform behind one small API."""

    def __init__(self, client: redis.Redis, namespace: str = "la", session_ttl_s: int = DEFAULT_SESSION_TTL_S):
        self.r = client
        self.ns = namespace
        self.ttl = session_ttl_s
        self._claim = self.r.register_script(_CLAIM_LANE)

    @classmethod
    def from_url(cls, url: str, ssl_ca_certs: str | None = None, **kw) -> StateStore:
        """A store on ``url`` (``redis://`` or ``rediss://``, with a password if any); ``ssl_ca_certs`` is
        the PEM CA bundle that verifies a ``rediss://`` server."""
        options = {"ssl_ca_certs": ssl_ca_certs} if ssl_ca_certs else {}
        return cls(redis.Redis.from_url(url, **options), **kw)

    @classmethod
    def from_settings(cls, settings, **kw) -> StateStore:
        """A store from a service's settings: URL, TLS CA bundle and key namespace."""
        kw.setdefault("namespace", settings.redis_namespace)
        return cls.from_url(settings.redis_url.get_secret_value(), **settings.redis_options(), **kw)

    def k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    # ---- sessions ----------------------------------------------------------------------------
    def put_session(self, rec: SessionRecord) -> None:
        p = self.r.pipeline()
        p.hset(self.k("session", rec.session_id), mapping=rec.to_redis())
        p.expire(self.k("session", rec.session_id), self.ttl)
        p.sadd(self.k("tenant", rec.tenant_id, "sessions"), rec.session_id)
        p.expire(self.k("tenant", rec.tenant_id, "sessions"), self.ttl)
        p.execute()

    def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        raw = self.r.hgetall(self.k("session", session_id))
        if not raw:
            return None
        rec = SessionRecord.from_redis(raw)
        if tenant is not None and rec.tenant_id != tenant:
            return None
        return rec

    def update_session(self, session_id: str, **fields: Any) -> None:
        vals = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v) for k, v in fields.items()}
        self.r.hset(self.k("session", session_id), mapping=vals)

    def list_sessions(self, tenant: str) -> list[SessionRecord]:
        out = []
        for sid in sorted(self.r.smembers(self.k("tenant", tenant, "sessions"))):
            rec = self.get_session(sid.decode(), tenant)
            if rec is not None:
                out.append(rec)
        return out

    def delete_session(self, session_id: str) -> None:
        rec = self.get_session(session_id)
        keys = [self.k(*p) for p in (("session", session_id), ("session", session_id, "image"), ("sink", session_id),
                                     ("anchor", session_id), ("cursor", session_id))]
        p = self.r.pipeline()
        p.delete(*keys)
        if rec is not None:
            p.srem(self.k("tenant", rec.tenant_id, "sessions"), session_id)
        p.execute()

    # ---- image, sink, anchor -------------------------------------------------------------------
    def put_image(self, session_id: str, data: bytes, ttl_s: int = 3600) -> None:
        self.r.set(self.k("session", session_id, "image"), data, ex=ttl_s)

    def get_image(self, session_id: str) -> bytes | None:
        return self.r.get(self.k("session", session_id, "image"))

    def put_sink(self, session_id: str, tensors: dict[str, Tensor], header: _Header) -> None:
        """The session's sink inputs as one wire message (ref, motion, text tensors + the start header)."""
        self.r.set(self.k("sink", session_id), encode(header, tensors), ex=self.ttl)

    def get_sink(self, session_id: str) -> Message | None:
        raw = self.r.get(self.k("sink", session_id))
        return None if raw is None else decode(raw)

    def put_anchor(self, session_id: str, tensor: Tensor, header: _Header) -> None:
        self.r.set(self.k("anchor", session_id), encode(header, {"anchor": tensor}), ex=self.ttl)

    def get_anchor(self, session_id: str) -> Tensor | None:
        raw = self.r.get(self.k("anchor", session_id))
        return None if raw is None else decode(raw).tensors["anchor"]

    # ---- cursors -------------------------------------------------------------------------------
    def set_cursor(self, session_id: str, **fields: int | bytes | str) -> None:
        key = self.k("cursor", session_id)
        p = self.r.pipeline(transaction=False)        # one round trip; HSET + EXPIRE need no MULTI/EXEC
        p.hset(key, mapping=fields)
        p.expire(key, self.ttl)
        p.execute()

    def get_cursor(self, session_id: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(self.k("cursor", session_id)).items()}

    def cursor_int(self, session_id: str, name: str, default: int = -1) -> int:
        v = self.r.hget(self.k("cursor", session_id), name)
        return default if v is None else int(v)

    def advance_cursor(self, session_id: str, name: str, value: int) -> bool:
        """Set cursor ``name`` to ``value`` if that moves it forward; returns whether it did (idempotence)."""
        script = ("local cur = redis.call('HGET', KEYS[1], ARGV[1]) "
                  "if cur and tonumber(cur) >= tonumber(ARGV[2]) then return 0 end "
                  "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) redis.call('EXPIRE', KEYS[1], ARGV[3]) return 1")
        return bool(self.r.eval(script, 1, self.k("cursor", session_id), name, value, self.ttl))

    # ---- lanes ---------------------------------------------------------------------------------
    def register_lane(self, lane_id: str, partition: int, pool: str = "default") -> None:
        """Announce a lane and start its heartbeat TTL. A lane that restarts (even after its heartbeat key
        expired) comes back serving the session it was assigned, if that assignment is still recorded."""
        key = self.k("lane", lane_id)
        serving = self.lane_session(lane_id)
        p = self.r.pipeline()
        if serving:
            p.hset(key, mapping={"status": "serving", "session": serving})
        else:
            p.hsetnx(key, "status", "idle")
        p.hset(key, mapping={"partition": partition, "pool": pool, "heartbeat": time.time()})
        p.expire(key, LANE_TTL_S)
        p.zadd(self.k("lanes"), {lane_id: partition})
        p.execute()

    def heartbeat_lane(self, lane_id: str) -> None:
        key = self.k("lane", lane_id)
        p = self.r.pipeline(transaction=False)
        p.hset(key, "heartbeat", time.time())
        p.expire(key, LANE_TTL_S)
        p.execute()

    def get_lane(self, lane_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(self.k("lane", lane_id))
        return {k.decode(): v.decode() for k, v in raw.items()} if raw else None

    def list_lanes(self) -> dict[str, dict[str, str]]:
        out = {}
        for lane in self.r.zrange(self.k("lanes"), 0, -1):
            info = self.get_lane(lane.decode())
            if info is not None:
                out[lane.decode()] = info
        return out

    def claim_lane(self, session_id: str, pool: str = "") -> str | None:
        """Atomically take an idle live lane for the session; None when every lane is busy."""
        lane = self._claim(keys=[self.k("lanes")], args=[self.ns, session_id, pool, self.ttl])
        return lane.decode() if lane else None

    def lane_session(self, lane_id: str) -> str:
        """The session assigned to a lane ("" when none), independent of the lane's heartbeat."""
        v = self.r.get(self.k("lanesession", lane_id))
        return v.decode() if v else ""

    def release_lane(self, lane_id: str, session_id: str) -> None:
        """Mark the lane idle again, but only if it still serves this session."""
        script = ("if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end "
                  "if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then "
                  "redis.call('HSET', KEYS[1], 'status', 'idle', 'session', '') return 1 end return 0")
        self.r.eval(script, 2, self.k("lane", lane_id), self.k("lanesession", lane_id), session_id)

    def set_lane_drain(self, lane_id: str, drain: bool) -> None:
        """A draining lane takes no new session (the lane controller drains before it scales down)."""
        self.r.hset(self.k("lane", lane_id), "drain", "1" if drain else "0")

    # ---- usage ---------------------------------------------------------------------------------
    def add_usage(self, tenant: str, seconds: float, day: str | None = None, blocks: int = 1) -> float:
        """Count ``seconds`` of generated video (``blocks`` blocks, one per call by default) for the tenant."""
        day = day or time.strftime("%Y%m%d", time.gmtime())
        key, bkey = self.k("usage", tenant, day), self.k("usageblocks", tenant, day)
        p = self.r.pipeline(transaction=False)
        p.incrbyfloat(key, seconds)
        p.expire(key, 2 * 24 * 3600)
        p.incrby(bkey, blocks)
        p.expire(bkey, 2 * 24 * 3600)
        return float(p.execute()[0])

    def get_usage(self, tenant: str, day: str | None = None) -> float:
        v = self.r.get(self.k("usage", tenant, day or time.strftime("%Y%m%d", time.gmtime())))
        return float(v) if v is not None else 0.0

    def get_usage_blocks(self, tenant: str, day: str | None = None) -> int:
        v = self.r.get(self.k("usageblocks", tenant, day or time.strftime("%Y%m%d", time.gmtime())))
        return int(v) if v is not None else 0

    # ---- utterances (for the utterance.ended event) --------------------------------------------
    def mark_utterance_end(self, session_id: str, seq: int, last_block: int) -> None:
        """The utterance ended by input event ``seq`` ends with block ``last_block`` (idempotent)."""
        key = self.k("utterances", session_id)
        p = self.r.pipeline(transaction=False)
        p.zadd(key, {str(seq): last_block})
        p.expire(key, self.ttl)
        p.execute()

    def utterances_through(self, session_id: str, block: float) -> list[tuple[int, int]]:
        """``(seq, last_block)`` of the marked utterances that end at or before ``block``, oldest first."""
        rows = self.r.zrangebyscore(self.k("utterances", session_id), "-inf", block, withscores=True)
        return [(int(m), int(b)) for m, b in rows]

    def clear_utterances(self, session_id: str, seqs: list[int]) -> None:
        if seqs:
            self.r.zrem(self.k("utterances", session_id), *[str(x) for x in seqs])
