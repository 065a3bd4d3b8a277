"""Timestep-forcing Pipeline Parallelism (TPP): one lane = 4 denoise ranks + 1 decode rank.

Rank ``i < steps`` runs denoising step ``i`` for every block, with its own KV cache; rank ``steps``
runs the streaming VAE decode. Blocks flow ``0 -> 1 -> 2 -> 3 -> 4`` as point-to-point messages
(:mod:`pipeline_stages.transport`), so in steady state a finished block leaves the lane every
single-step time while each rank works on a different block.

Messages on the forward channel, in lane order::

    SESSION_START  [ref_latent, motion_latents, text_context, meta, leads?]   every rank prefills
    BLOCK          [latent, audio_features]                                   one Euler step per rank
    HEARTBEAT      []                                                         rank 0 idles: proves liveness
    SESSION_END    []                                                         ranks drop the session
    SHUTDOWN       []

The re-anchored sink latent travels on its own channel (``TAG_ANCHOR``) from the decode rank to every
denoise rank as soon as block 0 is decoded-ready; a denoise rank only waits for it right before
the block that needs it (block 4), by which time it has long arrived, so the pipeline does not stall
the way the reference's broadcast at the clip boundary does.

Failure: every rank reports progress to its supervisor; every receive has a timeout (rank 0 sends a
heartbeat down the lane at least every ``heartbeat_s``). A rank that dies is seen by the supervisor
at once (process exit); a rank that hangs is seen by its downstream neighbour's receive timeout and
by the supervisor's progress timeout. The supervisor then stops every rank and raises
:class:`LaneError` naming the stage and the block.

:class:`TPPLane` is the local lane used by ``liveavatar generate --tpp`` and the tests: the parent
process runs the audio stage and packaging and talks to ranks 0 and 4 through queues. The lane
service (``services/lane``) runs the same :func:`run_rank` with Kafka-backed sources and outputs.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.generator import GenerationOptions, LiveAvatarGenerator, block_noise
from models.liveavatar import LiveAvatarConfig, build_models
from models.scheduler import FlowMatchScheduler
from pipeline_stages.audio_stage import AudioStage, BlockPcm
from pipeline_stages.decode_stage import DecodeStage
from pipeline_stages.denoise_stage import DenoiseStage
from pipeline_stages.sequential import BlockResult, SessionSpec, make_package_stage, prepare_sink
from pipeline_stages.sink import SinkInputs
from pipeline_stages.transport import TAG_ANCHOR, Header, Link, LinkError, MsgKind, backend_for

# ---------------------------------------------------------------------------------------------
# What enters rank 0 and what leaves the decode rank (transport-neutral)
# ---------------------------------------------------------------------------------------------


#: Header flag of a BLOCK that only re-warms the caches after a restart: its frames are not emitted.
FLAG_REPLAY = 1


@dataclass
class StartSession:
    session_no: int
    seed: int
    sink: SinkInputs
    options: GenerationOptions = dataclasses.field(default_factory=GenerationOptions)
    leads: list[int] | None = None
    anchor: torch.Tensor | None = None   # a resumed session's re-anchored latent [1, C, 1, h, w], if known
    tag: str = ""                        # opaque session label the decoder hands back (e.g. the session id)


@dataclass
class Block:
    session_no: int
    block_index: int
    audio: torch.Tensor              # [1, layers, audio_dim, 12]
    pcm: torch.Tensor | None = None  # [7680] float32: travels to the decoder with the block (for packaging)
    replay: bool = False             # re-warm caches only (after a restart); not emitted


@dataclass
class EndSession:
    session_no: int


@dataclass
class Shutdown:
    pass


@dataclass
class BlockDone:
    session_no: int
    block_index: int
    latent: torch.Tensor             # [1, C, 3, h, w]
    frames: torch.Tensor             # [12, H, W, 3] uint8
    pcm: torch.Tensor | None = None  # the block's PCM, when the source sent it


@dataclass
class AnchorReady:
    """The decoder has the session's re-anchored latent (so a restart can resume past block 4)."""

    session_no: int
    latent: torch.Tensor             # [1, C, 1, h, w]


