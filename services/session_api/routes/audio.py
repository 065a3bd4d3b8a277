"""Audio in: a whole utterance as a file upload, or live audio over the audio WebSocket."""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, File, HTTPException, UploadFile, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from models.inputs import InputError, Resampler, load_audio, pcm_from_bytes
from services.common.logging import get_logger
from services.session_api import bus
from services.session_api.deps import StateDep, TenantDep, app_state, require_active, session_of, ws_session
from services.session_api.errors import api_error, describe
from services.session_api.routes.sessions import read_limited
from services.session_api.schemas import AudioAccepted, AudioControl, AudioFormat

router = APIRouter(tags=["audio"])
log = get_logger("session-api")

AUDIO_TYPES = ("application/octet-stream", "application/ogg")


@router.post("/v1/sessions/{sid}/audio", status_code=202, response_model=AudioAccepted)
async def post_audio(sid: str, st: StateDep, tenant: TenantDep, file: UploadFile = File(...)):
    require_active(await session_of(st, sid, tenant))
    ctype = (file.content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("audio/") or ctype in AUDIO_TYPES):
        raise api_error(415, f"unsupported media type {ctype!r}: send WAV, FLAC or OGG audio")
    data = await read_limited(file, st.settings.max_audio_upload_bytes, "audio")
    try:
        pcm = await st.io(load_audio, data, st.settings.max_audio_seconds)
    except InputError as exc:      # declared as audio but not decodable: bad content, not a bad type
        raise api_error(400, str(exc)) from exc
    await bus.push_pcm(st, sid, tenant.tenant_id, pcm)
    await bus.send_event(st, sid, tenant.tenant_id, "end_utterance")
    return AudioAccepted(accepted_seconds=round(len(pcm) / bus.RATE, 3))


@router.websocket("/v1/sessions/{sid}/audio")
async def ws_audio(ws: WebSocket, sid: str):
    st = app_state(ws)
    found = await ws_session(ws, st, sid, active=True)
    if found is None:
        return
    tenant_id = found[0].tenant_id
    s = st.settings
    await ws.accept()
    open_utterance = False                   # audio sent since the last end of utterance
    try:
        # 1. The format message.
        first = await ws.receive()
        if first["type"] == "websocket.disconnect":
            return
        try:
            if first.get("text") is None:
                raise ValueError("the first message must be text (JSON)")
            fmt = AudioFormat.model_validate(json.loads(first["text"]))
            if not s.min_sample_rate <= fmt.sample_rate <= s.max_sample_rate:
                raise ValueError(f"sample_rate must be in [{s.min_sample_rate}, {s.max_sample_rate}]")
        except (ValueError, json.JSONDecodeError) as exc:     # pydantic's ValidationError is a ValueError
            msg = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            await ws.send_json({"type": "error", "status": 422, "message": f"bad audio format message: {msg}"})
            await ws.close(code=4422)
            return
        resampler = Resampler(fmt.sample_rate, bus.RATE) if fmt.sample_rate != bus.RATE else None
        rs_state = resampler.new_state() if resampler else None
        await ws.send_json({"type": "ready"})

        async def end_utterance() -> None:
            """The resampler's tail, then ``end_utterance`` (flushed): the partial block is generated now.
            The resampler starts afresh for the socket's next utterance."""
            nonlocal rs_state
            if resampler is not None:
                tail = resampler.flush(rs_state).astype(np.float32)
                rs_state = resampler.new_state()
                if len(tail):
                    await bus.push_pcm(st, sid, tenant_id, tail)
            await bus.send_event(st, sid, tenant_id, "end_utterance")

        # 2. Binary frames of samples, and {"type": "end"} at the end of each utterance. A socket that
        # closes in the middle of an utterance ends it too: no more of its audio can come on this socket,
        # and its last partial block must not wait for audio that never comes.
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                if open_utterance:
                    await _quietly(end_utterance())
                return
            if msg.get("bytes") is not None:
                try:
                    pcm = pcm_from_bytes(msg["bytes"], fmt.format, bus.RATE if resampler else fmt.sample_rate,
                                         fmt.channels)
                except InputError as exc:
                    await ws.send_json({"type": "error", "status": 400, "message": str(exc)})
                    continue
                if resampler is not None:
                    pcm = resampler.push(rs_state, pcm.astype(np.float64)).astype(np.float32)
                try:
                    await bus.push_pcm(st, sid, tenant_id, pcm)
                    open_utterance = open_utterance or len(pcm) > 0
                except HTTPException as exc:
                    await ws.send_json({"type": "error", "status": exc.status_code, "message": exc.detail})
                    if exc.status_code == 429:
                        continue                     # refused clearly; the client may retry slower
                    await ws.close(code=4000 + exc.status_code)
                    return
            elif msg.get("text") is not None:
                try:
                    AudioControl.model_validate_json(msg["text"])
                except ValidationError:
                    await ws.send_json({"type": "error", "status": 400, "message": "unknown control message"})
                    continue
                open_utterance = False
                try:
                    await end_utterance()        # on the bus before the client is told (it may be gone)
                except HTTPException as exc:     # the session is ending (409): nothing more goes on the bus
                    await ws.send_json({"type": "error", "status": exc.status_code, "message": exc.detail})
                    await ws.close(code=4000 + exc.status_code)
                    return
                await ws.send_json({"type": "utterance_end"})
    except WebSocketDisconnect:
        if open_utterance:
            await _quietly(end_utterance())
        return


async def _quietly(step) -> None:
    """Run a step for a client that is gone: a refusal (e.g. 429) has nobody to go to."""
    try:
        await step
    except HTTPException as exc:
        log.info("audio socket closed: end of utterance refused", status=exc.status_code, detail=exc.detail)
