"""Plain data the client returns: sessions, media pieces, audio events; and turning audio into frames."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

BLOCK_S = 0.48          # one fragment of video: 12 frames at 25 fps (block 0 of a stream has 9)
FPS = 25
ACTIVE_STATES = ("preparing", "waiting", "active")


@dataclass(frozen=True)
class SessionInfo:
    """``GET /v1/sessions/{id}``: the session's state, lane, size and URLs."""

    id: str
    state: str
    lane: str
    width: int
    height: int
    created: float
    options: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def of(cls, data: dict[str, Any]) -> SessionInfo:
        return cls(id=data["id"], state=data["state"], lane=data.get("lane", ""), width=int(data.get("width", 0)),
                   height=int(data.get("height", 0)), created=float(data.get("created", 0.0)),
                   options=dict(data.get("options") or {}), raw=data)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class MediaPiece:
    """One piece of the media stream: the init segment, a fragment (one block of video), or the end.

    Appending ``data`` of every piece in order gives a playable fragmented MP4.
    """

    type: Literal["init", "fragment", "end"]
    block: int
    data: bytes
    received_at: float = 0.0            # time.monotonic() when its bytes arrived


@dataclass(frozen=True)
class AudioEvent:
    """A message of the audio WebSocket after ``ready``: ``utterance_end`` or ``error`` (status, message)."""

    type: str
    status: int = 0
    message: str = ""

    @classmethod
    def parse(cls, text: str) -> AudioEvent:
        m = json.loads(text)
        return cls(type=m.get("type", ""), status=int(m.get("status", 0) or 0), message=m.get("message", ""))


@dataclass
class StreamReport:
    """What one :meth:`Session.stream_audio` call sent: seconds, chunks, chunks the API refused (429,
    too much audio queued: those samples were dropped) and other errors reported on the socket."""

    seconds: float = 0.0
    chunks: int = 0
    refused_chunks: int = 0
    errors: list[AudioEvent] = field(default_factory=list)
    sent_at: list[tuple[float, float]] = field(default_factory=list)   # (audio seconds so far, monotonic time)
    started_at: float | None = None     # monotonic time of the first chunk sent


def options_json(options: dict[str, Any] | str | None) -> str:
    return options if isinstance(options, str) else json.dumps(options or {})


# ---- audio -> (format, channels, little-endian bytes) ------------------------------------------------

AudioFormatName = Literal["pcm16", "f32"]


def audio_bytes(audio: Any, fmt: AudioFormatName | None = None, channels: int | None = None
                ) -> tuple[AudioFormatName, int, bytes]:
    """``(format, channels, bytes)`` for the audio WebSocket.

    ``audio`` is bytes (``fmt`` says what they hold, default ``pcm16``) or a numpy array: int16 -> ``pcm16``,
    any float -> ``f32`` (clipped to [-1, 1]), other integer types are scaled from their full range to
    ``pcm16``. A 2-D array is ``[samples, channels]``.
    """
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return (fmt or "pcm16"), (channels or 1), bytes(audio)
    import numpy as np

    x = np.asarray(audio)
    if x.ndim == 2:
        channels = x.shape[1]
    elif x.ndim != 1:
        raise ValueError(f"audio must be 1-D [samples] or 2-D [samples, channels], got shape {x.shape}")
    ch = channels or 1
    if x.dtype.kind == "f":
        if fmt == "pcm16":
            return "pcm16", ch, np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
        return "f32", ch, np.clip(x, -1, 1).astype("<f4").tobytes()
    if x.dtype == np.int16:
        if fmt == "f32":
            return "f32", ch, (x.astype("<f4") / 32768.0).tobytes()
        return "pcm16", ch, x.astype("<i2").tobytes()
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        scaled = (x.astype(np.float64) - (info.min + info.max + 1) / 2) / ((info.max - info.min + 1) / 2)
        return audio_bytes(scaled, fmt, channels)
    raise ValueError(f"unsupported audio dtype {x.dtype}")


def bytes_per_frame(fmt: AudioFormatName, channels: int) -> int:
    return (2 if fmt == "pcm16" else 4) * channels
