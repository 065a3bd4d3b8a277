"""A local lane: ``world_size`` rank processes, supervised from the caller's process.

:class:`TPPLane` is what ``liveavatar generate --tpp``, the benchmarks and the tests run: the caller's
process runs the audio stage, encodes each session's sink and packages the video; the ranks
(:func:`pipeline_stages.tpp.ranks.run_rank`) talk to it through queues. It satisfies
:class:`pipeline_stages.runner.Runner`, like the sequential runner, and gives the same blocks.

Failure: a rank that dies is seen at once (process exit); a rank that hangs is seen by its downstream
neighbour's receive timeout and by the supervisor's progress timeout. The supervisor then stops every
rank and raises :class:`LaneError` naming the stage and the block.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from models.liveavatar import LiveAvatarConfig, build_models
from pipeline_stages.audio_stage import AudioStage, BlockPcm
from pipeline_stages.package_stage import make_package_stage
from pipeline_stages.runner import BlockResult, SessionSpec
from pipeline_stages.sink import SinkInputs, prepare_sink
from pipeline_stages.tpp.ranks import RankFailed, RankReady, RankReport, RankSpec, run_rank
from pipeline_stages.tpp.shape import LaneShape
from pipeline_stages.tpp.wire import Block, BlockDone, EndSession, SessionEnded, SessionStarted, Shutdown, StartSession


class LaneError(RuntimeError):
    """A stage of the lane failed; the message names the stage and the block."""


class _QueueSource:
    """The head's :class:`~pipeline_stages.tpp.ranks.LaneSource`: the caller's inbox queue."""

    def __init__(self, q):
        self.q = q

    def get(self, timeout: float):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None


def _rank_main(spec: RankSpec, inbox, outbox, reports, parent_pid: int) -> None:
    """Entry point of a local rank process."""
    def orphan_guard():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)        # the supervisor is gone: never linger
            time.sleep(0.5)

    threading.Thread(target=orphan_guard, daemon=True).start()
    code = 0
    try:
        head = spec.rank == spec.shape.head
        run_rank(spec, _QueueSource(inbox) if head else None, outbox if spec.is_decode else None, reports)
    except BaseException:  # noqa: BLE001 - already reported
        code = 1
    finally:
        for q in (outbox, reports):
            if q is not None:
                q.close()
                q.join_thread()
        os._exit(code)


class TPPLane:
    """A local lane of ``shape.world_size`` processes, with the audio and packaging stages in the caller.

    ``shape`` is the lane's shape (``"4+1"``, the default, ``"4"``, ``"2+1"``, ``"2"``, ``"1+1"``, ``"1"``:
    :class:`~pipeline_stages.tpp.shape.LaneShape`); every shape gives the same blocks.

    A :class:`~pipeline_stages.runner.Runner`. Use as a context manager (it starts and stops the ranks)::

        with TPPLane(LiveAvatarConfig.tiny()) as lane:
            init = lane.start_session(spec)
            for res in lane.generate(pcm): ...
            tail = lane.close_session()
    """

    def __init__(self, config: LiveAvatarConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, checkpoint: str | None = None, lora: str | None = None, timeout_s: float = 30.0,
                 heartbeat_s: float = 1.0, threads_per_rank: int = 1, package: bool = True,
                 decode_threads: int | None = None, shape: str | LaneShape | None = None):
        self.config = config
        steps = config.scheduler.num_inference_steps
        if shape is None:
            self.shape = LaneShape(steps=steps)                 # 4+1: one rank per step, the decoder on its own
        elif isinstance(shape, LaneShape):
            if shape.steps != steps:
                raise ValueError(f"lane shape {shape} is for {shape.steps} steps; this model takes {steps}")
            self.shape = shape
        else:
            self.shape = LaneShape.parse(shape, steps)
        self.device, self.dtype, self.seed = device, dtype, seed
        self.checkpoint, self.lora = checkpoint, lora
        self.timeout_s, self.heartbeat_s, self.threads = timeout_s, heartbeat_s, threads_per_rank
        self.decode_threads = decode_threads
        self.package_enabled = package
        self.procs: list = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.progress: dict[int, tuple[float, int]] = {}     # rank -> (last report time, last block)
        self.errors: dict[int, RankFailed] = {}                # rank -> its failure report
        self.session_no = 0
        self._audio_stage: AudioStage | None = None
        self._package = None
        self._pcm: BlockPcm | None = None
        self._next_block = 0
        self._results: dict[int, BlockDone] = {}
        self._emit_next = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> TPPLane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rank_device(self, rank: int) -> str:
        if self.device.startswith("cuda") and ":" not in self.device:
            return f"cuda:{rank % max(1, torch.cuda.device_count())}"
        return self.device

    def start(self, ready_timeout_s: float = 300.0) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="liveavatar-lane-")
        init = f"file://{Path(self._tmp.name) / 'rendezvous'}"
        # one report queue per rank: a rank killed mid-write can only corrupt its own pipe
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.reports = [ctx.Queue() for _ in range(self.shape.world_size)]
        # the parent runs the audio stage and encodes the sink: audio encoder, text encoder and VAE
        self.models = build_models(self.config, device="cpu", dtype=torch.float32, seed=self.seed,
                                   checkpoint=self.checkpoint, lora=None, parts={"vae", "audio", "text"})
        for rank in range(self.shape.world_size):
            spec = RankSpec(rank=rank, shape=self.shape, config=self.config, init_method=init,
                            device=self.rank_device(rank), dtype=str(self.dtype).removeprefix("torch."),
                            weights_seed=self.seed, checkpoint=self.checkpoint, lora=self.lora,
                            timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s, threads=self.threads,
                            decode_threads=self.decode_threads)
            p = ctx.Process(target=_rank_main, args=(spec, self.inbox, self.outbox, self.reports[rank], os.getpid()),
                            name=f"liveavatar-{self.shape.stage_name(rank)}", daemon=True)
            p.start()
            self.procs.append(p)
        deadline = time.monotonic() + ready_timeout_s
        ready: set[int] = set()
        while len(ready) < len(self.procs):
            if time.monotonic() > deadline:
                self._fail("lane did not become ready in time", None)
            for item in self._drain_reports(0.2):
                if isinstance(item, RankReady):
                    ready.add(item.rank)
            self._check_alive()

    def stop(self, graceful: bool = True) -> None:
        """Shut the lane down (SHUTDOWN through the lane, then join); kills what does not exit."""
        if not self.procs:
            return
        if graceful and all(p.is_alive() for p in self.procs):
            self.inbox.put(Shutdown())
            deadline = time.monotonic() + self.timeout_s
            while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
                for q in (*self.reports, self.outbox):   # keep pipes drained so no rank blocks while exiting
                    try:
                        while True:
                            q.get_nowait()
                    except (queue.Empty, EOFError, OSError):
                        pass
                time.sleep(0.05)
        self._kill_all()

    def _kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self.procs = []
        for q in (getattr(self, "inbox", None), getattr(self, "outbox", None), *getattr(self, "reports", [])):
            if q is not None:
                q.cancel_join_thread()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ---- supervision -------------------------------------------------------------------------
    def _read_reports(self, timeout: float = 0.0) -> list[RankReport]:
        """Collect every rank's pending reports (progress, readiness, errors) without judging them."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            for rank, q in enumerate(self.reports):
                try:
                    while True:
                        out.append(q.get_nowait())
                except queue.Empty:
                    pass
                except (EOFError, OSError, ValueError) as exc:   # the rank died mid-write
                    self._fail(f"stage {self.shape.stage_name(rank)} died while reporting ({exc!r}); "
                               f"last block it finished: {self.progress.get(rank, (0, -1))[1]}", rank)
            if out or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        now = time.monotonic()
        for item in out:
            self.progress[item.rank] = (now, max(item.block_index, self._last(item.rank)))
            if isinstance(item, RankFailed):
                self.errors[item.rank] = item
        return out

    def _drain_reports(self, timeout: float) -> list[RankReport]:
        """Read every rank's reports; fail the lane on an error report."""
        out = self._read_reports(timeout)
        if self.errors:
            time.sleep(0.3)   # a neighbour's death is seen by its peers a moment before its exit is visible
            self._check_alive()
            self._diagnose()
        return out

    def _last(self, rank: int) -> int:
        return self.progress.get(rank, (0, -1))[1]

    def _diagnose(self) -> None:
        """Fail naming the root cause: a rank that died without reporting, else the peer a report blames."""
        self._read_reports()      # a rank that reported and then exited: read its report before judging it
        dead = [r for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)]
        silent = [r for r in dead if r not in self.errors]
        if silent:   # killed (signal) or crashed without a word: the root cause
            r = min(silent, key=lambda r: (self.procs[r].exitcode >= 0, r))
            self._fail(f"stage {self.shape.stage_name(r)} died (exit code {self.procs[r].exitcode}) "
                       f"after block {self._last(r)}", r)
        name = self.shape.stage_name
        for rank, err in sorted(self.errors.items()):
            if err.peer is None:   # a stage that failed on its own, e.g. bad input or out of memory
                self._fail(f"stage {name(rank)} failed at block {err.block_index}: {err.detail}", rank)
        if self.errors:
            rank, err = min(self.errors.items())
            self._fail(f"stage {name(err.peer)} stopped responding: {name(rank)} "
                       f"lost it ({err.detail}); last block it finished: {self._last(err.peer)}", err.peer)

    def _check_alive(self) -> None:
        if any(p.exitcode not in (None, 0) for p in self.procs):
            self._diagnose()
        now = time.monotonic()
        for rank in range(len(self.procs)):
            seen, last = self.progress.get(rank, (now, -1))
            if now - seen > self.timeout_s:
                self._fail(f"stage {self.shape.stage_name(rank)} hung: no progress for "
                           f"{now - seen:.0f} s after block {last}", rank)

    def _fail(self, message: str, rank: int | None) -> None:
        self._kill_all()
        raise LaneError(message)

    # ---- sessions ----------------------------------------------------------------------------
    def start_session(self, spec: SessionSpec) -> bytes:
        """Encode the sink here, prefill every rank; returns the MP4 init segment."""
        sink, size = prepare_sink(self.models, spec)
        return self.start_session_from_sink(sink, size, spec)

    def start_session_from_sink(self, sink: SinkInputs, size: tuple[int, int], spec: SessionSpec) -> bytes:
        """Prefill every rank from an encoded sink; ``size`` is the video's (H, W)."""
        if spec.leads is not None and callable(spec.leads):
            raise ValueError("a TPP lane takes explicit sink leads as a sequence, not a callable")
        self.session_no += 1
        self.inbox.put(StartSession(self.session_no, spec.seed, sink, spec.options,
                                    None if spec.leads is None else [int(v) for v in spec.leads]))
        self._audio_stage = AudioStage(self.models.audio)
        self._audio_stage.start_session()
        self._pcm = BlockPcm(self._audio_stage.block_samples)
        self._next_block = self._emit_next = 0
        self._results = {}
        cfg = self.config
        self._package = (make_package_stage(size[1], size[0], cfg.fps, cfg.audio.block_frames,
                                            tiny=size[0] * size[1] <= 128 * 128) if self.package_enabled else None)
        self._wait_for(lambda item: isinstance(item, SessionStarted) and item.session_no == self.session_no)
        return self._package.init_segment() if self._package is not None else b""

    def push_audio(self, pcm: np.ndarray) -> list[BlockResult]:
        """Feed PCM; queues every completed block into the lane and returns the blocks finished so far."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._pcm.push(pcm)
        for feats in self._audio_stage.push(pcm):
            self._submit(feats)
        return self.collect(block=False)

    def finish(self) -> list[BlockResult]:
        """Flush the last partial block and wait for every queued block."""
        self._pcm.pad_partial()
        for feats in self._audio_stage.flush():
            self._submit(feats)
        out = []
        while self._emit_next < self._next_block:
            out.extend(self.collect(block=True))
        return out

    def generate(self, pcm: np.ndarray) -> Iterator[BlockResult]:
        """The whole audio, block by block, yielding results as the lane finishes them."""
        n = self._audio_stage.block_samples
        for i in range(0, len(pcm), n):
            yield from self.push_audio(pcm[i:i + n])
        yield from self.finish()

    def close_session(self) -> bytes:
        self.inbox.put(EndSession(self.session_no))
        self._wait_for(lambda item: isinstance(item, SessionEnded) and item.session_no == self.session_no)
        return self._package.close() if self._package is not None else b""

    def _submit(self, feats: torch.Tensor) -> None:
        self.inbox.put(Block(self.session_no, self._next_block, feats))
        self._next_block += 1

    def _store(self, item: object) -> None:
        if isinstance(item, BlockDone) and item.session_no == self.session_no:
            self._results[item.block_index] = item

    def collect(self, block: bool) -> list[BlockResult]:
        """Move finished blocks from the lane to results, in order; with ``block``, wait for the next one."""
        while True:
            try:
                while True:
                    self._store(self.outbox.get_nowait())
            except queue.Empty:
                pass
            self._drain_reports(0.0)
            self._check_alive()
            if not block or self._emit_next in self._results:
                break
            try:
                self._store(self.outbox.get(timeout=0.2))
            except queue.Empty:
                pass
        out: list[BlockResult] = []
        while self._emit_next in self._results:
            done = self._results.pop(self._emit_next)
            audio = self._pcm.take(done.block_index)
            frag = self._package.push_block(done.frames.numpy(), audio) if self._package is not None else b""
            out.append(BlockResult(done.block_index, done.latent, [], done.frames, audio, frag))
            self._emit_next += 1
        return out

    def _wait_for(self, predicate: Callable[[object], bool], timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or 10 * self.timeout_s)
        while time.monotonic() < deadline:
            try:
                item = self.outbox.get(timeout=0.2)
            except queue.Empty:
                self._drain_reports(0.0)
                self._check_alive()
                continue
            if predicate(item):
                return
            self._store(item)
        self._fail("the lane did not answer in time", None)
