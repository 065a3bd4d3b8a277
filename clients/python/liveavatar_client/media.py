"""Decode the session's live fMP4 into RGB frames and PCM, fragment by fragment (extra ``[media]``: PyAV).

The media stream is an init segment (H.264 + AAC tracks), then one fragment per block. A
:class:`FragmentDecoder` keeps one H.264 and one AAC decoder for the whole stream (so AAC frames are not
primed again at every fragment) and demuxes each fragment together with the init segment. Timestamps are
the stream's own, edit list applied: video frame ``i`` of the stream is at ``i / 25`` s and the audio
sample at time ``t`` is the one the encoder was given at ``t`` (the AAC priming samples, before 0, are
dropped), so frames and samples line up exactly as in a player.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np


@dataclass(frozen=True)
class DecodedVideoFrame:
    rgb: np.ndarray          # uint8 [H, W, 3]
    time_s: float            # presentation time in the stream


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray      # float32 [n] (mono) or [n, channels]
    sample_rate: int
    time_s: float            # presentation time of samples[0]


class FragmentDecoder:
    """``decode(fragment)`` -> (video frames, audio) for each fragment after ``FragmentDecoder(init)``."""

    def __init__(self, init: bytes):
        self.init = bytes(init)
        with av.open(io.BytesIO(self.init), format="mp4") as c:
            v = c.streams.video[0] if c.streams.video else None
            a = c.streams.audio[0] if c.streams.audio else None
            self.width = v.codec_context.width if v else 0
            self.height = v.codec_context.height if v else 0
            self.sample_rate = a.codec_context.sample_rate if a else 0
            self.channels = a.codec_context.channels if a else 0
            self._video = self._decoder(v)
            self._audio = self._decoder(a)
            self._vtb = v.time_base if v else None
            self._atb = a.time_base if a else None
        self.audio_end_s = 0.0          # time just after the last audio sample returned
        self._shift: dict[str, int] | None = None

    @staticmethod
    def _decoder(stream):
        if stream is None:
            return None
        ctx = av.CodecContext.create(stream.codec_context.name, "r")
        ctx.extradata = stream.codec_context.extradata
        if stream.type == "audio":
            ctx.sample_rate = stream.codec_context.sample_rate
            ctx.layout = stream.codec_context.layout
        return ctx

    def _shifts(self, fragment: bytes) -> None:
        """The edit lists' shifts in ticks (the AAC priming): the first packet's pts without and with them.
        Fragments are then demuxed without the edit list, because the demuxer would mark the first audio
        packet of every separately opened fragment as priming to skip."""
        first = {}
        for opts in ({"ignore_editlist": "1"}, {}):
            with av.open(io.BytesIO(self.init + fragment), format="mp4", options=opts) as c:
                for packet in c.demux():
                    if packet.pts is not None and packet.size and (packet.stream.type, bool(opts)) not in first:
                        first[(packet.stream.type, bool(opts))] = packet.pts
        self._shift = {kind: first.get((kind, True), 0) - first.get((kind, False), 0) for kind in ("video", "audio")}

    def decode(self, fragment: bytes) -> tuple[list[DecodedVideoFrame], DecodedAudio | None]:
        """Frames and audio of one fragment (the ``end`` piece holds only the last audio)."""
        frames: list[DecodedVideoFrame] = []
        chunks: list[np.ndarray] = []
        first_t: float | None = None
        if not fragment:
            return frames, None
        fragment = bytes(fragment)
        if self._shift is None:
            self._shifts(fragment)
        with av.open(io.BytesIO(self.init + fragment), format="mp4", options={"ignore_editlist": "1"}) as c:
            for packet in c.demux():
                if packet.size == 0:
                    continue
                if packet.stream.type == "video" and self._video is not None:
                    for f in self._video.decode(packet):
                        frames.append(DecodedVideoFrame(f.to_ndarray(format="rgb24"),
                                                        float((f.pts - self._shift["video"]) * self._vtb)))
                elif packet.stream.type == "audio" and self._audio is not None:
                    for f in self._audio.decode(packet):
                        x = f.to_ndarray()                               # planar: [channels, n]
                        x = (x.T if f.format.is_planar else x.reshape(-1, self.channels)).astype(np.float32)
                        t = float((f.pts - self._shift["audio"]) * self._atb)
                        if t < 0:                                        # priming samples before time 0
                            skip = min(len(x), int(round(-t * self.sample_rate)))
                            x, t = x[skip:], t + skip / self.sample_rate
                        if len(x):
                            first_t = t if first_t is None else first_t
                            chunks.append(x)
                            self.audio_end_s = t + len(x) / self.sample_rate
        if not chunks:
            return frames, None
        samples = np.concatenate(chunks)
        if samples.shape[1] == 1:
            samples = samples[:, 0]
        return frames, DecodedAudio(samples, self.sample_rate, first_t or 0.0)


def float_to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
