"""The REST session API: tenants' sessions, live audio in, live fMP4 video out, and a small web page.

Everything a session does goes through the bus: the API never imports torch. It records sessions and
images in Redis, puts the session's input events on ``audio`` (start, PCM, end of utterance,
interrupt, end), and serves the session's ``media`` to clients (WebSocket or a streaming HTTP GET).

Errors always have one JSON shape: ``{"error": {"status": 404, "code": "not_found", "message": "..."}}``.
A tenant asking for another tenant's session gets 404, exactly as for a session that does not exist.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.inputs import InputError, Resampler, load_audio, pcm_from_bytes
from services.common.kafka import make_producer
from services.common.logging import get_logger
from services.common.messages import AudioIn
from services.common.redis_state import StateStore
from services.common.session_io import Backpressure, publish_pcm, publish_start, queued_seconds, send
from services.common.settings import LiveAvatarSettings
from services.session_api.media_hub import MediaHub
from services.session_api.tenants import ACTIVE_STATES, Tenant, active_sessions, tenant_for_key

log = get_logger("session-api")
STATIC = Path(__file__).parent / "static"
BLOCK_SAMPLES, RATE = 7680, 16000

REQUESTS = Counter("liveavatar_api_requests_total", "API requests", ["route", "status"])
LATENCY = Histogram("liveavatar_api_request_seconds", "API request latency", ["route"])
SESSIONS = Gauge("liveavatar_active_sessions", "Sessions this process currently holds state for", ["service"])
AUDIO_SECONDS = Counter("liveavatar_api_audio_seconds_total", "Seconds of audio accepted", ["tenant"])


class ApiSettings(LiveAvatarSettings):
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    redis_namespace: str = "la"
    max_upload_bytes: int = Field(10 * 2**20, description="largest image upload")
    max_image_pixels: int = Field(40_000_000, description="largest image (width x height), checked before decoding")
    max_audio_upload_bytes: int = Field(50 * 2**20, description="largest audio file upload")
    max_audio_seconds: float = Field(600.0, description="longest audio file upload")
    min_sample_rate: int = 8000
    max_sample_rate: int = Field(48000, description="highest accepted audio sample rate")
    max_queued_audio_s: float = Field(10.0, description="audio accepted but not yet generated, per session")
    default_idle_timeout_s: float = 60.0
    default_max_duration_s: float = 3600.0
    retry_after_s: int = 5


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


class SessionOptions(BaseModel):
    """Options of a new session, sent as JSON in the multipart field ``options``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    size: Literal["default"] = "default"
    idle: Literal["silence", "pause"] = Field("silence", description="no audio: idle motion at real time, or pause")
    idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    max_duration_s: float = Field(3600.0, gt=0, le=24 * 3600)


class SessionOut(BaseModel):
    id: str
    state: str
    lane: str
    created: float
    options: dict
    width: int
    height: int
    media_ws: str
    media_http: str
    audio_ws: str


class UsageOut(BaseModel):
    tenant: str
    seconds_generated_today: float
    minutes_per_day: float
    active_sessions: int
    max_sessions: int


class AudioFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["pcm16", "f32"]
    sample_rate: int = Field(gt=0)
    channels: int = Field(1, ge=1, le=8)


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


_CODES = {400: "bad_request", 401: "unauthorized", 402: "quota_exhausted", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
          422: "invalid", 429: "too_many_requests", 500: "internal", 503: "unavailable"}


def api_error(status: int, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers)


