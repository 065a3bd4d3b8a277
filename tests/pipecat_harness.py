"""A real Pipecat pipeline around :class:`liveavatar_client.pipecat.LiveAvatarVideoService`, for the tests:
``Pipeline([service, Collector])`` run by ``PipelineWorker`` + ``WorkerRunner``; frames go in with
``worker.queue_frame`` and the collector records every frame that comes out, with its arrival time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
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


class Collector(FrameProcessor):
    """Records (frame, monotonic time) of every downstream frame and passes it on."""

    def __init__(self):
        super().__init__()
        self.frames: list[tuple[Frame, float]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((frame, time.monotonic()))
        await self.push_frame(frame, direction)

    def of(self, cls) -> list[tuple[Frame, float]]:
        return [(f, t) for f, t in self.frames if type(f) is cls]


@dataclass
class Run:
    worker: PipelineWorker
    collector: Collector
    task: asyncio.Task
    runner: WorkerRunner
    errors: list = field(default_factory=list)

    async def tts(self, pcm16: np.ndarray, rate: int, frame_s: float = 0.02, realtime: float | None = None) -> None:
        """One TTS utterance: started, audio frames (``frame_s`` each; every ``realtime`` s, or at once), stopped."""
        await self.worker.queue_frame(TTSStartedFrame())
        step = int(rate * frame_s)
        for i in range(0, len(pcm16), step):
            await self.worker.queue_frame(TTSAudioRawFrame(audio=pcm16[i:i + step].astype("<i2").tobytes(),
                                                           sample_rate=rate, num_channels=1))
            if realtime:
                await asyncio.sleep(realtime)
        await self.worker.queue_frame(TTSStoppedFrame())

    async def interrupt(self) -> None:
        await self.worker.queue_frame(InterruptionFrame())

    async def wait_images(self, n: int, timeout_s: float) -> list[tuple[OutputImageRawFrame, float]]:
        deadline = time.monotonic() + timeout_s
        while len(self.collector.of(OutputImageRawFrame)) < n:
            if self.task.done():
                raise RuntimeError(f"the pipeline stopped: {self.task.exception()!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.collector.of(OutputImageRawFrame))} of {n} image frames in {timeout_s} s")
            await asyncio.sleep(0.05)
        return self.collector.of(OutputImageRawFrame)

    def audio(self) -> list[tuple[OutputAudioRawFrame, float]]:
        return self.collector.of(OutputAudioRawFrame)

    async def end(self, timeout_s: float = 30) -> None:
        await self.worker.queue_frame(EndFrame())
        await asyncio.wait_for(self.task, timeout_s)

    async def abort(self, timeout_s: float = 15) -> None:
        """Cancel the pipeline (after a failed check), so that ``asyncio.run`` does not wait on it forever."""
        if self.task.done():
            return
        try:
            await asyncio.wait_for(self.runner.cancel(), timeout_s)
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()


async def start(service, start_timeout_s: float = 180) -> Run:
    collector = Collector()
    worker = PipelineWorker(Pipeline([service, collector]), cancel_on_idle_timeout=False, idle_timeout_secs=None)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    done, _ = await asyncio.wait([task, asyncio.create_task(started.wait())], timeout=start_timeout_s,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        raise RuntimeError(f"the pipeline ended before it started: {task.exception()!r}")
    if not started.is_set():
        task.cancel()
        raise TimeoutError("the pipeline did not start")
    return Run(worker, collector, task, runner)
