"""The blocking client, for scripts, tests and threads: :class:`LiveAvatar` -> :class:`Session`.

The same calls as :mod:`liveavatar_client.aio`, without ``await``::

    with LiveAvatar("http://127.0.0.1:8000", api_key) as la:
        session = la.create_session("face.png", {"idle": "pause"})
        report = session.stream_audio(samples, sample_rate=24000)     # real time, then end of utterance
        for piece in session.media(timeout_s=60):                       # init, fragment..., end
            ...
        session.end()

A media stream and an audio stream may be used from two threads at once (one each).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

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


class LiveAvatar:
    """A tenant's connection to the session API (``base_url`` like ``http://127.0.0.1:8000``)."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0, http: httpx.Client | None = None):
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self._own = http is None
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout, headers=_http.headers(api_key))

    def __enter__(self) -> LiveAvatar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """One API call; an error response raises its :class:`~liveavatar_client.errors.ApiError`."""
        r = self.http.request(method, path, **kw)
        _http.check(r)
        return r

    def create_session(self, image: _http.ImageSource, options: dict[str, Any] | str | None = None, *,
                       filename: str | None = None, content_type: str | None = None) -> Session:
        """``POST /v1/sessions`` with an image (bytes or a path) and options (``prompt``, ``seed``, ``idle``, ...)."""
        r = self.request("POST", "/v1/sessions", files={"image": _http.image_part(image, filename, content_type)},
                         data={"options": options_json(options)})
        info = SessionInfo.of(r.json())
        return Session(self, info.id, info)

    def session(self, sid: str) -> Session:
        """A handle on an existing session (no request is made)."""
        return Session(self, sid)

    def get_session(self, sid: str) -> SessionInfo:
        return SessionInfo.of(self.request("GET", f"/v1/sessions/{sid}").json())

    def list_sessions(self) -> list[SessionInfo]:
        return [SessionInfo.of(d) for d in self.request("GET", "/v1/sessions").json()]

    def usage(self) -> dict[str, Any]:
        return self.request("GET", "/v1/usage").json()