@dataclass
class SessionStarted:
    session_no: int
    tag: str = ""


@dataclass
class SessionEnded:
    session_no: int


class LaneSource(Protocol):
    """Rank 0's input: StartSession / Block / EndSession / Shutdown, or None when nothing arrived."""

    def get(self, timeout: float) -> Any: ...


class LaneOutput(Protocol):
    """The decode rank's output: SessionStarted / BlockDone / SessionEnded."""

    def put(self, item: Any) -> None: ...


class Reporter(Protocol):
    """Progress and errors to the supervisor: ("progress", rank, block) / ("error", rank, block, text)."""

    def put(self, item: Any) -> None: ...


class LaneError(RuntimeError):
    """A stage of the lane failed; the message names the stage and the block."""


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to build its stage and join the lane."""

    rank: int
    steps: int
    config: LiveAvatarConfig
    init_method: str                 # file://... locally; tcp://leader:port in a cluster
    device: str = "cpu"
    dtype: str = "float32"
    weights_seed: int = 0
    checkpoint: str | None = None
    lora: str | None = None
    timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    threads: int = 1
    decode_threads: int | None = None    # the decode rank's torch threads (None: ``threads``)

    @property
    def world_size(self) -> int:
        return self.steps + 1

    @property
    def is_decode(self) -> bool:
        return self.rank == self.steps

    @property
    def stage_name(self) -> str:
        return "decode" if self.is_decode else f"denoise-{self.rank}"

    @property
    def torch_threads(self) -> int:
        """CPU threads of this rank: on CPU the VAE decode costs far more than one denoising step
        (docs/services.md), so the decode rank may get more."""
        return self.decode_threads if self.is_decode and self.decode_threads else self.threads


def stage_name(rank: int, steps: int) -> str:
    return "decode" if rank == steps else f"denoise-{rank}"


def _meta_tensor(start: StartSession) -> torch.Tensor:
    o = start.options
    return torch.tensor([start.seed, int(o.rolling_sink), int(o.reanchor),
                         -1 if o.reanchor_block is None else o.reanchor_block, int(o.sink)], dtype=torch.int64)


def _options_from_meta(meta: torch.Tensor) -> tuple[int, GenerationOptions]:
    seed, rolling, reanchor, rb, sink = meta.tolist()
    return seed, GenerationOptions(rolling_sink=bool(rolling), reanchor=bool(reanchor),
                                   reanchor_block=None if rb < 0 else rb, sink=bool(sink))


def run_rank(spec: RankSpec, source: LaneSource | None, output: LaneOutput | None, report: Reporter) -> None:
    """Body of one lane rank: join the group, build the stage, process messages until SHUTDOWN."""
    import torch.distributed as dist

    torch.set_num_threads(spec.torch_threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    block = -1
    try:
        dist.init_process_group(backend_for(device), init_method=spec.init_method, rank=spec.rank,
                                world_size=spec.world_size,
                                timeout=__import__("datetime").timedelta(seconds=max(60.0, spec.timeout_s)))
        parts = {"vae"} if spec.is_decode else {"dit"}
        models = build_models(spec.config, device=device, dtype=getattr(torch, spec.dtype), seed=spec.weights_seed,
                              checkpoint=spec.checkpoint, lora=spec.lora, parts=parts)
        report.put(("ready", spec.rank, -1))
        if spec.is_decode:
            _decode_loop(spec, models, output, report)
        else:
            _denoise_loop(spec, models, source, report)
    except BaseException as exc:  # report, then exit non-zero: the supervisor stops the lane
        detail = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, LinkError):
            detail += "\n" + traceback.format_exc(limit=4)
        peer = exc.peer if isinstance(exc, LinkError) else None   # a silent or vanished neighbour is the suspect
        report.put(("error", spec.rank, getattr(exc, "block_index", block), detail, peer))
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may be gone already
                pass


class _StageFailed(RuntimeError):
    def __init__(self, msg: str, block_index: int):
        super().__init__(msg)
        self.block_index = block_index


def _denoise_loop(spec: RankSpec, models, source: LaneSource | None, report: Reporter) -> None:
    device = torch.device(spec.device)
    fwd = Link(device, spec.timeout_s)
    anchor = Link(device, spec.timeout_s, tag=TAG_ANCHOR, max_in_flight=64)  # a few per session, never block
    generator = LiveAvatarGenerator(models.dit, FlowMatchScheduler(spec.config.scheduler))
    stage = DenoiseStage(generator, spec.rank)
    up, down, decode_rank = spec.rank - 1, spec.rank + 1, spec.steps
    session_no, seed, options = -1, 0, GenerationOptions()
    last_block = -1            # last block run in this session
    anchor_taken = False
    last_sent = time.monotonic()

    def next_message():
        """Rank 0 reads its source (sending heartbeats while idle); others receive from upstream."""
        nonlocal last_sent
        if up >= 0:
            m = fwd.recv(up)
            return m.header, m.tensors
        while True:
            item = source.get(timeout=spec.heartbeat_s / 2)
            if item is not None:
                return _to_wire(item)
            if time.monotonic() - last_sent >= spec.heartbeat_s:
                return Header(MsgKind.HEARTBEAT, session_no, last_block), []

    def take_anchor() -> None:
        """Receive this session's anchor (dropping stale ones of sessions that ended early)."""
        nonlocal anchor_taken
        while True:
            m = anchor.recv(decode_rank)
            if m.header.session_no == session_no:
                stage.set_anchor(m.tensors[0])
                anchor_taken = True
                return

    while True:
        header, tensors = next_message()
        kind = header.kind
        if kind == MsgKind.SESSION_START:
            ref, motion, text, meta = tensors[:4]
            extra = _start_extras(header, tensors)
            session_no = header.session_no
            seed, options = _options_from_meta(meta)
            stage.start_session(SinkInputs(ref, motion, text), seed, options, extra.get("leads"))
            last_block, anchor_taken = -1, False
            if "anchor" in extra:          # a resumed session: the anchor is known already
                stage.set_anchor(extra["anchor"])
                anchor_taken = True
        elif kind == MsgKind.BLOCK:
            b = header.block_index
            if header.session_no != session_no:
                raise _StageFailed(f"block of session {header.session_no} while serving {session_no}", b)
            if stage.needs_anchor(b):
                take_anchor()
            x, audio, *pcm = tensors
            if spec.rank == 0:
                x = block_noise(seed, b, generator.noise_shape(stage.session), models.dit.dtype, models.dit.device)
            tensors = [stage.run(b, x, audio), audio, *pcm]
            last_block = b
        elif kind == MsgKind.SESSION_END:
            # an anchor was sent after block 0 but never needed (session shorter than one clip): drain it
            if options.reanchor and last_block >= 0 and not anchor_taken:
                take_anchor()
            stage.end_session()
        if kind == MsgKind.BLOCK and down == decode_rank:
            tensors = [tensors[0], *tensors[2:]]   # the decoder needs the latent (and PCM), not the features
        fwd.send(down, Header(kind, header.session_no, header.block_index, header.flags), tensors)
        last_sent = time.monotonic()
        report.put(("progress", spec.rank, header.block_index if kind == MsgKind.BLOCK else -1))
        if kind == MsgKind.SHUTDOWN:
            fwd.flush()
            anchor.flush()
            return


