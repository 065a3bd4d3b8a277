"""The asyncio client: :class:`AsyncLiveAvatar` -> :class:`AsyncSession` -> audio in, media out.

::

    async with AsyncLiveAvatar("http://127.0.0.1:8000", api_key) as la:
        session = await la.create_session("face.png", {"idle": "pause"})
        async with session.media() as media:
            await session.stream_audio(samples, sample_rate=24000)      # real time, then end of utterance
            async for piece in media:                                    # init, fragment..., end
                ...
        await session.end()
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from liveavatar_client import _http, errors
from liveavatar_client.types import (
    AudioEvent,
    AudioFormatName,
    MediaPiece,
    SessionInfo,
    StreamReport,
    audio_bytes,
    bytes_per_frame,
    options_json,
)


class AsyncLiveAvatar:
    """A tenant's connection to the session API (``base_url`` like ``http://127.0.0.1:8000``)."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0, http: httpx.AsyncClient | None = None):
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self._own = http is None
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=_http.headers(api_key))

    async def __aenter__(self) -> AsyncLiveAvatar:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def request(self, method: str, path: str, **kw) -> httpx.Response:
        """One API call; an error response raises its :class:`~liveavatar_client.errors.ApiError`."""
        r = await self.http.request(method, path, **kw)
        _http.check(r)
        return r

    async def create_session(self, image: _http.ImageSource, options: dict[str, Any] | str | None = None, *,
                             filename: str | None = None, content_type: str | None = None) -> AsyncSession:
        """``POST /v1/sessions`` with an image (bytes or a path) and options (``prompt``, ``seed``, ``idle``, ...)."""
        r = await self.request("POST", "/v1/sessions", files={"image": _http.image_part(image, filename, content_type)},
                               data={"options": options_json(options)})
        info = SessionInfo.of(r.json())
        return AsyncSession(self, info.id, info)

    def session(self, sid: str) -> AsyncSession:
        """A handle on an existing session (no request is made)."""
        return AsyncSession(self, sid)

    async def get_session(self, sid: str) -> SessionInfo:
        return SessionInfo.of((await self.request("GET", f"/v1/sessions/{sid}")).json())

    async def list_sessions(self) -> list[SessionInfo]:
        return [SessionInfo.of(d) for d in (await self.request("GET", "/v1/sessions")).json()]

    async def usage(self) -> dict[str, Any]:
        return (await self.request("GET", "/v1/usage")).json()