class Session:
    """One session: its controls (end, interrupt, keep-alive, speak, uploads), live audio in, media out."""

    def __init__(self, client: LiveAvatar, sid: str, info: SessionInfo | None = None):
        self.client, self.id, self.info = client, sid, info

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    # ---- controls ----------------------------------------------------------------------------------

    def refresh(self) -> SessionInfo:
        self.info = self.client.get_session(self.id)
        return self.info

    def wait_until(self, states: tuple[str, ...] = ("active",), timeout_s: float = 120.0,
                   poll_s: float = 0.05) -> SessionInfo:
        """Poll until the session's state is one of ``states`` (see :meth:`AsyncSession.wait_until`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.refresh()
            if info.state in states:
                return info
            if info.state in ("ended", "failed"):
                raise errors.Conflict(409, "conflict", f"session {self.id} is {info.state}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"session {self.id} still {info.state} after {timeout_s} s")
            time.sleep(poll_s)

    def end(self) -> None:
        self.client.request("DELETE", f"/v1/sessions/{self.id}")

    def interrupt(self) -> None:
        self.client.request("POST", f"/v1/sessions/{self.id}/interrupt")

    def keepalive(self) -> None:
        self.client.request("POST", f"/v1/sessions/{self.id}/keepalive")

    def send_audio_file(self, audio: _http.AudioFileSource, *, filename: str | None = None,
                        content_type: str | None = None) -> float:
        """Upload a whole utterance (WAV/FLAC/OGG bytes or path); returns the seconds accepted."""
        r = self.client.request("POST", f"/v1/sessions/{self.id}/audio",
                                files={"file": _http.audio_part(audio, filename, content_type)})
        return float(r.json()["accepted_seconds"])

    def speak(self, text: str, *, voice: str | None = None) -> dict[str, Any]:
        """Text in: the API's TTS backend speaks ``text`` as one utterance. Returns ``{"accepted_seconds", ...}``."""
        body: dict[str, Any] = {"text": text}
        if voice is not None:
            body["voice"] = voice
        return self.client.request("POST", f"/v1/sessions/{self.id}/speak", json=body).json()

    # ---- audio in ----------------------------------------------------------------------------------

    def audio(self, sample_rate: int, fmt: AudioFormatName = "pcm16", channels: int = 1) -> AudioStream:
        """The live audio WebSocket: ``with session.audio(24000) as a: a.send(x); a.end()``."""
        return AudioStream(self, sample_rate, fmt, channels)

    def stream_audio(self, audio: Any, sample_rate: int, *, fmt: AudioFormatName | None = None,
                     channels: int | None = None, chunk_s: float = 0.1, speed: float | None = 1.0,
                     lead_s: float = 0.0, end: bool = True, end_timeout_s: float = 60.0) -> StreamReport:
        """Send one utterance over the audio WebSocket (see :meth:`AsyncSession.stream_audio`)."""
        fmt_, ch, data = audio_bytes(audio, fmt, channels)
        with self.audio(sample_rate, fmt_, ch) as stream:
            stream.send_paced(data, chunk_s=chunk_s, speed=speed, lead_s=lead_s)
            if end:
                stream.end(end_timeout_s)
            return stream.report

    # ---- media out ---------------------------------------------------------------------------------

    def media(self, from_block: int | None = None, *, timeout_s: float | None = None) -> MediaStream:
        """The live media WebSocket: ``with session.media() as m: for piece in m``. ``timeout_s``: the longest
        wait for one piece (TimeoutError)."""
        return MediaStream(self, from_block, timeout_s)

    def read_media(self, until_block: int | None = None, *, timeout_s: float = 180.0,
                   from_block: int | None = None) -> tuple[bytes, list[MediaPiece]]:
        """(init segment, fragments and the end piece) read until block ``until_block`` or the end of the
        stream, within ``timeout_s`` in all."""
        init, pieces = b"", []
        deadline = time.monotonic() + timeout_s
        with self.media(from_block, timeout_s=timeout_s) as stream:
            for p in stream:
                if p.type == "init":
                    init = p.data
                else:
                    pieces.append(p)
                    if p.type == "end" or (until_block is not None and p.block >= until_block):
                        return init, pieces
                if time.monotonic() > deadline:
                    break
        if until_block is None and stream.done:
            return init, pieces
        raise TimeoutError(f"media of {self.id} did not reach block {until_block} in {timeout_s} s")

    def ws_url(self, what: str, query: dict[str, Any] | None = None) -> str:
        return _http.ws_url(self.client.base_url, self.id, what, query)

    def _connect(self, what: str, query: dict[str, Any] | None = None) -> ClientConnection:
        try:
            # entered by hand: the caller's stream object closes it (websockets >= 17 wants connect() entered)
            return connect(self.ws_url(what, query), additional_headers=_http.headers(self.client.api_key),
                           max_size=None, open_timeout=30).__enter__()
        except InvalidStatus as exc:
            raise (_http.handshake_error(exc) or exc) from exc


