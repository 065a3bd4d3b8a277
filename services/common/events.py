"""Product events and signed webhooks: the event shape, how producers put events on the ``events`` topic,
each tenant's webhook endpoint in Redis, and the signature.

An event is JSON ``{"id", "type", "created", "session_id", "data"}``. Its ``id`` is derived from what
happened (the session, the type and, for repeatable events, what makes each one unique), so a producer
that publishes the same event twice (a restart) publishes the same id, and a receiver dedupes on it.

On the topic, each record is ``{"tenant_id": ..., "event": {...}}`` keyed by session id (one session's
events stay in order). The webhooks dispatcher (``services.webhooks``) delivers the ``event`` part.

Redis::

    la:webhook:{tenant}         hash   url, secret, created                  (no TTL: tenant configuration)
    la:webhookdead:{tenant}     list   events given up on (newest first)     TTL 7 days, at most 1000

Signature: header ``LiveAvatar-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``;
``t`` is the time of the delivery attempt, so a receiver can refuse old (replayed) deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra import topics

SIGNATURE_HEADER = "LiveAvatar-Signature"
SECRET_PREFIX = "whsec_"
#: A receiver should refuse a delivery whose ``t`` is further than this from its clock.
REPLAY_WINDOW_S = 300
#: The largest event this platform publishes (the topic's limit is far above it).
MAX_EVENT_BYTES = 64 * 1024
DEAD_LETTER_KEEP = 1000
DEAD_LETTER_TTL_S = 7 * 24 * 3600

EventType = Literal["session.ready", "session.failed", "session.ended", "utterance.ended"]
EVENT_TYPES: tuple[str, ...] = EventType.__args__


class Event(BaseModel):
    """One product event, exactly as a webhook receiver gets it (the request body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="stable per event: every retry (and a re-publication) carries the same id")
    type: EventType
    created: float = Field(description="unix seconds when the event happened")
    session_id: str
    data: dict[str, Any] = Field(default_factory=dict)

    def body(self) -> bytes:
        """The exact bytes POSTed (compact JSON, keys sorted): the same on every attempt."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()


def event_id(session_id: str, type_: str, discriminator: str = "") -> str:
    """The id of an event: the same inputs give the same id, whoever publishes it and however often."""
    digest = hashlib.sha256(f"{session_id}\n{type_}\n{discriminator}".encode()).hexdigest()
    return "evt_" + digest[:32]


def make_event(type_: str, session_id: str, data: dict | None = None, discriminator: str = "",
               created: float | None = None) -> Event:
    return Event(id=event_id(session_id, type_, discriminator), type=type_, session_id=session_id,
                 created=round(time.time() if created is None else created, 3), data=data or {})


def encode_record(tenant_id: str, event: Event) -> bytes:
    raw = json.dumps({"tenant_id": tenant_id, "event": event.model_dump()}, sort_keys=True).encode()
    if len(raw) > MAX_EVENT_BYTES:
        raise ValueError(f"event {event.type} of {len(raw)} bytes exceeds {MAX_EVENT_BYTES}")
    return raw


def decode_record(raw: bytes) -> tuple[str, Event]:
    """``(tenant_id, event)`` of one record of the ``events`` topic; ``ValueError`` when malformed."""
    d = json.loads(raw)
    if not isinstance(d, dict) or not isinstance(d.get("tenant_id"), str):
        raise ValueError("not an event record")
    return d["tenant_id"], Event.model_validate(d.get("event"))


def publish(producer, tenant_id: str, event: Event) -> None:
    """Hand one event to the producer (keyed by session). The caller flushes before relying on it."""
    producer.send(topics.name(topics.EVENTS), key=event.session_id.encode(), value=encode_record(tenant_id, event))


# ---- signing ----------------------------------------------------------------------------------------

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``LiveAvatar-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float | None = None,
           window_s: float = REPLAY_WINDOW_S) -> bool:
    """What a receiver does: the header's ``v1`` matches and its ``t`` is within the replay window."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - t) > window_s:
        return False
    expected = sign(secret, t, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


# ---- endpoints in Redis ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > 2000:
        raise ValueError(f"invalid webhook URL {url!r}: use an absolute http:// or https:// URL")
    return url


def set_webhook(store, tenant_id: str, url: str) -> str:
    """Set the tenant's endpoint and give it a new signing secret (returned; stored in Redis only)."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    store.r.hset(store.k("webhook", tenant_id), mapping={"url": check_url(url), "secret": secret,
                                                         "created": time.time()})
    return secret


def get_webhook(store, tenant_id: str) -> Webhook | None:
    raw = store.r.hgetall(store.k("webhook", tenant_id))
    if not raw or b"url" not in raw:
        return None
    return Webhook(raw[b"url"].decode(), raw[b"secret"].decode())


def dead_letter(store, tenant_id: str, record: dict) -> None:
    key = store.k("webhookdead", tenant_id)
    p = store.r.pipeline()
    p.lpush(key, json.dumps(record, sort_keys=True))
    p.ltrim(key, 0, DEAD_LETTER_KEEP - 1)
    p.expire(key, DEAD_LETTER_TTL_S)
    p.execute()


def dead_letters(store, tenant_id: str) -> list[dict]:
    return [json.loads(x) for x in store.r.lrange(store.k("webhookdead", tenant_id), 0, -1)]
