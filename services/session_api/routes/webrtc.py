"""WebRTC out: ``POST /v1/sessions/{id}/webrtc`` answers an SDP offer with one video and one audio track
carrying the session's live media (``services/session_api/webrtc.py``; needs the ``aiortc`` package)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from services.session_api.deps import StateDep, TenantDep, require_active, session_of
from services.session_api.errors import api_error
from services.session_api.media_hub import MediaStream

router = APIRouter(tags=["media"])

MAX_PEERS_PER_SESSION = 4


class WebRTCOffer(BaseModel):
    """The client's SDP offer; it must receive (``recvonly``) one video and one audio track."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["offer"]
    sdp: str = Field(min_length=1, max_length=65536)


class WebRTCAnswer(BaseModel):
    type: Literal["answer"] = "answer"
    sdp: str


def live_edge(hub, sid: str) -> int:
    """The newest block the hub holds for the session (a new viewer starts there), or 0 when it holds none
    yet: the stream's first block. (Not None: for the hub that means "after the last block delivered to any
    client of the session", so a peer that connected before the first block could skip the blocks a media
    WebSocket client had already received.)"""
    with hub.lock:
        sm = hub.sessions.get(sid)
        return sm.last_block if sm is not None and sm.last_block >= 0 else 0


@router.post("/v1/sessions/{sid}/webrtc", response_model=WebRTCAnswer,
             responses={503: {"description": "WebRTC is not available here (aiortc is not installed)"}})
async def webrtc_offer(sid: str, offer: WebRTCOffer, st: StateDep, tenant: TenantDep):
    require_active(await session_of(st, sid, tenant))
    try:
        from services.session_api import webrtc
    except ImportError as exc:
        raise api_error(503, f"WebRTC is not available here: {exc}") from exc
    if len(webrtc.PEERS.get(sid, ())) >= MAX_PEERS_PER_SESSION:
        raise api_error(429, f"the session already has {MAX_PEERS_PER_SESSION} WebRTC peers")
    stream = MediaStream(st.hub, sid, live_edge(st.hub, sid), st.runtime(sid))
    peer = webrtc.SessionPeer(sid, stream)
    try:
        sdp = await peer.answer(offer.sdp)
    except Exception as exc:  # noqa: BLE001 - a malformed or unusable offer is the client's error
        await peer.close()
        raise api_error(400, f"unusable offer: {exc}") from exc
    return WebRTCAnswer(sdp=sdp)
