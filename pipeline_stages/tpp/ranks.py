"""One rank of a lane: join the process group, build the rank's stages, run its loop until SHUTDOWN.

Every rank runs the same loop (:func:`_rank_loop`); the lane's shape (:class:`LaneShape`) says what a
rank holds. A rank runs its denoising steps (:meth:`LaneShape.steps_of`, one stage and KV cache per
step) on every block that passes; the head also reads the lane's source and draws each block's noise.
The decode rank (the last; it may run steps first) runs the streaming VAE decode, hands finished blocks
to its output, and sends the session's re-anchor latent (:func:`models.generator.anchor_from_block`) to
every other denoise rank on the anchor channel as soon as block 0's final latent is there; a denoise
rank waits for it only right before the block that needs it.

Every rank reports to its supervisor (:class:`RankReady`, :class:`RankProgress`, :class:`RankFailed`)
and every receive has a timeout (the head sends a heartbeat down the lane at least every
``heartbeat_s``), so a dead or hung neighbour is noticed in bounded time.
"""

from __future__ import annotations

import datetime
import os
import re
import time
import traceback
from dataclasses import dataclass
from typing import Protocol

import torch

from models.generator import GenerationOptions, LiveAvatarGenerator, anchor_from_block, block_noise
from models.liveavatar import LiveAvatarConfig, build_models
from models.scheduler import FlowMatchScheduler
from pipeline_stages.decode_stage import DecodeStage
from pipeline_stages.denoise_stage import DenoiseStage
from pipeline_stages.tpp.shape import LaneShape
from pipeline_stages.tpp.wire import (
    AnchorReady,
    Block,
    BlockDone,
    EndSession,
    ForwardMessage,
    Heartbeat,
    LaneBlock,
    SessionEnded,
    SessionStarted,
    Shutdown,
    StartSession,
    from_wire,
    to_wire,
)
from pipeline_stages.transport import TAG_ANCHOR, Link, LinkError, backend_for

# ---------------------------------------------------------------------------------------------
# What a rank is given, reads, writes and reports
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class RankSpec:
    """Everything a rank process needs to build its stages and join the lane."""

    rank: int
    shape: LaneShape
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

    def __post_init__(self) -> None:
        self.shape.check(self.rank)

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def is_decode(self) -> bool:
        return self.shape.is_decode(self.rank)

    @property
    def stage_name(self) -> str:
        return self.shape.stage_name(self.rank)

    @property
    def torch_threads(self) -> int:
        """CPU threads of this rank at start: on CPU the VAE decode costs far more than one denoising step
        (docs/services.md), so a decode-only rank may get more. A rank that runs denoising steps and the
        decoder runs its steps on ``threads`` and switches to ``decode_threads`` for the decode only
        (:attr:`decode_switch`), so its latents do not depend on the decoder's thread count."""
        if self.is_decode and self.decode_threads and not self.shape.steps_of(self.rank):
            return self.decode_threads
        return self.threads

    @property
    def decode_switch(self) -> int | None:
        """Threads to switch to around the decode on a rank that also denoises (None: no switch)."""
        if self.is_decode and self.decode_threads and self.shape.steps_of(self.rank) \
                and self.decode_threads != self.threads:
            return self.decode_threads
        return None


@dataclass(frozen=True)
class RankReport:
    """A rank's word to its supervisor: who, and the last block it finished (-1: none in this message)."""

    rank: int
    block_index: int


@dataclass(frozen=True)
class RankReady(RankReport):
    """The rank joined the group and built its stages."""

    block_index: int = -1


@dataclass(frozen=True)
class RankProgress(RankReport):
    """The rank passed a message on (``block_index`` of a block, else -1)."""


@dataclass(frozen=True)
class RankFailed(RankReport):
    """The rank failed and is exiting."""

    detail: str
    peer: int | None = None          # the neighbour that went silent or vanished (a LinkError), if that was it


