"""Tenants, API keys and quotas, in Redis.

Keys are ``la_<43 url-safe characters>`` (256 random bits). Only their SHA-256 is stored::

    la:apikey:{sha256(key)}     -> tenant id
    la:tenantcfg:{tenant}       hash  name, max_sessions, minutes_per_day, created

A tenant's id is the name it was created with, unchanged; a second tenant with the same name is refused.
A key is shown once, when it is created, and never logged (the log processor masks the ``la_`` pattern).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from services.common.redis_state import StateStore

KEY_PREFIX = "la_"
#: A tenant name: 1-64 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ACTIVE_STATES = ("created", "preparing", "waiting", "active")


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    name: str
    max_sessions: int
    minutes_per_day: float


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantExistsError(ValueError):
    """A tenant with this name already exists."""


def check_tenant_name(name: str) -> str:
    """``name`` if it is a valid tenant name, else ``ValueError`` saying what a valid one is."""
    if not isinstance(name, str) or TENANT_NAME.fullmatch(name) is None:
        raise ValueError(f"invalid tenant name {name!r}: use 1-64 ASCII letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit")
    return name


def create_tenant(store: StateStore, name: str, max_sessions: int = 4, minutes_per_day: float = 600.0) -> tuple[Tenant, str]:
    """A new tenant whose id is ``name``, and its API key (returned once; only the hash is stored).

    Raises ``ValueError`` for an invalid name or quota, and :class:`TenantExistsError` when the name is taken.
    """
    tenant_id = check_tenant_name(name)
    if max_sessions < 1 or minutes_per_day <= 0:
        raise ValueError("max_sessions must be >= 1 and minutes_per_day > 0")
    cfg = store.k("tenantcfg", tenant_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)

    def claim(pipe) -> None:               # WATCH cfg; a concurrent create of the same name retries and fails
        if pipe.exists(cfg):
            raise TenantExistsError(f"tenant {name!r} already exists; choose another name")
        pipe.multi()
        pipe.hset(cfg, mapping={"name": name, "max_sessions": max_sessions, "minutes_per_day": minutes_per_day,
                                "created": time.time()})
        pipe.set(store.k("apikey", hash_key(key)), tenant_id)

    store.r.transaction(claim, cfg)
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


def list_tenants(store: StateStore) -> list[Tenant]:
    """Every tenant, by name."""
    prefix = store.k("tenantcfg", "")
    ids = sorted(k.decode()[len(prefix):] for k in store.r.scan_iter(match=prefix + "*", count=500))
    return [t for t in (get_tenant(store, i) for i in ids) if t is not None]


def revoke_tenant(store: StateStore, tenant_id: str) -> int:
    """Remove a tenant and every API key of it (they answer 401 from now on); returns the keys removed.

    Raises ``KeyError`` when there is no such tenant. Its usage counters and session records stay until
    they expire; sessions still live get no more audio (their keys are gone) and end at their idle timeout.
    The name can be used again afterwards.
    """
    cfg = store.k("tenantcfg", tenant_id)
    if not store.r.exists(cfg):
        raise KeyError(tenant_id)
    keys = [k for k in store.r.scan_iter(match=store.k("apikey", "*"), count=500)
            if (store.r.get(k) or b"").decode() == tenant_id]
    store.r.delete(cfg, *keys)
    return len(keys)
