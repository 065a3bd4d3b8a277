"""Tenants, API keys and quotas, in Redis.

Keys are ``la_<43 url-safe characters>`` (256 random bits). Only their SHA-256 is stored::

    la:apikey:{sha256(key)}     -> tenant id
    la:tenantcfg:{tenant}       hash  name, max_sessions, minutes_per_day, created

A key is shown once, when it is created, and never logged (the log processor masks the ``la_`` pattern).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from services.common.redis_state import StateStore

KEY_PREFIX = "la_"
ACTIVE_STATES = ("created", "preparing", "waiting", "active")


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    name: str
    max_sessions: int
    minutes_per_day: float


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(store: StateStore, name: str, max_sessions: int = 4, minutes_per_day: float = 600.0) -> tuple[Tenant, str]:
    """A new tenant and its API key (returned once; only the hash is stored)."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError("tenant name: 1-64 characters of letters, digits, '-', '_' or '.'")
    if max_sessions < 1 or minutes_per_day <= 0:
        raise ValueError("max_sessions must be >= 1 and minutes_per_day > 0")
    tenant_id = f"{name}-{secrets.token_hex(3)}"
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    p = store.r.pipeline()
    p.hset(store.k("tenantcfg", tenant_id), mapping={"name": name, "max_sessions": max_sessions,
                                                      "minutes_per_day": minutes_per_day, "created": time.time()})
    p.set(store.k("apikey", hash_key(key)), tenant_id)
    p.execute()
    return Tenant(tenant_id, name, max_sessions, minutes_per_day), key


def tenant_for_key(store: StateStore, key: str) -> Tenant | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    tenant_id = store.r.get(store.k("apikey", hash_key(key)))
    if tenant_id is None:
        return None
    return get_tenant(store, tenant_id.decode())


def get_tenant(store: StateStore, tenant_id: str) -> Tenant | None:
    raw = store.r.hgetall(store.k("tenantcfg", tenant_id))
    if not raw:
        return None
    d = {k.decode(): v.decode() for k, v in raw.items()}
    return Tenant(tenant_id, d["name"], int(d["max_sessions"]), float(d["minutes_per_day"]))


def active_sessions(store: StateStore, tenant_id: str) -> int:
    return sum(1 for r in store.list_sessions(tenant_id) if r.state in ACTIVE_STATES)