def _close_error(exc: ConnectionClosed) -> errors.ApiError | None:
    return errors.from_ws_close(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")


class AudioStream:
    """The audio WebSocket of a session: the format, then samples, then ``end`` per utterance.

    Server messages are read between sends: ``events`` (every one), ``report.refused_chunks`` (429s: too
    much audio queued, that chunk was dropped) and ``report.errors`` (the others).
    """

    def __init__(self, session: Session, sample_rate: int, fmt: AudioFormatName, channels: int):
        self.session, self.sample_rate, self.fmt, self.channels = session, sample_rate, fmt, channels
        self.ws: ClientConnection | None = None
        self.events: list[AudioEvent] = []
        self.report = StreamReport()
        self._ends = 0

    def __enter__(self) -> AudioStream:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        ws = self.ws = self.session._connect("audio")
        ws.send(json.dumps({"format": self.fmt, "sample_rate": self.sample_rate, "channels": self.channels}))
        try:
            first = AudioEvent.parse(ws.recv(timeout=30))
        except ConnectionClosed as exc:
            raise (_close_error(exc) or exc) from exc
        if first.type == "error":
            raise errors.error_for(first.status, None, first.message)
        if first.type != "ready":
            raise errors.ProtocolError(f"expected 'ready' on the audio socket, got {first!r}")

    def _handle(self, text: str | bytes) -> AudioEvent | None:
        if isinstance(text, bytes):
            return None
        ev = AudioEvent.parse(text)
        self.events.append(ev)
        if ev.type == "utterance_end":
            self._ends += 1
        elif ev.type == "error":
            if ev.status == 429:
                self.report.refused_chunks += 1
            else:
                self.report.errors.append(ev)
        return ev

    def poll(self) -> None:
        """Read the server's messages that already arrived, without waiting."""
        assert self.ws is not None
        while True:
            try:
                self._handle(self.ws.recv(timeout=0))
            except TimeoutError:
                return
            except ConnectionClosed as exc:
                raise (_close_error(exc) or exc) from exc

    def send(self, audio: Any) -> None:
        """Send samples now (numpy int16/float or bytes in the stream's format)."""
        assert self.ws is not None, "open the stream first"
        _, _, data = audio_bytes(audio, self.fmt, self.channels)
        if not data:
            return
        now = time.monotonic()
        if self.report.started_at is None:
            self.report.started_at = now
        try:
            self.ws.send(data)
        except ConnectionClosed as exc:
            raise (_close_error(exc) or exc) from exc
        self.report.chunks += 1
        self.report.seconds += len(data) / (self.sample_rate * bytes_per_frame(self.fmt, self.channels))
        self.report.sent_at.append((self.report.seconds, now))
        self.poll()

    def send_paced(self, data: bytes, *, chunk_s: float = 0.1, speed: float | None = 1.0, lead_s: float = 0.0) -> None:
        """Send bytes of samples in ``chunk_s`` chunks on a drift-free schedule (see :meth:`Session.stream_audio`)."""
        t0 = time.monotonic()
        before = 0.0
        for chunk in _http.chunks(data, self.fmt, self.channels, self.sample_rate, chunk_s):
            delay = _http.send_time(t0, before, speed, lead_s) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send(chunk)
            before += len(chunk) / (self.sample_rate * bytes_per_frame(self.fmt, self.channels))

    def end(self, timeout_s: float = 60.0) -> None:
        """End the utterance and wait for the server's ``utterance_end``."""
        assert self.ws is not None
        want = self._ends + 1
        self.ws.send(json.dumps({"type": "end"}))
        deadline = time.monotonic() + timeout_s
        while self._ends < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no utterance_end from the audio socket")
            try:
                self._handle(self.ws.recv(timeout=left))
            except ConnectionClosed as exc:
                raise (_close_error(exc) or exc) from exc

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


class MediaStream:
    """The media WebSocket: :class:`MediaPiece` s in order (init, fragments, end); iteration stops after
    the ``end`` piece or when the server closes."""

    def __init__(self, session: Session, from_block: int | None, timeout_s: float | None):
        self.session, self.from_block, self.timeout_s = session, from_block, timeout_s
        self.ws: ClientConnection | None = None
        self.done = False

    def __enter__(self) -> MediaStream:
        self.ws = self.session._connect("media", {"from_block": self.from_block})
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()

    def __iter__(self) -> MediaStream:
        return self

    def __next__(self) -> MediaPiece:
        return self.next()

    def next(self, timeout_s: float | None = -1.0) -> MediaPiece:
        """The next piece; ``timeout_s`` (default: the stream's) bounds the wait (TimeoutError)."""
        if self.done:
            raise StopIteration
        if self.ws is None:
            self.__enter__()
        assert self.ws is not None
        wait = self.timeout_s if timeout_s == -1.0 else timeout_s
        try:
            kind, block, n = _http.media_header(self.ws.recv(timeout=wait))
            data = self.ws.recv(timeout=30) if n else b""
        except ConnectionClosed as exc:
            self.done = True
            err = _close_error(exc)
            if err is not None:
                raise err from exc
            raise StopIteration from None
        if kind == "end":
            self.done = True
        return _http.piece(kind, block, bytes(data))