#: SESSION_START flags saying which optional tensors follow [ref, motion, text, meta].
START_HAS_LEADS, START_HAS_ANCHOR, START_HAS_TAG = 1, 2, 4


def _start_extras(header: Header, tensors: list[torch.Tensor]) -> dict[str, Any]:
    extra, rest = {}, list(tensors[4:])
    if header.flags & START_HAS_LEADS:
        extra["leads"] = rest.pop(0).tolist()
    if header.flags & START_HAS_ANCHOR:
        extra["anchor"] = rest.pop(0)
    if header.flags & START_HAS_TAG:
        extra["tag"] = bytes(rest.pop(0).cpu().tolist()).decode()
    return extra


def _to_wire(item) -> tuple[Header, list[torch.Tensor]]:
    """Rank 0: a source item -> the header and tensors it forwards."""
    if isinstance(item, StartSession):
        t, flags = [*item.sink.tensors(), _meta_tensor(item)], 0
        if item.leads is not None:
            t.append(torch.tensor(item.leads, dtype=torch.int64))
            flags |= START_HAS_LEADS
        if item.anchor is not None:
            t.append(item.anchor)
            flags |= START_HAS_ANCHOR
        if item.tag:
            t.append(torch.tensor(list(item.tag.encode()), dtype=torch.uint8))
            flags |= START_HAS_TAG
        return Header(MsgKind.SESSION_START, item.session_no, flags=flags), t
    if isinstance(item, Block):
        # rank 0 draws the block's noise itself; the first tensor slot is a placeholder
        pcm = [] if item.pcm is None else [item.pcm]
        return (Header(MsgKind.BLOCK, item.session_no, item.block_index, FLAG_REPLAY if item.replay else 0),
                [torch.zeros(1), item.audio, *pcm])
    if isinstance(item, EndSession):
        return Header(MsgKind.SESSION_END, item.session_no), []
    if isinstance(item, Shutdown):
        return Header(MsgKind.SHUTDOWN), []
    raise TypeError(f"rank 0 cannot handle {type(item).__name__}")