class LaneSource(Protocol):
    """The head's input: StartSession / Block / EndSession / Shutdown, or None when nothing arrived."""

    def get(self, timeout: float) -> StartSession | Block | EndSession | Shutdown | None: ...


class LaneOutput(Protocol):
    """The decode rank's output: SessionStarted / AnchorReady / BlockDone / SessionEnded."""

    def put(self, item: SessionStarted | AnchorReady | BlockDone | SessionEnded) -> None: ...


class Reporter(Protocol):
    """Where a rank sends its :class:`RankReport` s."""

    def put(self, item: RankReport) -> None: ...


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------


def run_rank(spec: RankSpec, source: LaneSource | None, output: LaneOutput | None, report: Reporter) -> None:
    """Body of one lane rank: join the group, build the stages, process messages until SHUTDOWN.

    ``source`` is used on the head only, ``output`` on the decode rank only. A failure is reported
    (:class:`RankFailed`) and re-raised.
    """
    import torch.distributed as dist

    torch.set_num_threads(spec.torch_threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec.init_method.startswith("file://") or re.match(r"tcp://(127\.|localhost[:/])", spec.init_method):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")   # one host; ranks in pods/containers use their own IP
    try:
        dist.init_process_group(backend_for(device), init_method=spec.init_method, rank=spec.rank,
                                world_size=spec.world_size,
                                timeout=datetime.timedelta(seconds=max(60.0, spec.timeout_s)))
        parts = ({"dit"} if spec.shape.steps_of(spec.rank) else set()) | ({"vae"} if spec.is_decode else set())
        models = build_models(spec.config, device=device, dtype=getattr(torch, spec.dtype), seed=spec.weights_seed,
                              checkpoint=spec.checkpoint, lora=spec.lora, parts=parts)
        report.put(RankReady(spec.rank))
        _rank_loop(spec, models, source, output, report)
    except BaseException as exc:  # report, then exit non-zero: the supervisor stops the lane
        detail = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, LinkError):
            detail += "\n" + traceback.format_exc(limit=4)
        peer = exc.peer if isinstance(exc, LinkError) else None   # a silent or vanished neighbour is the suspect
        report.put(RankFailed(spec.rank, getattr(exc, "block_index", -1), detail, peer))
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


