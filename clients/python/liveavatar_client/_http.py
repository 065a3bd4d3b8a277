"""What the sync and asyncio clients share: URLs, request bodies, response checks, the pacing schedule."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from liveavatar_client import errors
from liveavatar_client.types import MediaPiece, bytes_per_frame

UA = "liveavatar-client/0.1"

ImageSource = bytes | bytearray | str | os.PathLike
AudioFileSource = bytes | bytearray | str | os.PathLike


def headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": UA}


def ws_base(base_url: str) -> str:
    """``http(s)://host:port/prefix`` -> ``ws(s)://host:port/prefix``."""
    u = urlsplit(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    return urlunsplit((scheme, u.netloc, u.path, "", ""))


def ws_url(base_url: str, sid: str, what: str, query: dict[str, Any] | None = None) -> str:
    q = {k: v for k, v in (query or {}).items() if v is not None}
    return f"{ws_base(base_url)}/v1/sessions/{sid}/{what}" + (f"?{urlencode(q)}" if q else "")


def _read(source, what: str) -> tuple[bytes, str | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    path = Path(source)
    return path.read_bytes(), path.name


def image_part(image: ImageSource, filename: str | None, content_type: str | None) -> tuple[str, bytes, str]:
    data, name = _read(image, "image")
    if content_type is None:
        content_type = ("image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg" if data[:3] == b"\xff\xd8\xff"
                        else "image/webp" if data[8:12] == b"WEBP" else "image/bmp" if data[:2] == b"BM"
                        else "application/octet-stream")
    return filename or name or "image", data, content_type


def audio_part(audio: AudioFileSource, filename: str | None, content_type: str | None) -> tuple[str, bytes, str]:
    data, name = _read(audio, "audio")
    if content_type is None:
        content_type = ("audio/wav" if data[:4] == b"RIFF" else "audio/flac" if data[:4] == b"fLaC"
                        else "audio/ogg" if data[:4] == b"OggS" else "application/octet-stream")
    return filename or name or "audio", data, content_type


def check(response) -> None:
    """Raise the typed error for an error response (httpx)."""
    if response.status_code >= 400:
        raise errors.from_body(response.status_code, response.content, response.headers)


def handshake_error(exc: Exception) -> errors.ApiError | None:
    """A refused WebSocket handshake (websockets' InvalidStatus) -> the API's typed error."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        return None
    return errors.from_body(status, getattr(response, "body", b"") or b"", getattr(response, "headers", None))


def media_header(text: str | bytes) -> tuple[str, int, int]:
    """The JSON text header before each media piece -> (type, block, bytes)."""
    if isinstance(text, bytes):
        raise errors.ProtocolError("expected a JSON header on the media socket, got binary data")
    h = json.loads(text)
    if h.get("type") not in ("init", "fragment", "end"):
        raise errors.ProtocolError(f"unknown media message {h!r}")
    return h["type"], int(h.get("block", -1)), int(h.get("bytes", 0))


def piece(kind: str, block: int, data: bytes) -> MediaPiece:
    return MediaPiece(kind, block, data, time.monotonic())  # type: ignore[arg-type]


def chunks(data: bytes, fmt: str, channels: int, sample_rate: int, chunk_s: float) -> list[bytes]:
    """Split samples into ``chunk_s`` pieces at frame boundaries."""
    step = max(1, int(round(sample_rate * chunk_s))) * bytes_per_frame(fmt, channels)  # type: ignore[arg-type]
    return [data[i:i + step] for i in range(0, len(data), step)]


def send_time(t0: float, audio_s_before: float, speed: float | None, lead_s: float) -> float:
    """When a chunk whose audio starts at ``audio_s_before`` goes out: drift-free, ``lead_s`` ahead of real time
    divided by ``speed`` (``speed=None``: at once, as fast as the socket takes it)."""
    if speed is None:
        return 0.0
    return t0 + max(0.0, audio_s_before / speed - lead_s)