def _decode_loop(spec: RankSpec, models, output: LaneOutput, report: Reporter) -> None:
    device = torch.device(spec.device)
    fwd = Link(device, spec.timeout_s)
    anchor = Link(device, spec.timeout_s, tag=TAG_ANCHOR, max_in_flight=64)  # a few per session, never block
    stage = DecodeStage(models.vae)
    up = spec.steps - 1
    reanchor = True
    while True:
        m = fwd.recv(up)
        h = m.header
        if h.kind == MsgKind.SESSION_START:
            _, motion, _, meta = m.tensors[:4]
            extra = _start_extras(h, m.tensors)
            # a resumed session that already has its anchor must not send a new one
            reanchor = _options_from_meta(meta)[1].reanchor and "anchor" not in extra
            stage.start_session(motion)
            output.put(SessionStarted(h.session_no, extra.get("tag", "")))
        elif h.kind == MsgKind.BLOCK:
            latent, *pcm = m.tensors
            if h.block_index == 0 and reanchor:
                for r in range(spec.steps):     # async: the denoise ranks take it when they need it
                    anchor.send(r, Header(MsgKind.ANCHOR, h.session_no, 0), [latent[:, :, :1]])
                output.put(AnchorReady(h.session_no, latent[:, :, :1].cpu()))
            frames = stage.run(latent)
            if not h.flags & FLAG_REPLAY:
                output.put(BlockDone(h.session_no, h.block_index, latent.cpu(), frames.cpu(),
                                     pcm[0].cpu() if pcm else None))
        elif h.kind == MsgKind.SESSION_END:
            stage.end_session()
            output.put(SessionEnded(h.session_no))
        report.put(("progress", spec.rank, h.block_index if h.kind == MsgKind.BLOCK else -1))
        if h.kind == MsgKind.SHUTDOWN:
            anchor.flush()
            return


# ---------------------------------------------------------------------------------------------
# A local lane: 5 processes, supervised from the parent
# ---------------------------------------------------------------------------------------------


class _QueueSource:
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
        run_rank(spec, _QueueSource(inbox) if spec.rank == 0 else None, outbox if spec.is_decode else None, reports)
    except BaseException:  # noqa: BLE001 - already reported
        code = 1
    finally:
        for q in (outbox, reports):
            if q is not None:
                q.close()
                q.join_thread()
        os._exit(code)