def _rank_loop(spec: RankSpec, models, source: LaneSource | None, output: LaneOutput | None,
               report: Reporter) -> None:
    """Every rank's loop: run this rank's denoising steps (if any) on each block, then either pass the
    block downstream or, on the decode rank, decode it (sending block 0's anchor to the other ranks)."""
    shape, rank = spec.shape, spec.rank
    device = torch.device(spec.device)
    fwd = Link(device, spec.timeout_s)
    anchors = Link(device, spec.timeout_s, tag=TAG_ANCHOR, max_in_flight=64)  # a few per session, never block
    steps = shape.steps_of(rank)
    generator = LiveAvatarGenerator(models.dit, FlowMatchScheduler(spec.config.scheduler)) if steps else None
    stages = [DenoiseStage(generator, step) for step in steps]       # one KV cache per step
    decoder = DecodeStage(models.vae) if shape.is_decode(rank) else None
    peers = shape.anchor_peers(rank)
    up, down = shape.upstream(rank), shape.downstream(rank)
    features_downstream = down is not None and bool(shape.steps_of(down))  # a decode-only rank needs no features
    session_no, seed, options = -1, 0, GenerationOptions()
    last_block = -1            # last block run in this session
    anchor_taken = False       # this rank's stages hold the session's anchor
    send_anchor = False        # the decode rank: this session's anchor is still to be made and sent
    last_sent = time.monotonic()

    def next_message() -> ForwardMessage | Block:
        """The head reads its source (a heartbeat when it idles too long); the others receive from upstream."""
        if up is not None:
            m = fwd.recv(up)
            return from_wire(m.header, m.tensors)
        while True:
            item = source.get(timeout=spec.heartbeat_s / 2)
            if isinstance(item, (StartSession, Block, EndSession, Shutdown)):
                return item
            if item is not None:
                raise TypeError(f"the lane's head cannot handle {type(item).__name__}")
            if time.monotonic() - last_sent >= spec.heartbeat_s:
                return Heartbeat(session_no, last_block)

    def set_anchor(latent: torch.Tensor) -> None:
        nonlocal anchor_taken
        for stage in stages:
            stage.set_anchor(latent)
        anchor_taken = True

    def take_anchor(block: int) -> None:
        """Receive this session's anchor from the decode rank (dropping stale ones of sessions that ended early)."""
        if decoder is not None:       # this rank makes the anchor itself: it cannot be missing here
            raise _StageFailed(f"block {block} needs the re-anchor latent, which this rank never made", block)
        while True:
            m = anchors.recv(shape.decode_rank)
            got = from_wire(m.header, m.tensors)
            if got.session_no == session_no:
                set_anchor(got.latent)
                return

    while True:
        item = next_message()
        block = -1
        if isinstance(item, StartSession):
            session_no, seed, options = item.session_no, item.seed, item.options
            for stage in stages:
                stage.start_session(item.sink, seed, options, item.leads)
            last_block, anchor_taken = -1, False
            if item.anchor is not None and stages:   # a resumed session: the anchor is known already
                set_anchor(item.anchor)
            if decoder is not None:
                # a resumed session that already has its anchor must not send a new one
                send_anchor = item.options.reanchor and item.anchor is None
                decoder.start_session(item.sink.motion_latents)
                output.put(SessionStarted(item.session_no, item.tag))
        elif isinstance(item, (Block, LaneBlock)):
            block = item.block_index
            if stages and item.session_no != session_no:
                raise _StageFailed(f"block of session {item.session_no} while serving {session_no}", block)
            if any(stage.needs_anchor(block) for stage in stages):
                take_anchor(block)
            if isinstance(item, Block):          # the head: the block's noise is a pure function of (seed, block)
                x = block_noise(seed, block, generator.noise_shape(stages[0].session), models.dit.dtype,
                                models.dit.device)
            else:
                x = item.latent
            for stage in stages:
                x = stage.run(block, x, item.audio)
            if decoder is None:
                # the decoder needs the latent (and the PCM), not the audio features
                item = LaneBlock(item.session_no, block, x, item.audio if features_downstream else None,
                                 item.pcm, item.replay)
            else:
                anchor = anchor_from_block(block, x) if send_anchor else None
                if anchor is not None:
                    header, tensors = to_wire(AnchorReady(item.session_no, anchor))
                    for r in peers:              # async: the other denoise ranks take it when they need it
                        anchors.send(r, header, tensors)
                    if stages:
                        set_anchor(anchor)
                    output.put(AnchorReady(item.session_no, anchor.cpu()))
                if spec.decode_switch:
                    torch.set_num_threads(spec.decode_switch)
                frames = decoder.run(x)
                if spec.decode_switch:
                    torch.set_num_threads(spec.threads)
                if not item.replay:
                    output.put(BlockDone(item.session_no, block, x.cpu(), frames.cpu(),
                                         None if item.pcm is None else item.pcm.cpu()))
            last_block = block
        elif isinstance(item, EndSession):
            # an anchor was sent after block 0 but never needed (session shorter than one clip): drain it
            if stages and decoder is None and options.reanchor and last_block >= 0 and not anchor_taken:
                take_anchor(last_block)
            for stage in stages:
                stage.end_session()
            if decoder is not None:
                decoder.end_session()
                output.put(SessionEnded(item.session_no))
        if down is not None:
            fwd.send(down, *to_wire(item))
        last_sent = time.monotonic()
        report.put(RankProgress(rank, block))
        if isinstance(item, Shutdown):
            fwd.flush()
            anchors.flush()
            return
