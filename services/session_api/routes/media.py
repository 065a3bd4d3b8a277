"""Media out: the session's live fMP4, as one streaming HTTP body or as WebSocket messages.

Both routes serve the same :class:`~services.session_api.media_hub.MediaStream`; they differ only in
framing (the HTTP body is the pieces' bytes back to back; the WebSocket sends a JSON header per piece,
then its bytes).
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from services.common.redis_state import SessionRecord
from services.session_api.deps import StateDep, TenantDep, app_state, session_of, ws_session
from services.session_api.errors import api_error, ws_deny
from services.session_api.media_hub import MediaStream
from services.session_api.schemas import ErrorOut
from services.session_api.state import AppState

router = APIRouter(tags=["media"])


FINISHED_STATES = ("ended", "failed")


def gone(st: AppState, rec: SessionRecord) -> str:
    """Why the media of a finished session is no longer served ("" while it is: live, or still buffered)."""
    if rec.state in FINISHED_STATES and not st.hub.has(rec.session_id):
        return f"session {rec.session_id} has {rec.state}; its media is no longer available"
    return ""


def open_stream(st: AppState, sid: str, from_block: int | None) -> MediaStream:
    return MediaStream(st.hub, sid, from_block, st.runtime(sid))   # counts as a media client here


@router.get("/v1/sessions/{sid}/media.mp4", response_class=StreamingResponse,
            responses={200: {"content": {"video/mp4": {}}, "description": "the live stream as fragmented MP4"},
                       410: {"model": ErrorOut, "description": "the session ended and its media is gone"}})
async def media_http(sid: str, st: StateDep, tenant: TenantDep, from_block: int | None = None):
    why = gone(st, await session_of(st, sid, tenant))
    if why:
        raise api_error(410, why)
    stream = open_stream(st, sid, from_block)

    async def body():
        async with stream:
            async for piece in stream:
                yield piece.data

    return StreamingResponse(body(), media_type="video/mp4")


@router.websocket("/v1/sessions/{sid}/media")
async def ws_media(ws: WebSocket, sid: str, from_block: int | None = None):
    st = app_state(ws)
    found = await ws_session(ws, st, sid, active=False)
    if found is None:
        return
    why = gone(st, found[1])
    if why:
        await ws_deny(ws, 410, why)      # HTTP 410 on the handshake (close code 4410 without the extension)
        return
    await ws.accept()
    try:
        async with open_stream(st, sid, from_block) as stream:
            async for piece in stream:
                await ws.send_json(piece.header())
                if piece.data:
                    await ws.send_bytes(piece.data)
        await ws.close()
    except WebSocketDisconnect:
        return
