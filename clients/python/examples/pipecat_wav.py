"""A Pipecat pipeline with the LiveAvatar video service: a WAV file stands in for a TTS service, and the
avatar's image and audio frames are written to an MP4 (what a transport would send to a call).

    python clients/python/examples/pipecat_wav.py http://127.0.0.1:PORT la_... \
        examples/faces/face_812.png examples/cyclops_baker.wav out/pipecat.mp4 [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
from fractions import Fraction

import av
import numpy as np
from liveavatar_client.pipecat import LiveAvatarVideoService
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


class Mp4Sink(FrameProcessor):
    """Writes OutputImageRawFrame / OutputAudioRawFrame to an MP4 (H.264 + AAC), like a recorder transport."""

    def __init__(self, path: str):
        super().__init__()
        self.container = av.open(path, "w")
        self.video = self.audio = None
        self.images = 0
        self.samples = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            if self.video is None:
                self.video = self.container.add_stream("libx264", rate=25)
                self.video.width, self.video.height = frame.size
                self.video.pix_fmt = "yuv420p"
            w, h = frame.size
            img = av.VideoFrame.from_ndarray(np.frombuffer(frame.image, np.uint8).reshape(h, w, 3), format="rgb24")
            img.pts, img.time_base = self.images, Fraction(1, 25)
            self.images += 1
            self.container.mux(self.video.encode(img))
        elif isinstance(frame, OutputAudioRawFrame):
            if self.audio is None:
                self.audio = self.container.add_stream("aac", rate=frame.sample_rate, layout="mono")
            pcm = np.frombuffer(frame.audio, np.int16).reshape(1, -1)
            snd = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            snd.sample_rate, snd.pts, snd.time_base = frame.sample_rate, self.samples, Fraction(1, frame.sample_rate)
            self.samples += pcm.shape[1]
            self.container.mux(self.audio.encode(snd))
        elif isinstance(frame, EndFrame):
            self.close()
        await self.push_frame(frame, direction)

    def close(self) -> None:
        for stream in (self.video, self.audio):
            if stream is not None:
                self.container.mux(stream.encode(None))
        self.container.close()


async def run(a) -> None:
    with av.open(a.wav) as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    pcm = (np.clip(x[: int(a.seconds * rate)], -1, 1) * 32767).astype(np.int16)

    avatar = LiveAvatarVideoService(base_url=a.base_url, api_key=a.api_key, image=a.image,
                                    options={"idle": "silence"})
    sink = Mp4Sink(a.out)
    worker = PipelineWorker(Pipeline([avatar, sink]), cancel_on_idle_timeout=False, idle_timeout_secs=None)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        started.set()

    running = asyncio.create_task(runner.run())
    await started.wait()
    await worker.queue_frame(TTSStartedFrame())                  # what a TTS service pushes: 20 ms frames
    for i in range(0, len(pcm), rate // 50):
        await worker.queue_frame(TTSAudioRawFrame(audio=pcm[i:i + rate // 50].tobytes(), sample_rate=rate,
                                                  num_channels=1))
    await worker.queue_frame(TTSStoppedFrame())
    while sink.images < (a.seconds + 1.0) * 25:                 # the speech and a second of idle motion
        await asyncio.sleep(0.2)
    await worker.queue_frame(EndFrame())
    await running
    print(f"session {avatar.session.id}: wrote {sink.images} frames ({avatar.size[0]}x{avatar.size[1]}) to {a.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base_url", "api_key", "image", "wav", "out"):
        p.add_argument(name)
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of the WAV to speak")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
