"""Media out: the session's live fMP4, as one streaming HTTP body or as WebSocket messages.

Both routes serve the same :class:`~services.session_api.media_hub.MediaStream`; they differ only in
framing (the HTTP body is the pieces' bytes back to back; the WebSocket sends a JSON header per piece,
then its bytes).

Both also watch the client while they wait for media: a session that makes none (``idle: "pause"``) sends
nothing for a long time, so a client that went away (closed its socket, sent a WebSocket close) would
otherwise only be noticed at the next send, and until then it would still count as a media client (the
session never idles out and keeps its lane). :func:`while_connected` reads (and drops) the client's
messages beside the stream and ends it at the client's disconnect, whatever the server's ASGI version
(Starlette watches an HTTP client itself only below ASGI spec 2.4).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocketState

from services.common.redis_state import SessionRecord
from services.session_api.deps import StateDep, TenantDep, app_state, session_of, ws_session
from services.session_api.errors import api_error, ws_deny
from services.session_api.media_hub import MediaPiece, MediaStream
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


async def while_connected(stream: MediaStream, receive: Callable[[], Awaitable[dict]],
                          disconnect: str) -> AsyncIterator[MediaPiece]:
    """The stream's pieces until it ends or the client goes away: ``receive`` (the ASGI receive) is read
    beside it, its messages dropped, until one of type ``disconnect`` (or an error) ends the pieces."""

    async def client_gone() -> None:
        try:
            while (await receive())["type"] != disconnect:
                pass
        except Exception:  # noqa: BLE001 - a connection that cannot be read is gone too
            return

    watcher = asyncio.ensure_future(client_gone())
    pieces = aiter(stream)
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(anext(pieces, None))
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                return                                       # the client went away
            piece = nxt.result()
            if piece is None:
                return                                       # the stream ended
            yield piece
    finally:                                                 # (no waiting here: this may run cancelled)
        watcher.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()                                     # ends the pending read, and with it ``pieces``
        else:
            await pieces.aclose()


@router.get("/v1/sessions/{sid}/media.mp4", response_class=StreamingResponse,
            responses={200: {"content": {"video/mp4": {}}, "description": "the live stream as fragmented MP4"},
                       410: {"model": ErrorOut, "description": "the session ended and its media is gone"}})
async def media_http(sid: str, request: Request, st: StateDep, tenant: TenantDep, from_block: int | None = None):
    why = gone(st, await session_of(st, sid, tenant))
    if why:
        raise api_error(410, why)
    stream = open_stream(st, sid, from_block)

    async def body():
        async with stream:
            async with aclosing(while_connected(stream, request.receive, "http.disconnect")) as pieces:
                async for piece in pieces:
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
            async with aclosing(while_connected(stream, ws.receive, "websocket.disconnect")) as pieces:
                async for piece in pieces:
                    await ws.send_json(piece.header())
                    if piece.data:
                        await ws.send_bytes(piece.data)
        if ws.client_state != WebSocketState.DISCONNECTED:   # the stream ended, not the client
            await ws.close()
    except WebSocketDisconnect:
        return