class AsyncSession:
    """One session: its controls (end, interrupt, keep-alive, speak, uploads), live audio in, media out."""

    def __init__(self, client: AsyncLiveAvatar, sid: str, info: SessionInfo | None = None):
        self.client, self.id, self.info = client, sid, info

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    # ---- controls ----------------------------------------------------------------------------------

    async def refresh(self) -> SessionInfo:
        self.info = await self.client.get_session(self.id)
        return self.info

    async def wait_until(self, states: tuple[str, ...] = ("active",), timeout_s: float = 120.0,
                         poll_s: float = 0.1) -> SessionInfo:
        """Poll until the session's state is one of ``states``; TimeoutError otherwise. A session that ended
        or failed while waiting for another state raises :class:`~liveavatar_client.errors.Conflict`."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.refresh()
            if info.state in states:
                return info
            if info.state in ("ended", "failed"):
                raise errors.Conflict(409, "conflict", f"session {self.id} is {info.state}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"session {self.id} still {info.state} after {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def end(self) -> None:
        """``DELETE``: end the session (204; ending one that already ended is fine)."""
        await self.client.request("DELETE", f"/v1/sessions/{self.id}")

    async def interrupt(self) -> None:
        """Drop the speech queued but not yet generated; the avatar goes idle."""
        await self.client.request("POST", f"/v1/sessions/{self.id}/interrupt")

    async def keepalive(self) -> None:
        await self.client.request("POST", f"/v1/sessions/{self.id}/keepalive")

    async def send_audio_file(self, audio: _http.AudioFileSource, *, filename: str | None = None,
                              content_type: str | None = None) -> float:
        """Upload a whole utterance (WAV/FLAC/OGG bytes or path); returns the seconds accepted."""
        r = await self.client.request("POST", f"/v1/sessions/{self.id}/audio",
                                      files={"file": _http.audio_part(audio, filename, content_type)})
        return float(r.json()["accepted_seconds"])

    async def speak(self, text: str, *, voice: str | None = None) -> dict[str, Any]:
        """Text in: the API's TTS backend speaks ``text`` as one utterance. Returns ``{"accepted_seconds", ...}``."""
        body: dict[str, Any] = {"text": text}
        if voice is not None:
            body["voice"] = voice
        return (await self.client.request("POST", f"/v1/sessions/{self.id}/speak", json=body)).json()

    # ---- audio in ----------------------------------------------------------------------------------

    def audio(self, sample_rate: int, fmt: AudioFormatName = "pcm16", channels: int = 1) -> AsyncAudioStream:
        """The live audio WebSocket, as ``async with session.audio(24000) as a: await a.send(x); await a.end()``."""
        return AsyncAudioStream(self, sample_rate, fmt, channels)

    async def stream_audio(self, audio: Any, sample_rate: int, *, fmt: AudioFormatName | None = None,
                           channels: int | None = None, chunk_s: float = 0.1, speed: float | None = 1.0,
                           lead_s: float = 0.0, end: bool = True) -> StreamReport:
        """Send one utterance over the audio WebSocket in ``chunk_s`` chunks.

        ``audio``: numpy samples (int16 or float; ``[n]`` or ``[n, channels]``) or bytes (``fmt``, default pcm16).
        Pacing: real time (``speed=1.0``), ``speed`` times faster, or ``speed=None`` as fast as the socket takes
        it; ``lead_s`` seconds of audio go ahead of the schedule at once. The API refuses (429) audio beyond
        its queue limit (10 s by default): the report counts those chunks. ``end`` sends the end of the
        utterance and waits for ``utterance_end``.
        """
        fmt_, ch, data = audio_bytes(audio, fmt, channels)
        async with self.audio(sample_rate, fmt_, ch) as stream:
            await stream.send_paced(data, chunk_s=chunk_s, speed=speed, lead_s=lead_s)
            if end:
                await stream.end()
            return stream.report

    # ---- media out ---------------------------------------------------------------------------------

    def media(self, from_block: int | None = None, *, timeout_s: float | None = None) -> AsyncMediaStream:
        """The live media WebSocket: ``async with session.media() as m: async for piece in m``."""
        return AsyncMediaStream(self, from_block, timeout_s)

    def ws_url(self, what: str, query: dict[str, Any] | None = None) -> str:
        return _http.ws_url(self.client.base_url, self.id, what, query)

    async def _connect(self, what: str, query: dict[str, Any] | None = None) -> ClientConnection:
        try:
            return await connect(self.ws_url(what, query), additional_headers=_http.headers(self.client.api_key),
                                 max_size=None, open_timeout=30)
        except InvalidStatus as exc:
            raise (_http.handshake_error(exc) or exc) from exc