class TPPLane:
    """A local lane of ``steps + 1`` processes, with the audio and packaging stages in the caller.

    Use as a context manager::

        with TPPLane(LiveAvatarConfig.tiny()) as lane:
            init = lane.start_session(spec)
            for res in lane.generate(pcm): ...
            tail = lane.close_session()
    """

    def __init__(self, config: LiveAvatarConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, checkpoint: str | None = None, lora: str | None = None, timeout_s: float = 30.0,
                 heartbeat_s: float = 1.0, threads_per_rank: int = 1, package: bool = True,
                 decode_threads: int | None = None):
        self.config = config
        self.steps = config.scheduler.num_inference_steps
        self.device, self.dtype, self.seed = device, dtype, seed
        self.checkpoint, self.lora = checkpoint, lora
        self.timeout_s, self.heartbeat_s, self.threads = timeout_s, heartbeat_s, threads_per_rank
        self.decode_threads = decode_threads
        self.package_enabled = package
        self.procs: list = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.progress: dict[int, tuple[float, int]] = {}     # rank -> (last report time, last block)
        self.errors: dict[int, tuple[int, str, int | None]] = {}  # rank -> (block, detail, blamed peer)
        self.session_no = 0
        self._pending_blocks = 0
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

    def __exit__(self, *exc) -> None:
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
        self.reports = [ctx.Queue() for _ in range(self.steps + 1)]
        # the parent runs the audio stage and encodes the sink: audio encoder, text encoder and VAE
        self.models = build_models(self.config, device="cpu", dtype=torch.float32, seed=self.seed,
                                   checkpoint=self.checkpoint, lora=None, parts={"vae", "audio", "text"})
        for rank in range(self.steps + 1):
            spec = RankSpec(rank, self.steps, self.config, init, self.rank_device(rank),
                            str(self.dtype).removeprefix("torch."), self.seed, self.checkpoint, self.lora,
                            self.timeout_s, self.heartbeat_s, self.threads, self.decode_threads)
            p = ctx.Process(target=_rank_main, args=(spec, self.inbox, self.outbox, self.reports[rank], os.getpid()),
                            name=f"liveavatar-{stage_name(rank, self.steps)}", daemon=True)
            p.start()
            self.procs.append(p)
        deadline = time.monotonic() + ready_timeout_s
        ready: set[int] = set()
        while len(ready) < len(self.procs):
            if time.monotonic() > deadline:
                self._fail("lane did not become ready in time", None)
            for kind, rank, *_ in self._drain_reports(0.2):
                if kind == "ready":
                    ready.add(rank)
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
    def _read_reports(self, timeout: float = 0.0) -> list[tuple]:
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
                    self._fail(f"stage {stage_name(rank, self.steps)} died while reporting ({exc!r}); "
                               f"last block it finished: {self.progress.get(rank, (0, -1))[1]}", rank)
            if out or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        now = time.monotonic()
        for item in out:
            kind, rank, block = item[:3]
            self.progress[rank] = (now, max(block, self.progress.get(rank, (0, -1))[1]))
            if kind == "error":
                self.errors[rank] = (block, item[3], item[4])
        return out

    def _drain_reports(self, timeout: float) -> list[tuple]:
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
            self._fail(f"stage {stage_name(r, self.steps)} died (exit code {self.procs[r].exitcode}) "
                       f"after block {self._last(r)}", r)
        for rank, (block, detail, peer) in sorted(self.errors.items()):
            if peer is None:   # a stage that failed on its own, e.g. bad input or out of memory
                self._fail(f"stage {stage_name(rank, self.steps)} failed at block {block}: {detail}", rank)
        if self.errors:
            rank, (block, detail, peer) = min(self.errors.items())
            self._fail(f"stage {stage_name(peer, self.steps)} stopped responding: {stage_name(rank, self.steps)} "
                       f"lost it ({detail}); last block it finished: {self._last(peer)}", peer)

    def _check_alive(self) -> None:
        if any(p.exitcode not in (None, 0) for p in self.procs):
            self._diagnose()
        now = time.monotonic()
        for rank in range(len(self.procs)):
            seen, last = self.progress.get(rank, (now, -1))
            if now - seen > self.timeout_s:
                self._fail(f"stage {stage_name(rank, self.steps)} hung: no progress for "
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

    def _store(self, item) -> None:
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

    def _wait_for(self, predicate, timeout_s: float | None = None) -> None:
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
