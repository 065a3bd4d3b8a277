"""WebRTC out: a session's live media as one video and one audio track of an aiortc peer connection.

``POST /v1/sessions/{id}/webrtc`` (``routes/webrtc.py``) answers a browser's or any WebRTC client's offer.
Each peer reads the session's media from the hub like a media WebSocket client does (it counts as a media
client), starting at the live edge (the newest buffered block). The fMP4 pieces go through an OS pipe into
one PyAV demuxer/decoder thread, exactly as a player reads a live stream: H.264 frames and AAC audio with
the stream's own timestamps (edit list applied). Audio is resampled to 48 kHz mono in 20 ms frames for
Opus. Both tracks release their frames against **one shared clock** keyed by stream time, so what leaves
the server is time-aligned; when the session falls behind real time (a stall) the clock shifts for both
tracks. The frames' RTP timestamps are their send times on that clock: stream time plus the stalls before
it, the same for both tracks. A stall is then a gap in both RTP timelines (what a receiver expects of a live
source that paused), not late packets its jitter buffer would read as network delay and grow for.

ICE uses host candidates only (no STUN/TURN servers are configured): the client must reach this server's
addresses directly. A peer ends when the session's stream ends, the connection fails or closes, or it has
not connected within :data:`CONNECT_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from fractions import Fraction

import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from services.common.logging import get_logger
from services.session_api.media_hub import MediaStream

log = get_logger("session-api")

VIDEO_CLOCK = 90000
AUDIO_RATE = 48000
AUDIO_FRAME = 960                  # 20 ms at 48 kHz (Opus' frame)
CONNECT_TIMEOUT_S = 30.0
QUEUE_S = 3.0                      # frames buffered per track before the oldest are dropped (client not reading)
MAX_LATE_S = 0.25                  # a frame later than this moves the shared clock (both tracks)

#: The open peers by session id (this replica).
PEERS: dict[str, set[SessionPeer]] = {}


class SharedClock:
    """Stream time -> send time, shared by a peer's tracks. The first frame anchors it (send time = stream
    time). A frame later than :data:`MAX_LATE_S` (the session fell behind real time) delays the stream from
    that frame's time on by how late it is; the delay is a function of stream time, so both tracks' frames
    of the same stream time get the same send time. ``now`` and ``sleep`` are injectable for tests."""

    def __init__(self, now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.now, self.sleep = now, sleep
        self.base: float | None = None            # wall time of send time 0
        self.delays: list[tuple[float, float]] = []   # (stream time, the total delay from it on), ascending
        self.released = -math.inf                 # the latest stream time released by any track

    def delay(self, t: float) -> float:
        """Seconds the stalls before stream time ``t`` delay it (0 before the first stall)."""
        i = bisect.bisect_right(self.delays, (t, math.inf)) - 1
        return self.delays[i][1] if i >= 0 else 0.0

    async def wait(self, t: float) -> float:
        """Wait until stream time ``t`` is due; return its send time (seconds; the frame's RTP time)."""
        if self.base is None:
            self.base = self.now() - t
        while (ahead := self.base + t + self.delay(t) - self.now()) > 0:
            await self.sleep(ahead)               # (again if a stall meanwhile delayed t too)
        if -ahead > MAX_LATE_S and t > self.released:   # a stall: t and all after it are later, both tracks
            self.delays.append((t, self.delay(t) - ahead))
        self.released = max(self.released, t)
        return t + self.delay(t)


class SessionTrack(MediaStreamTrack):
    """A track fed by the decoder thread with (stream time, frame); ``recv`` releases them on the clock."""

    def __init__(self, kind: str, clock: SharedClock, per_second: float, rate: int):
        super().__init__()
        self.kind = kind
        self.clock = clock
        self.rate = rate                            # the RTP clock (Hz); frames come with time_base 1/rate
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max(2, int(QUEUE_S * per_second)))
        self.sent = 0
        self.last_time: float | None = None

    def offer(self, item) -> None:
        """From the event loop: queue a frame (or None = the end), dropping the oldest when full."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(item)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        t, frame = item
        send = await self.clock.wait(t)
        frame.pts = round(t * self.rate) + round((send - t) * self.rate)   # stream time + stalls, exact per track
        self.sent += 1
        self.last_time = t
        return frame


def _decode(read_fd: int, put, stop: threading.Event) -> None:
    """Decoder thread: demux and decode the live fMP4 from the pipe; frames go to ``put(kind, t, frame)``."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE, frame_size=AUDIO_FRAME)
    audio_t0: float | None = None
    audio_samples = 0
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe, \
                av.open(pipe, format="mp4", options={"probesize": "32", "analyzeduration": "0"}) as c:
            for frame in c.decode(video=0, audio=0):
                if stop.is_set():
                    return
                if isinstance(frame, av.VideoFrame):
                    t = float(frame.time)
                    frame.pts, frame.time_base = round(t * VIDEO_CLOCK), Fraction(1, VIDEO_CLOCK)
                    put("video", t, frame)
                    continue
                if audio_t0 is None:
                    audio_t0 = max(0.0, float(frame.time))
                for out in resampler.resample(frame):
                    t = audio_t0 + audio_samples / AUDIO_RATE
                    out.pts, out.time_base = round(t * AUDIO_RATE), Fraction(1, AUDIO_RATE)
                    audio_samples += out.samples
                    put("audio", t, out)
    except Exception as exc:  # noqa: BLE001 - a broken stream ends the peer's tracks
        if not stop.is_set():
            log.warning("webrtc decoder stopped", error=repr(exc))
    finally:
        put(None, 0.0, None)


