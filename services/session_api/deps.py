"""Request dependencies: the app state, the caller's tenant (API key), and the caller's session."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, WebSocket
from starlette.requests import HTTPConnection

from services.common.redis_state import SessionRecord
from services.session_api.errors import api_error, ws_deny
from services.session_api.state import AppState
from services.session_api.tenants import ACTIVE_STATES, Tenant, tenant_for_key

MAX_SID_LEN = 64


def app_state(conn: HTTPConnection) -> AppState:
    return conn.app.state.la


StateDep = Annotated[AppState, Depends(app_state)]


async def tenant_of(conn: HTTPConnection, st: StateDep) -> Tenant:
    """``Authorization: Bearer <key>`` -> the key's tenant, else 401."""
    header = conn.headers.get("authorization")
    if not header or not header.startswith("Bearer "):
        raise api_error(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    tenant = await st.io(tenant_for_key, st.store, header[7:].strip())
    if tenant is None:
        raise api_error(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(tenant_of)]


async def session_of(st: AppState, sid: str, tenant: Tenant) -> SessionRecord:
    """The tenant's session ``sid``; 404 when it does not exist or belongs to another tenant."""
    rec = await st.io(st.store.get_session, sid, tenant=tenant.tenant_id) if len(sid) <= MAX_SID_LEN else None
    if rec is None:
        raise api_error(404, f"session {sid!r} not found")
    return rec


def require_active(rec: SessionRecord) -> None:
    if rec.state not in ACTIVE_STATES:
        raise api_error(409, f"session {rec.session_id} is {rec.state}")


async def ws_tenant(ws: WebSocket, st: AppState) -> Tenant | None:
    """The tenant of a WebSocket (``Authorization`` header, or ``?key=`` since browsers cannot set headers);
    None after refusing the handshake with 401."""
    key = ws.headers.get("authorization", "")
    key = key[7:].strip() if key.startswith("Bearer ") else ws.query_params.get("key", "")
    tenant = await st.io(tenant_for_key, st.store, key) if key else None
    if tenant is None:
        await ws_deny(ws, 401, "missing or invalid API key")
    return tenant


async def ws_session(ws: WebSocket, st: AppState, sid: str, *, active: bool) -> tuple[Tenant, SessionRecord] | None:
    """Authenticate a WebSocket and look up its session (active, if asked); None after refusing it."""
    tenant = await ws_tenant(ws, st)
    if tenant is None:
        return None
    rec = await st.io(st.store.get_session, sid, tenant=tenant.tenant_id) if len(sid) <= MAX_SID_LEN else None
    if rec is None:
        await ws_deny(ws, 404, f"session {sid!r} not found")
        return None
    if active and rec.state not in ACTIVE_STATES:
        await ws_deny(ws, 409, f"session {sid} is {rec.state}")
        return None
    return tenant, rec