class AsyncAudioStream:
    """The audio WebSocket of a session: the format, then samples, then ``end`` per utterance.

    Messages from the server are read in the background: ``events`` (every one), ``report.refused_chunks``
    (429s: too much audio queued, that chunk was dropped) and ``report.errors`` (the others).
    """

    def __init__(self, session: AsyncSession, sample_rate: int, fmt: AudioFormatName, channels: int):
        self.session, self.sample_rate, self.fmt, self.channels = session, sample_rate, fmt, channels
        self.ws: ClientConnection | None = None
        self.events: list[AudioEvent] = []
        self.report = StreamReport()
        self._ends: asyncio.Queue[AudioEvent | BaseException] = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._closed_error: errors.ApiError | None = None

    async def __aenter__(self) -> AsyncAudioStream:
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        ws = self.ws = await self.session._connect("audio")
        await ws.send(json.dumps({"format": self.fmt, "sample_rate": self.sample_rate, "channels": self.channels}))
        try:
            first = AudioEvent.parse(await asyncio.wait_for(ws.recv(), 30))
        except ConnectionClosed as exc:
            raise (errors.from_ws_close(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")
                   or exc) from exc
        if first.type == "error":
            raise errors.error_for(first.status, None, first.message)
        if first.type != "ready":
            raise errors.ProtocolError(f"expected 'ready' on the audio socket, got {first!r}")
        self._reader = asyncio.create_task(self._read(), name=f"audio-events-{self.session.id}")

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    continue
                ev = AudioEvent.parse(msg)
                self.events.append(ev)
                if ev.type == "utterance_end":
                    await self._ends.put(ev)
                elif ev.type == "error":
                    if ev.status == 429:
                        self.report.refused_chunks += 1
                    else:
                        self.report.errors.append(ev)
        except ConnectionClosed:
            pass
        self._closed_error = errors.from_ws_close(self.ws.close_code, self.ws.close_reason or "")
        await self._ends.put(self._closed_error or ConnectionError("the audio socket closed"))

    async def send(self, audio: Any) -> None:
        """Send samples now (numpy int16/float or bytes in the stream's format)."""
        if self._closed_error is not None:
            raise self._closed_error
        assert self.ws is not None, "open the stream first"
        _, _, data = audio_bytes(audio, self.fmt, self.channels)
        if not data:
            return
        now = time.monotonic()
        if self.report.started_at is None:
            self.report.started_at = now
        await self.ws.send(data)
        self.report.chunks += 1
        self.report.seconds += len(data) / (self.sample_rate * bytes_per_frame(self.fmt, self.channels))
        self.report.sent_at.append((self.report.seconds, now))

    async def send_paced(self, data: bytes, *, chunk_s: float = 0.1, speed: float | None = 1.0,
                         lead_s: float = 0.0) -> None:
        """Send bytes of samples in ``chunk_s`` chunks on a drift-free schedule (see :meth:`AsyncSession.stream_audio`)."""
        t0 = time.monotonic()
        before = 0.0
        for chunk in _http.chunks(data, self.fmt, self.channels, self.sample_rate, chunk_s):
            delay = _http.send_time(t0, before, speed, lead_s) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.send(chunk)
            before += len(chunk) / (self.sample_rate * bytes_per_frame(self.fmt, self.channels))

    async def end(self, timeout_s: float = 60.0) -> AudioEvent:
        """End the utterance and wait for the server's ``utterance_end``."""
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": "end"}))
        ev = await asyncio.wait_for(self._ends.get(), timeout_s)
        if isinstance(ev, BaseException):
            raise ev
        return ev

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()


class AsyncMediaStream:
    """The media WebSocket: :class:`MediaPiece` s in order (init, fragments, end). ``timeout_s``: the longest
    wait for one piece (None: no limit). Iteration stops after the ``end`` piece or when the server closes."""

    def __init__(self, session: AsyncSession, from_block: int | None, timeout_s: float | None):
        self.session, self.from_block, self.timeout_s = session, from_block, timeout_s
        self.ws: ClientConnection | None = None
        self.done = False

    async def __aenter__(self) -> AsyncMediaStream:
        self.ws = await self.session._connect("media", {"from_block": self.from_block})
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    def __aiter__(self) -> AsyncMediaStream:
        return self

    async def __anext__(self) -> MediaPiece:
        if self.done:
            raise StopAsyncIteration
        if self.ws is None:
            await self.__aenter__()
        assert self.ws is not None
        try:
            kind, block, n = _http.media_header(await asyncio.wait_for(self.ws.recv(), self.timeout_s))
            data = await asyncio.wait_for(self.ws.recv(), 30) if n else b""
        except ConnectionClosed as exc:
            self.done = True
            err = errors.from_ws_close(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")
            if err is not None:
                raise err from exc
            raise StopAsyncIteration from None
        if kind == "end":
            self.done = True
        return _http.piece(kind, block, bytes(data))