def _error_response(status: int, message: str, headers=None) -> JSONResponse:
    body = {"error": {"status": status, "code": _CODES.get(status, "error"), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Auth: Authorization: Bearer <key> -> tenant
# ---------------------------------------------------------------------------------------------


def tenant_of(request: Request) -> Tenant:
    header = request.headers.get("authorization")
    if not header or not header.startswith("Bearer "):
        raise api_error(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    tenant = tenant_for_key(request.app.state.la["store"], header[7:].strip())
    if tenant is None:
        raise api_error(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(tenant_of)]


# ---------------------------------------------------------------------------------------------
# Per-session ticker: idle motion, idle timeout, maximum duration
# ---------------------------------------------------------------------------------------------


class SessionRuntime:
    """What this replica tracks for a session it created."""

    def __init__(self, sid: str, tenant: str, opts: SessionOptions):
        self.sid, self.tenant, self.opts = sid, tenant, opts
        self.created = time.monotonic()
        self.last_audio = time.monotonic()
        self.last_activity = time.monotonic()
        self.media_clients = 0
        self.lock = asyncio.Lock()
        self.ended = False
        self.end_reason = ""
        self.task: asyncio.Task | None = None


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    s = settings or ApiSettings()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["store"] = StateStore.from_url(s.redis_url.get_secret_value(), namespace=s.redis_namespace)
        state["producer"] = make_producer(s.kafka_bootstrap)
        state["hub"] = MediaHub(s.kafka_bootstrap).start()
        state["runtimes"] = {}
        await asyncio.get_running_loop().run_in_executor(None, state["hub"].ready.wait, 30)
        log.info("session API ready")
        yield
        for rt in list(state["runtimes"].values()):
            if rt.task:
                rt.task.cancel()
        state["hub"].stop()
        state["producer"].flush()
        state["producer"].close()

    app = FastAPI(title="LiveAvatar session API", version="1.0.0", lifespan=lifespan,
                  responses={k: {"model": ErrorOut} for k in (400, 401, 402, 404, 413, 415, 422, 429)})

    # ---- errors: one shape, the right status, never a 500 for bad input --------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return _error_response(422, msg or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(_req, exc: Exception):
        log.error("unhandled error", error=repr(exc))
        return _error_response(500, "internal error")

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(path, str(response.status_code)).inc()
        LATENCY.labels(path).observe(time.perf_counter() - t0)
        return response

    app.state.la = state

    def session_of(sid: str, tenant: Tenant):
        rec = state["store"].get_session(sid, tenant=tenant.tenant_id) if len(sid) <= 64 else None
        if rec is None:
            raise api_error(404, f"session {sid!r} not found")
        return rec

    def out(rec) -> SessionOut:
        base = f"/v1/sessions/{rec.session_id}"
        return SessionOut(id=rec.session_id, state=rec.state, lane=rec.lane, created=rec.created, options=rec.options,
                          width=rec.width, height=rec.height, media_ws=f"{base}/media", media_http=f"{base}/media.mp4",
                          audio_ws=f"{base}/audio")

    # ---- health, metrics, page -------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        try:
            state["store"].r.ping()
        except Exception:  # noqa: BLE001
            return _error_response(503, "redis unavailable")
        return {"ready": state["hub"].ready.is_set()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        SESSIONS.labels("session-api").set(sum(1 for r in state["runtimes"].values() if not r.ended))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.exists():
            raise api_error(404, "the web page is not built")
        return FileResponse(page)

    @app.get("/examples/{name}", include_in_schema=False)
    async def example(name: str):
        folder = Path(__file__).resolve().parents[2].parent / "shared" / "examples"
        path = folder / name
        if "/" in name or ".." in name or path.suffix not in (".jpg", ".wav") or not path.is_file():
            raise api_error(404, "no such example")
        return FileResponse(path)

    # ---- sessions ---------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201, response_model=SessionOut)
    async def create_session(tenant: TenantDep, image: UploadFile = File(...), options: str = Form("{}")):
        try:
            opts = SessionOptions.model_validate(json.loads(options or "{}"))
        except json.JSONDecodeError as exc:
            raise api_error(400, f"options must be JSON: {exc.msg}") from exc
        except ValidationError as exc:
            msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise api_error(422, f"options: {msg}") from exc
        data = await _read_limited(image, s.max_upload_bytes, "image")
        _check_image(data, s.max_image_pixels)
        store = state["store"]
        if active_sessions(store, tenant.tenant_id) >= tenant.max_sessions:
            raise api_error(429, f"tenant has {tenant.max_sessions} active sessions (its limit)",
                            {"Retry-After": str(s.retry_after_s)})
        if store.get_usage(tenant.tenant_id) >= tenant.minutes_per_day * 60:
            raise api_error(402, f"the tenant's {tenant.minutes_per_day:g} minutes for today are used up")
        sid = "s_" + uuid.uuid4().hex[:20]
        options_dict = opts.model_dump()
        publish_start(store, state["producer"], sid, tenant.tenant_id, data, options_dict)
        state["producer"].flush()
        store.set_cursor(sid, in_seq=0)
        rt = SessionRuntime(sid, tenant.tenant_id, opts)
        rt.task = asyncio.create_task(_ticker(rt))
        state["runtimes"][sid] = rt
        log.info("session created", session_id=sid, tenant_id=tenant.tenant_id)
        return out(store.get_session(sid))

    @app.get("/v1/sessions", response_model=list[SessionOut])
    async def list_sessions(tenant: TenantDep):
        return [out(r) for r in state["store"].list_sessions(tenant.tenant_id)]

    @app.get("/v1/sessions/{sid}", response_model=SessionOut)
    async def get_session(sid: str, tenant: TenantDep):
        return out(session_of(sid, tenant))

    @app.delete("/v1/sessions/{sid}", status_code=204)
    async def delete_session(sid: str, tenant: TenantDep):
        rec = session_of(sid, tenant)
        if rec.state in ACTIVE_STATES:
            await _end(sid, tenant.tenant_id, "deleted")
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/interrupt", status_code=202)
    async def interrupt(sid: str, tenant: TenantDep):
        rec = session_of(sid, tenant)
        _require_active(rec)
        await _event(sid, tenant.tenant_id, "interrupt")
        return {"interrupted": True}

    @app.post("/v1/sessions/{sid}/keepalive")
    async def keepalive(sid: str, tenant: TenantDep):
        rec = session_of(sid, tenant)
        _require_active(rec)
        rt = state["runtimes"].get(sid)
        if rt is not None:
            rt.last_activity = time.monotonic()
        return {"ok": True}

    @app.get("/v1/usage", response_model=UsageOut)
    async def usage(tenant: TenantDep):
        store = state["store"]
        return UsageOut(tenant=tenant.tenant_id, seconds_generated_today=store.get_usage(tenant.tenant_id),
                        minutes_per_day=tenant.minutes_per_day, active_sessions=active_sessions(store, tenant.tenant_id),
                        max_sessions=tenant.max_sessions)

    # ---- audio in -----------------------------------------------------------------------------------
    @app.post("/v1/sessions/{sid}/audio", status_code=202)
    async def post_audio(sid: str, tenant: TenantDep, file: UploadFile = File(...)):
        rec = session_of(sid, tenant)
        _require_active(rec)
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("audio/") or ctype in ("application/octet-stream", "application/ogg")):
            raise api_error(415, f"unsupported media type {ctype!r}: send WAV, FLAC or OGG audio")
        data = await _read_limited(file, s.max_audio_upload_bytes, "audio")
        try:
            pcm = await asyncio.get_running_loop().run_in_executor(None, load_audio, data, s.max_audio_seconds)
        except InputError as exc:      # declared as audio but not decodable: bad content, not a bad type
            raise api_error(400, str(exc)) from exc
        await _push(sid, tenant.tenant_id, pcm)
        await _event(sid, tenant.tenant_id, "end_utterance")
        return {"accepted_seconds": round(len(pcm) / RATE, 3)}

    @app.websocket("/v1/sessions/{sid}/audio")
    async def ws_audio(ws: WebSocket, sid: str):
        tenant = await _ws_tenant(ws)
        if tenant is None:
            return
        rec = state["store"].get_session(sid, tenant=tenant.tenant_id)
        if rec is None:
            await _ws_deny(ws, 404, f"session {sid!r} not found")
            return
        if rec.state not in ACTIVE_STATES:
            await _ws_deny(ws, 409, f"session {sid} is {rec.state}")
            return
        await ws.accept()
        try:
            first = await ws.receive_text()
            try:
                fmt = AudioFormat.model_validate(json.loads(first))
                if not s.min_sample_rate <= fmt.sample_rate <= s.max_sample_rate:
                    raise ValueError(f"sample_rate must be in [{s.min_sample_rate}, {s.max_sample_rate}]")
            except (ValueError, json.JSONDecodeError) as exc:
                await ws.send_json({"type": "error", "status": 422, "message": f"bad audio format message: {exc}"})
                await ws.close(code=4422)
                return
            resampler = Resampler(fmt.sample_rate, RATE) if fmt.sample_rate != RATE else None
            rs_state = resampler.new_state() if resampler else None
            await ws.send_json({"type": "ready"})
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("bytes") is not None:
                    try:
                        pcm = pcm_from_bytes(msg["bytes"], fmt.format, RATE if resampler else fmt.sample_rate,
                                             fmt.channels)
                    except InputError as exc:
                        await ws.send_json({"type": "error", "status": 400, "message": str(exc)})
                        continue
                    if resampler is not None:
                        pcm = resampler.push(rs_state, pcm.astype(np.float64)).astype(np.float32)
                    try:
                        await _push(sid, tenant.tenant_id, pcm)
                    except HTTPException as exc:
                        await ws.send_json({"type": "error", "status": exc.status_code, "message": exc.detail})
                        if exc.status_code == 429:
                            continue                     # refused clearly; the client may retry slower
                        await ws.close(code=4000 + exc.status_code)
                        return
                elif msg.get("text") is not None:
                    try:
                        control = json.loads(msg["text"])
                    except json.JSONDecodeError:
                        control = {}
                    if control.get("type") == "end":
                        if resampler is not None:
                            tail = resampler.flush(rs_state).astype(np.float32)
                            if len(tail):
                                await _push(sid, tenant.tenant_id, tail)
                        await _event(sid, tenant.tenant_id, "end_utterance")
                        await ws.send_json({"type": "utterance_end"})
                    else:
                        await ws.send_json({"type": "error", "status": 400, "message": "unknown control message"})
        except WebSocketDisconnect:
            return

    # ---- media out ----------------------------------------------------------------------------------
    @app.get("/v1/sessions/{sid}/media.mp4")
    async def media_http(sid: str, tenant: TenantDep, from_block: int | None = None):
        session_of(sid, tenant)
        rt = state["runtimes"].get(sid)

        async def body():
            if rt:
                rt.media_clients += 1
            try:
                async for _kind, _block, data in state["hub"].stream(sid, from_block):
                    if rt:
                        rt.last_activity = time.monotonic()
                    yield data
            finally:
                if rt:
                    rt.media_clients -= 1

        return StreamingResponse(body(), media_type="video/mp4")

    @app.websocket("/v1/sessions/{sid}/media")
    async def ws_media(ws: WebSocket, sid: str, from_block: int | None = None):
        tenant = await _ws_tenant(ws)
        if tenant is None:
            return
        if state["store"].get_session(sid, tenant=tenant.tenant_id) is None:
            await _ws_deny(ws, 404, f"session {sid!r} not found")
            return
        await ws.accept()
        rt = state["runtimes"].get(sid)
        if rt:
            rt.media_clients += 1
        try:
            async for kind, block, data in state["hub"].stream(sid, from_block):
                if rt:
                    rt.last_activity = time.monotonic()
                await ws.send_json({"type": kind, "block": block, "bytes": len(data)})
                if data:
                    await ws.send_bytes(data)
            await ws.close()
        except WebSocketDisconnect:
            return
        finally:
            if rt:
                rt.media_clients -= 1

    # ---- helpers that need the app state ---------------------------------------------------------------
    async def _ws_tenant(ws: WebSocket) -> Tenant | None:
        key = ws.headers.get("authorization", "")
        key = key[7:].strip() if key.startswith("Bearer ") else ws.query_params.get("key", "")
        tenant = tenant_for_key(state["store"], key) if key else None
        if tenant is None:
            await _ws_deny(ws, 401, "missing or invalid API key")
        return tenant

    async def _ws_deny(ws: WebSocket, status: int, message: str) -> None:
        """Refuse a WebSocket handshake with a real HTTP status and the usual JSON error body."""
        try:
            await ws.send_denial_response(_error_response(status, message))
        except RuntimeError:    # the server lacks the denial-response extension: close instead
            await ws.close(code=4000 + status, reason=message)

    def _require_active(rec) -> None:
        if rec.state not in ACTIVE_STATES:
            raise api_error(409, f"session {rec.session_id} is {rec.state}")

    def _next_seqs(sid: str, n: int) -> int:
        """Reserve n consecutive input sequence numbers for the session (shared by every replica)."""
        store = state["store"]
        last = store.r.hincrby(store.k("cursor", sid), "in_seq", n)
        return last - n + 1

    async def _push(sid: str, tenant: str, pcm: np.ndarray) -> None:
        rt = state["runtimes"].get(sid)
        lock = rt.lock if rt else asyncio.Lock()
        async with lock:
            store, producer = state["store"], state["producer"]
            chunk = 3200
            n = -(-len(pcm) // chunk)
            if n == 0:
                return
            if queued_seconds(store, sid) > s.max_queued_audio_s:
                raise api_error(429, f"{queued_seconds(store, sid):.1f} s of audio already queued (limit "
                                     f"{s.max_queued_audio_s:g} s): send audio no faster than real time",
                                {"Retry-After": "1"})
            try:
                publish_pcm(producer, sid, tenant, pcm, _next_seqs(sid, n), chunk=chunk, store=store)
            except Backpressure as exc:
                raise api_error(429, str(exc), {"Retry-After": "1"}) from exc
            producer.flush()
            AUDIO_SECONDS.labels(tenant).inc(len(pcm) / RATE)
            if rt:
                rt.last_audio = rt.last_activity = time.monotonic()

    async def _event(sid: str, tenant: str, kind: str) -> None:
        send(state["producer"], AudioIn(session_id=sid, tenant_id=tenant, seq=_next_seqs(sid, 1), kind=kind))
        state["producer"].flush()

    async def _end(sid: str, tenant: str, reason: str) -> None:
        rt = state["runtimes"].get(sid)
        if rt is not None:
            if rt.ended:
                return
            rt.ended, rt.end_reason = True, reason
        await _event(sid, tenant, "end")
        state["store"].update_session(sid, state="ending", error=reason if reason != "deleted" else "")
        log.info("session ending", session_id=sid, tenant_id=tenant, reason=reason)

    async def _ticker(rt: SessionRuntime) -> None:
        """Idle motion at real time, idle timeout, maximum duration."""
        silence = np.zeros(BLOCK_SAMPLES, np.float32)
        try:
            while not rt.ended:
                await asyncio.sleep(0.1)
                now = time.monotonic()
                if now - rt.created > rt.opts.max_duration_s:
                    await _end(rt.sid, rt.tenant, "max_duration")
                    return
                idle_since = now - (rt.last_activity if rt.media_clients == 0 else now)
                if idle_since > rt.opts.idle_timeout_s:
                    await _end(rt.sid, rt.tenant, "idle_timeout")
                    return
                rec = state["store"].get_session(rt.sid)
                if rec is None or rec.state not in ACTIVE_STATES:
                    return
                if (rt.opts.idle == "silence" and rec.state == "active" and now - rt.last_audio >= 0.48
                        and queued_seconds(state["store"], rt.sid) < 0.5):
                    last_activity = rt.last_activity
                    await _push(rt.sid, rt.tenant, silence)     # keeps the avatar alive, at real time
                    rt.last_activity = last_activity           # idle motion is not activity
                    rt.last_audio = now
        except asyncio.CancelledError:
            return

    return app


async def _read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise api_error(413, f"{what} upload larger than {limit} bytes")
    if not data:
        raise api_error(400, f"empty {what} upload")
    return data


def _check_image(data: bytes, max_pixels: int) -> None:
    """Decode the header (and then the whole image) without torch; map problems to 413/415/400."""
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
