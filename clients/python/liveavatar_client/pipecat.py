"""A Pipecat video service backed by a LiveAvatar session (extra ``[pipecat]``).

::

    avatar = LiveAvatarVideoService(base_url="http://127.0.0.1:8000", api_key=key, image="face.png",
                                    options={"idle": "silence"})
    pipeline = Pipeline([transport.input(), stt, llm, tts, avatar, transport.output()])

- **In**: ``TTSAudioRawFrame`` (any rate, pcm16) go to the session's audio WebSocket, a few seconds ahead
  of real time at most (``lead_s``; the API refuses audio queued beyond its limit), and are not passed
  on: the avatar speaks them. ``TTSStoppedFrame`` ends the utterance.
- **Out**: the session's fMP4 is decoded (PyAV) and pushed as pairs of ``OutputImageRawFrame`` (RGB, the
  session's size) and ``OutputAudioRawFrame`` (the 40 ms of audio under that frame, pcm16, the stream's
  32 kHz mono), one pair every 1/25 s on a drift-free clock. ``metadata["liveavatar_time_s"]`` is the
  frame's time in the stream. Images are marked ``sync_with_audio`` so a transport shows each after the
  audio before it.
- **Interruptions**: an ``InterruptionFrame`` (``StartInterruptionFrame`` on older Pipecat) drops the audio
  not yet sent and the output not yet pushed, and interrupts the session (its queued speech is dropped).
- The session is created at ``StartFrame`` and ended at ``EndFrame`` / ``CancelFrame`` (unless it was
  given with ``session_id``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pipecat.frames import frames as pf
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from liveavatar_client.aio import AsyncAudioStream, AsyncLiveAvatar, AsyncMediaStream, AsyncSession
from liveavatar_client.media import FragmentDecoder, float_to_pcm16
from liveavatar_client.types import FPS

#: The interruption frame classes of the installed Pipecat (``InterruptionFrame`` since 0.0.85).
INTERRUPTIONS = tuple(c for c in (getattr(pf, "InterruptionFrame", None), getattr(pf, "StartInterruptionFrame", None))
                      if c is not None)
_END = object()


class LiveAvatarVideoService(AIService):
    """Pipecat service: TTS audio in, the LiveAvatar session's video and audio out (see the module doc)."""

    def __init__(self, *, base_url: str, api_key: str, image: bytes | str | Path | None = None,
                 options: dict[str, Any] | None = None, session_id: str | None = None, lead_s: float = 2.0,
                 chunk_s: float = 0.1, max_hold_s: float = 0.6, active_timeout_s: float = 120.0, **kwargs):
        """``image`` + ``options`` create a session at start (``session_id``: use an existing one instead).
        ``lead_s``: how far ahead of real time audio is sent. ``max_hold_s``: how long a decoded frame waits for
        the audio under it before it goes out with silence."""
        kwargs.setdefault("settings", ServiceSettings(model=None))       # no model to choose
        super().__init__(**kwargs)
        if image is None and session_id is None:
            raise ValueError("give an image (a new session) or a session_id")
        self._base_url, self._api_key, self._image, self._options = base_url, api_key, image, options or {}
        self._session_id, self._lead_s, self._chunk_s = session_id, lead_s, chunk_s
        self._max_hold_s, self._active_timeout_s = max_hold_s, active_timeout_s
        self._client: AsyncLiveAvatar | None = None
        self.session: AsyncSession | None = None
        self._own_session = session_id is None
        self._audio_q: asyncio.Queue = asyncio.Queue()
        self._out: collections.deque = collections.deque()       # (rgb, stream time, arrival) waiting for audio
        self._pairs: asyncio.Queue = asyncio.Queue()              # (image frame, audio frame) ready to push
        self._epoch = 0
        self._tasks: list[asyncio.Task] = []
        self._abuf = np.zeros(0, np.float32)                      # decoded audio not yet pushed
        self._abuf_t = 0.0                                        # stream time of _abuf[0]
        self._rate = 32000
        self.size: tuple[int, int] | None = None                  # (width, height) of the session's video
        self.interruptions = 0

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        await super().start(frame)
        self._client = AsyncLiveAvatar(self._base_url, self._api_key)
        if self._own_session:
            self.session = await self._client.create_session(self._image, self._options)
        else:
            self.session = self._client.session(self._session_id)
        info = await self.session.wait_until(("active",), timeout_s=self._active_timeout_s)
        self.size = (info.width, info.height)
        logger.info(f"{self}: LiveAvatar session {self.session.id} active ({info.width}x{info.height})")
        self._tasks = [self.create_task(self._send_audio(), "liveavatar-audio"),
                       self.create_task(self._read_media(), "liveavatar-media"),
                       self.create_task(self._push_output(), "liveavatar-output")]

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._shutdown()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            await self.cancel_task(task)
        self._tasks = []
        if self.session is not None and self._own_session:
            try:
                await self.session.end()
            except Exception as exc:  # noqa: BLE001 - the session may already be gone
                logger.warning(f"{self}: ending the session failed: {exc}")
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- frames in ---------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            await self._audio_q.put((self._epoch, frame.sample_rate, frame.num_channels, frame.audio))
            return
        if isinstance(frame, TTSStoppedFrame):
            await self._audio_q.put((self._epoch, _END))
        elif INTERRUPTIONS and isinstance(frame, INTERRUPTIONS):
            await self._interrupt()
        await self.push_frame(frame, direction)

    async def _interrupt(self) -> None:
        self._epoch += 1                  # the sender drops what was queued before
        while not self._audio_q.empty():
            self._audio_q.get_nowait()
        self._out.clear()
        while not self._pairs.empty():
            self._pairs.get_nowait()
        self.interruptions += 1
        if self.session is not None:
            try:
                await self.session.interrupt()
            except Exception as exc:  # noqa: BLE001 - reported, the pipeline goes on
                await self.push_error(error_msg=f"LiveAvatar interrupt failed: {exc}", exception=exc)

    async def _send_audio(self) -> None:
        """TTS audio -> the audio WebSocket, at most ``lead_s`` ahead of real time; one socket per utterance
        (a new one after an interruption too). A failed socket is reported and the next audio opens another."""
        stream: AsyncAudioStream | None = None
        key: tuple[int, int, int] | None = None           # (epoch, rate, channels) of the open socket
        t0, sent_s = 0.0, 0.0

        async def close(end: bool) -> None:
            nonlocal stream
            if stream is not None:
                try:
                    if end:
                        await stream.end()
                finally:
                    await stream.close()
                    stream = None

        while True:
            item = await self._audio_q.get()
            try:
                if item[0] != self._epoch:
                    continue
                if item[1] is _END:
                    await close(end=True)
                    continue
                epoch, rate, channels, data = item
                if stream is None or key != (epoch, rate, channels):
                    await close(end=key is not None and key[0] == epoch)   # interrupted audio gets no end
                    stream, key = self.session.audio(rate, "pcm16", channels), (epoch, rate, channels)
                    await stream.open()
                now = time.monotonic()
                if now > t0 + sent_s:                      # behind real time: the clock starts again here
                    t0, sent_s = now, 0.0
                delay = t0 + sent_s - self._lead_s - now
                if delay > 0:
                    await asyncio.sleep(delay)
                if item[0] != self._epoch:
                    continue
                await stream.send(data)
                sent_s += len(data) / (2 * channels * rate)
            except asyncio.CancelledError:
                await close(end=False)
                raise
            except Exception as exc:  # noqa: BLE001 - reported; the next audio opens a new socket
                await self.push_error(error_msg=f"LiveAvatar audio failed: {exc}", exception=exc)
                stream = None

    # ---- media out ---------------------------------------------------------------------------------

    async def _read_media(self) -> None:
        decoder: FragmentDecoder | None = None
        media: AsyncMediaStream
        async with self.session.media() as media:
            async for piece in media:
                if piece.type == "init":
                    decoder = FragmentDecoder(piece.data)
                    self._rate = decoder.sample_rate or self._rate
                    continue
                if decoder is None:
                    continue
                video, audio = await asyncio.to_thread(decoder.decode, piece.data)
                now = time.monotonic()
                if audio is not None:
                    self._add_audio(audio.samples if audio.samples.ndim == 1 else audio.samples.mean(axis=1),
                                    audio.time_s)
                for f in video:
                    self._out.append((f.rgb, f.time_s, now))
                self._release(final=piece.type == "end")

    def _add_audio(self, x: np.ndarray, t: float) -> None:
        end = self._abuf_t + len(self._abuf) / self._rate
        if not len(self._abuf) and t > end:
            self._abuf_t, end = t, t
        skip = int(round((end - t) * self._rate))
        if skip > 0:                                  # already covered (or already pushed): drop the overlap
            x = x[skip:]
        elif skip < 0:                                # a gap in the stream's audio: silence
            x = np.concatenate([np.zeros(-skip, np.float32), x])
        self._abuf = np.concatenate([self._abuf, x.astype(np.float32)])

    def _release(self, final: bool = False) -> None:
        """Frames whose audio arrived (or that waited ``max_hold_s``) -> (image, audio) pairs, in order."""
        per = self._rate // FPS
        audio_end = self._abuf_t + len(self._abuf) / self._rate
        now = time.monotonic()
        while self._out:
            rgb, t, arrived = self._out[0]
            if not final and audio_end < t + 1 / FPS - 1e-6 and now - arrived < self._max_hold_s:
                break
            self._out.popleft()
            start = int(round((t - self._abuf_t) * self._rate))
            if start > 0:                              # audio before this frame (its frames were dropped)
                self._abuf = self._abuf[start:]
            elif start < 0:                            # no audio this early: silence under the frame's start
                self._abuf = np.concatenate([np.zeros(-start, np.float32), self._abuf])
            take = self._abuf[:per]
            if len(take) < per:
                take = np.concatenate([take, np.zeros(per - len(take), np.float32)])
            self._abuf = self._abuf[per:]
            self._abuf_t = t + 1 / FPS
            h, w = rgb.shape[:2]
            image = OutputImageRawFrame(image=rgb.tobytes(), size=(w, h), format="RGB")
            image.sync_with_audio = True
            image.metadata["liveavatar_time_s"] = round(t, 4)
            sound = OutputAudioRawFrame(audio=float_to_pcm16(take), sample_rate=self._rate, num_channels=1)
            sound.metadata["liveavatar_time_s"] = round(t, 4)
            self._pairs.put_nowait((image, sound))

    async def _push_output(self) -> None:
        """One (audio, image) pair every 1/25 s; the clock restarts when the output ran dry."""
        due = 0.0
        while True:
            try:
                image, sound = await asyncio.wait_for(self._pairs.get(), self._max_hold_s / 2)
            except TimeoutError:
                self._release()                        # frames still waiting for audio that is not coming
                continue
            now = time.monotonic()
            due = max(due, now)
            if due > now:
                await asyncio.sleep(due - now)
            await self.push_frame(sound)
            await self.push_frame(image)
            due += 1 / FPS
