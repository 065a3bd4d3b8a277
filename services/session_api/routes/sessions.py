"""Sessions: create (image + options), list, get, delete, interrupt, keep-alive."""

from __future__ import annotations

import io
import json
import uuid

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import ValidationError

from models.inputs import InputError
from services.common.logging import get_logger
from services.session_api import bus
from services.session_api.deps import StateDep, TenantDep, require_active, session_of
from services.session_api.errors import api_error, describe
from services.session_api.schemas import Interrupted, KeptAlive, SessionOptions, SessionOut
from services.session_api.settings import ApiSettings
from services.session_api.tenants import ACTIVE_STATES, active_sessions

log = get_logger("session-api")
router = APIRouter(tags=["sessions"])


def parse_options(raw: str, settings: ApiSettings) -> SessionOptions:
    """The multipart ``options`` field: JSON, validated; the settings' defaults fill what it leaves out."""
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise api_error(400, f"options must be JSON: {exc.msg}") from exc
    if isinstance(data, dict):
        data.setdefault("idle_timeout_s", settings.default_idle_timeout_s)
        data.setdefault("max_duration_s", settings.default_max_duration_s)
    try:
        return SessionOptions.model_validate(data)
    except ValidationError as exc:
        raise api_error(422, f"options: {describe(exc)}") from exc


async def read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise api_error(413, f"{what} upload larger than {limit} bytes")
    if not data:
        raise api_error(400, f"empty {what} upload")
    return data


def check_image(data: bytes, max_pixels: int) -> None:
    """Decode the header (and then the whole image) without torch; map problems to 413/415/400. Blocking."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            w, h = img.size
    except UnidentifiedImageError as exc:
        raise api_error(415, "the image is not a JPEG, PNG, WebP or BMP file") from exc
    except Exception as exc:  # noqa: BLE001 - any header-level failure is bad input
        raise api_error(400, f"unreadable image: {exc}") from exc
    if fmt not in ("JPEG", "PNG", "WEBP", "BMP"):
        raise api_error(415, f"unsupported image format {fmt}: send JPEG, PNG, WebP or BMP")
    if w * h > max_pixels:
        raise api_error(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    from models.inputs import load_image

    try:
        load_image(data, max_pixels)
    except InputError as exc:
        raise api_error(400, str(exc)) from exc


def _admit(st, tenant) -> str | None:
    """Blocking: why the tenant may not start another session now (None: it may)."""
    if active_sessions(st.store, tenant.tenant_id) >= tenant.max_sessions:
        return "sessions"
    if st.store.get_usage(tenant.tenant_id) >= tenant.minutes_per_day * 60:
        return "minutes"
    return None


@router.post("/v1/sessions", status_code=201, response_model=SessionOut)
async def create_session(st: StateDep, tenant: TenantDep, image: UploadFile = File(...), options: str = Form("{}")):
    s = st.settings
    opts = parse_options(options, s)
    data = await read_limited(image, s.max_upload_bytes, "image")
    await st.io(check_image, data, s.max_image_pixels)
    refused = await st.io(_admit, st, tenant)
    if refused == "sessions":
        raise api_error(429, f"tenant has {tenant.max_sessions} active sessions (its limit)",
                        {"Retry-After": str(s.retry_after_s)})
    if refused == "minutes":
        raise api_error(402, f"the tenant's {tenant.minutes_per_day:g} minutes for today are used up")
    sid = "s_" + uuid.uuid4().hex[:20]
    await bus.start_session(st, sid, tenant.tenant_id, data, opts)
    log.info("session created", session_id=sid, tenant_id=tenant.tenant_id)
    return SessionOut.of(await st.io(st.store.get_session, sid))


@router.get("/v1/sessions", response_model=list[SessionOut])
async def list_sessions(st: StateDep, tenant: TenantDep):
    return [SessionOut.of(r) for r in await st.io(st.store.list_sessions, tenant.tenant_id)]


@router.get("/v1/sessions/{sid}", response_model=SessionOut)
async def get_session(sid: str, st: StateDep, tenant: TenantDep):
    return SessionOut.of(await session_of(st, sid, tenant))


@router.delete("/v1/sessions/{sid}", status_code=204)
async def delete_session(sid: str, st: StateDep, tenant: TenantDep):
    rec = await session_of(st, sid, tenant)
    if rec.state in ACTIVE_STATES:
        await bus.end_session(st, sid, tenant.tenant_id, "deleted")
    return Response(status_code=204)


@router.post("/v1/sessions/{sid}/interrupt", status_code=202, response_model=Interrupted)
async def interrupt(sid: str, st: StateDep, tenant: TenantDep):
    require_active(await session_of(st, sid, tenant))
    await bus.send_event(st, sid, tenant.tenant_id, "interrupt")
    return Interrupted()


@router.post("/v1/sessions/{sid}/keepalive", response_model=KeptAlive)
async def keepalive(sid: str, st: StateDep, tenant: TenantDep):
    require_active(await session_of(st, sid, tenant))
    await bus.keep_alive(st, sid)
    return KeptAlive()