class SessionPeer:
    """One WebRTC client of a session."""

    def __init__(self, session_id: str, stream: MediaStream):
        self.session_id, self.stream = session_id, stream
        self.clock = SharedClock()
        self.video = SessionTrack("video", self.clock, 25, VIDEO_CLOCK)
        self.audio = SessionTrack("audio", self.clock, AUDIO_RATE / AUDIO_FRAME, AUDIO_RATE)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._stop = threading.Event()
        self._tasks: list[asyncio.Task] = []
        self.closed = asyncio.Event()

    async def answer(self, offer_sdp: str) -> str:
        """Apply the client's offer (it must receive video and audio), start the media, return the answer."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        kinds = {t.kind for t in self.pc.getTransceivers()}
        if not {"video", "audio"} <= kinds:
            raise ValueError("the offer must receive one video and one audio track")
        self.pc.addTrack(self.video)
        self.pc.addTrack(self.audio)
        await self.pc.setLocalDescription(await self.pc.createAnswer())

        @self.pc.on("connectionstatechange")
        async def _state():
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

        PEERS.setdefault(self.session_id, set()).add(self)
        self._tasks = [asyncio.create_task(self._feed(), name=f"webrtc-feed-{self.session_id}"),
                       asyncio.create_task(self._watch(), name=f"webrtc-watch-{self.session_id}")]
        return self.pc.localDescription.sdp

    async def _watch(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if self.pc.connectionState != "connected":
            log.info("webrtc peer never connected", session_id=self.session_id)
            await self.close()

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        tracks = {"video": self.video, "audio": self.audio}

        def put(kind, t, frame):
            def deliver():
                if kind is None:
                    for track in tracks.values():
                        track.offer(None)
                else:
                    tracks[kind].offer((t, frame))
            loop.call_soon_threadsafe(deliver)

        read_fd, write_fd = os.pipe()
        thread = threading.Thread(target=_decode, args=(read_fd, put, self._stop), daemon=True,
                                  name=f"webrtc-decode-{self.session_id}")
        thread.start()
        try:
            async with self.stream:
                async for piece in self.stream:
                    if piece.data:
                        await asyncio.to_thread(_write_all, write_fd, piece.data)
                    if piece.kind == "end":
                        break
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            os.close(write_fd)                      # EOF: the decoder ends the tracks
            await asyncio.to_thread(thread.join, 10)

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._stop.set()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self.pc.close()
        peers = PEERS.get(self.session_id)
        if peers is not None:
            peers.discard(self)
            if not peers:
                PEERS.pop(self.session_id, None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def close_all() -> None:
    for peers in list(PEERS.values()):
        for peer in list(peers):
            await peer.close()
