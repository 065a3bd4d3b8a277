"""The session API's request and response models (pydantic). Requests forbid unknown fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.redis_state import SessionRecord

# ---- requests --------------------------------------------------------------------------------------


class SessionOptions(BaseModel):
    """Options of a new session, sent as JSON in the multipart field ``options``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    size: Literal["default"] = "default"
    idle: Literal["silence", "pause"] = Field("silence", description="no audio: idle motion at real time, or pause")
    idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    max_duration_s: float = Field(3600.0, gt=0, le=24 * 3600)


class AudioFormat(BaseModel):
    """The first message on the audio WebSocket: how the binary frames that follow are encoded."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["pcm16", "f32"]
    sample_rate: int = Field(gt=0)
    channels: int = Field(1, ge=1, le=8)


class AudioControl(BaseModel):
    """A text message on the audio WebSocket after the format: ``{"type": "end"}`` ends an utterance."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["end"]


# ---- responses -------------------------------------------------------------------------------------


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

    @classmethod
    def of(cls, rec: SessionRecord) -> SessionOut:
        base = f"/v1/sessions/{rec.session_id}"
        return cls(id=rec.session_id, state=rec.state, lane=rec.lane, created=rec.created, options=rec.options,
                   width=rec.width, height=rec.height, media_ws=f"{base}/media", media_http=f"{base}/media.mp4",
                   audio_ws=f"{base}/audio")


class UsageOut(BaseModel):
    """The tenant's metering for the current UTC day: video generated (seconds and 0.48 s blocks) against
    its quota, and its sessions."""

    tenant: str
    day: str = Field(description="the UTC day counted, YYYYMMDD")
    seconds_generated_today: float
    blocks_generated_today: int
    minutes_per_day: float
    active_sessions: int
    max_sessions: int


class AudioAccepted(BaseModel):
    accepted_seconds: float = Field(description="seconds of 16 kHz audio put on the bus")


class Interrupted(BaseModel):
    interrupted: bool = True


class KeptAlive(BaseModel):
    ok: bool = True


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorOut(BaseModel):
    """Every error of the API, HTTP or WebSocket handshake: ``{"error": {"status", "code", "message"}}``."""

    error: ErrorBody
