"""The audio-encoder service: session inputs in (topic ``audio``), per-block features out to the session's lane.

Per session, in the order the events arrive on its partition:

- ``start``: encode the sink once (reference image -> VAE latents, prompt -> umT5), store it in Redis,
  claim an idle lane, and send a ``start`` marker to that lane's partition of ``audio-features``;
- ``pcm`` chunk ``seq``: feed the session's :class:`~pipeline_stages.audio_stage.AudioStage`; every
  7,680-sample block it completes becomes one ``block`` message (features + the block's PCM, kept by a
  :class:`~pipeline_stages.audio_stage.BlockPcm`) with a monotonic block index;
- ``end_utterance``: zero-pad and send the partial block at once (no waiting for more audio);
- ``interrupt``: drop the partial block and mark every block sent so far as dropped (``drop_until`` in
  the cursor); the lane replaces dropped blocks it has not started with silence, so the avatar goes
  idle at the next block;
- ``end``: zero-pad and send the last partial block, then an ``end`` marker. Nothing follows it: events
  of the session that arrive after its end (a client's audio racing its own ``DELETE``, idle motion
  queued as the session ended) are dropped, counted in ``liveavatar_refused_total{reason="after_end"}``
  (``features_end`` in the cursor marks the end, so this holds across a restart too).

Idempotence and restart: after each chunk the features are flushed to Kafka *first*, then the
session's cursor (last chunk seq, pending partial-block PCM, last block index) is written to Redis.
A restarted encoder re-reads un-committed chunks: those at or below the cursor are dropped as
duplicates, and the pending PCM is restored, so every block is produced once with the same content
(a crash between flush and cursor write re-produces identical blocks, which the lane drops).
The only session state kept in memory alone is that of a session still waiting for a lane (its
held events, and the fact that it waits): the Kafka offset is never committed past the first record
of such a session (:func:`~services.common.worker.commit_durable`), so a restart re-reads it and the
session is assigned a lane as if nothing happened. A restarted encoder that finds a session's lane
claimed but not told (no ``lane_started`` in the cursor) sends the lane's ``start`` marker again (a
lane drops a duplicate).

The session API never imports torch, so the sink is encoded here: this service holds the encoders
(wav2vec2, the VAE encoder and umT5). The stage encodes each block through the configured backend
(in process, or a Triton server), so both give the features of the single-process run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from kafka import TopicPartition

from infra import topics
from models.audio_encoder import AudioEncoderConfig
from models.inputs import InputError, load_image
from models.liveavatar import LiveAvatarConfig, build_models, default_checkpoint
from pipeline_stages.audio_stage import AudioStage, BlockPcm
from pipeline_stages.sequential import SessionSpec as _Spec
from pipeline_stages.sink import prepare_sink
from services.audio_encoder.backends import AudioFeatureBackend, make_backend
from services.common.health import BLOCK_LATENCY, BLOCKS, DUPLICATES, REFUSED
from services.common.kafka import make_consumer, make_producer
from services.common.logging import get_logger
from services.common.messages import AudioIn, Features, Tensor, WireError, decode, encode, tensor_from_torch
from services.common.redis_state import StateStore
from services.common.worker import GracefulStop, WorkerSettings, run_consume_loop

SERVICE = "audio-encoder"
log = get_logger(SERVICE)


class AudioEncoderSettings(WorkerSettings):
    backend: str = "torch"                     # torch | triton
    triton_url: str = "127.0.0.1:8000"
    lane_pool: str = ""                        # claim lanes of this pool only ("" = any)
    max_image_pixels: int = 40_000_000
    group_id: str = "audio-encoder"


class _TimedBlocks:
    """The feature backend seen as the audio stage's block encoder; observes each block's latency."""

    def __init__(self, backend: AudioFeatureBackend, config: AudioEncoderConfig):
        self.backend, self.config = backend, config

    def encode_block(self, block: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        feats = self.backend.encode_block(block.numpy())                 # [7680] -> [L, D, 12]
        BLOCK_LATENCY.labels(SERVICE, "audio").observe(time.perf_counter() - t0)
        return torch.from_numpy(np.asarray(feats, np.float32))


@dataclass
class SessionCtx:
    session_id: str
    tenant_id: str
    audio: AudioStage                           # PCM -> features of each completed block
    pcm: BlockPcm                               # PCM of the blocks not sent yet (the partial block)
    lane: str = ""
    partition: int = -1
    last_seq: int = -1                          # last audio chunk handled
    waiting: list = field(default_factory=list)  # events held while no lane is free
    hold: tuple[TopicPartition, int] | None = None   # first record read while no lane: never committed past

    @property
    def next_block(self) -> int:
        """Index of the next block to send."""
        return self.pcm.next_block


class AudioEncoderWorker:
    def __init__(self, settings: AudioEncoderSettings):
        self.s = settings
        torch.set_num_threads(settings.threads)
        self.config = LiveAvatarConfig.load(settings.model)
        self.models = build_models(self.config, seed=settings.weights_seed,
                                   checkpoint=default_checkpoint(settings.model, settings.checkpoint),
                                   parts={"audio", "vae", "text"})
        self.backend = make_backend(settings.backend, encoder=self.models.audio, url=settings.triton_url,
                                    wait_ready_s=60.0 if settings.backend == "triton" else 0.0)
        self.blocks = _TimedBlocks(self.backend, self.models.audio.config)
        self.block_samples = self.config.audio.block_samples
        self.store = StateStore.from_settings(settings)
        self.producer = make_producer(settings.kafka())
        self.consumer = make_consumer(settings.kafka(), settings.group_id, [topics.name(topics.AUDIO)],
                                      max_poll_records=64)
        self.sessions: dict[str, SessionCtx] = {}
        self.stop = GracefulStop()
        self.ready = False

    # ---- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("backend", backend=self.s.backend)
        run_consume_loop(SERVICE, self.s, self.consumer, self.producer, self._handle_record, self.stop,
                         lambda: self.ready, lambda: setattr(self, "ready", True),
                         after_poll=self._retry_waiting, active_sessions=lambda: len(self.sessions),
                         held=self.held, pass_record=True)

    def held(self) -> dict[TopicPartition, int]:
        """Per partition, the first record of a session waiting for a lane (commit no further)."""
        out: dict[TopicPartition, int] = {}
        for ctx in self.sessions.values():
            if ctx.hold is not None and not ctx.lane:
                tp, offset = ctx.hold
                out[tp] = min(offset, out.get(tp, offset))
        return out

    def _handle_record(self, rec) -> None:
        self._handle_raw(rec.value, (TopicPartition(rec.topic, rec.partition), rec.offset))

    def _handle_raw(self, raw: bytes, where: tuple[TopicPartition, int] | None = None) -> None:
        try:
            msg = decode(raw)
        except WireError as exc:
            log.warning("dropped undecodable message", error=str(exc))
            return
        h = msg.header
        if not isinstance(h, AudioIn):
            log.warning("dropped a message of the wrong topic", topic=h.topic)
            return
        ctx = self._ctx(h)
        if ctx is None:                        # the end marker was sent: nothing may follow it on the lane
            REFUSED.labels(SERVICE, "after_end").inc()
            log.info("event after the session's end dropped", session_id=h.session_id, tenant_id=h.tenant_id,
                     kind=h.kind, seq=h.seq)
            return
        if not ctx.lane and ctx.hold is None and where is not None:
            ctx.hold = where                   # this session lives in memory only until it has a lane
        if h.seq <= ctx.last_seq:
            DUPLICATES.labels(SERVICE).inc()
            return
        if not ctx.lane and h.kind == "end":   # ended before it ever got a lane: nothing to generate
            self._checkpoint(ctx, h.seq, features_end=ctx.next_block)
            self.store.update_session(ctx.session_id, state="ended")
            self.sessions.pop(ctx.session_id, None)
            return
        if not ctx.lane and h.kind != "start":
            ctx.waiting.append(msg)            # the lane is not assigned yet: keep the order
            return
        self._dispatch(ctx, msg)

    def _dispatch(self, ctx: SessionCtx, msg) -> None:
        h = msg.header
        if h.kind == "start":
            self._start(ctx, h)
        elif h.kind == "pcm":
            pcm = np.array(msg.tensors["pcm"].numpy(), np.float32)       # writable: the stage hands it to torch
            self._pcm(ctx, pcm, h.seq)
        elif h.kind == "end":
            self._end(ctx, h.seq)
        elif h.kind == "end_utterance":        # do not wait for more audio: pad and send the partial block
            self._flush_partial(ctx)
            self.producer.flush()
            self.store.mark_utterance_end(ctx.session_id, h.seq, ctx.next_block - 1)   # utterance.ended (packager)
            self._checkpoint(ctx, h.seq)
        elif h.kind == "interrupt":            # drop queued audio: the partial block here, queued blocks at the lane
            self._new_stream(ctx, ctx.next_block)
            self.store.set_cursor(ctx.session_id, drop_until=ctx.next_block - 1)
            self._checkpoint(ctx, h.seq)

    def _ctx(self, h: AudioIn) -> SessionCtx | None:
        """The session's state: in memory, else restored from its cursor; None once its end was sent."""
        ctx = self.sessions.get(h.session_id)
        if ctx is not None:
            return ctx
        cur = self.store.get_cursor(h.session_id)          # restart: resume from the cursor
        if cur.get("features_end"):
            return None
        ctx = SessionCtx(h.session_id, h.tenant_id, AudioStage(self.blocks), BlockPcm(self.block_samples))
        self._new_stream(ctx, 0)
        if cur:
            ctx.last_seq = int(cur.get("audio_seq", -1))
            self._new_stream(ctx, int(cur.get("features_block", -1)) + 1)
            pending = np.frombuffer(cur.get("audio_pending", b""), dtype="<f4").copy()
            ctx.pcm.push(pending)
            ctx.audio.push(pending)                        # less than one block: completes none
        rec = self.store.get_session(h.session_id)
        if rec is not None and rec.lane and self.store.lane_session(rec.lane) == h.session_id and cur:
            ctx.lane, ctx.partition = rec.lane, int(cur.get("lane_partition", -1))
            if not cur.get("lane_started"):                # died between claiming the lane and telling it
                self._send_start(ctx)
        self.sessions[h.session_id] = ctx
        return ctx

    # ---- events --------------------------------------------------------------------------------
    def _start(self, ctx: SessionCtx, h: AudioIn) -> None:
        opts = h.options or {}
        if self.store.get_sink(ctx.session_id) is None:
            image = self.store.get_image(ctx.session_id)
            try:
                if image is None:
                    raise InputError("the session's reference image is missing or expired")
                rgb = load_image(image, self.s.max_image_pixels)
                with torch.no_grad():
                    sink, (height, width) = prepare_sink(self.models, _Spec(rgb, str(opts.get("prompt", ""))))
            except (InputError, ValueError) as exc:
                self.store.update_session(ctx.session_id, state="failed", error=str(exc))
                log.warning("session failed at start", session_id=ctx.session_id, tenant_id=ctx.tenant_id,
                            error=str(exc))
                self._checkpoint(ctx, h.seq)
                return
            silence = self.backend.encode_block(np.zeros(self.block_samples, np.float32))   # idle / interrupt
            tensors = {"ref": tensor_from_torch(sink.ref_latent), "motion": tensor_from_torch(sink.motion_latents),
                       "text": tensor_from_torch(sink.text_context),
                       "silence": Tensor.from_numpy(np.asarray(silence, np.float32)[None])}
            self.store.put_sink(ctx.session_id, tensors, h)
            self.store.update_session(ctx.session_id, height=height, width=width)
        self._checkpoint(ctx, h.seq)
        if not ctx.lane:
            self._assign(ctx)

    def _assign(self, ctx: SessionCtx) -> bool:
        rec = self.store.get_session(ctx.session_id)
        if rec is None or rec.state in ("ending", "ended", "failed"):   # never resurrect a finished session
            self.sessions.pop(ctx.session_id, None)
            return False
        lane = self.store.claim_lane(ctx.session_id, self.s.lane_pool)
        if lane is None:
            self.store.update_session(ctx.session_id, state="waiting")
            return False
        info = self.store.get_lane(lane) or {}
        ctx.lane, ctx.partition = lane, int(info.get("partition", -1))
        self.store.set_cursor(ctx.session_id, lane_partition=ctx.partition)
        self.store.update_session(ctx.session_id, state="active", lane=lane)
        self._send_start(ctx)
        log.info("session assigned", session_id=ctx.session_id, tenant_id=ctx.tenant_id, lane=lane)
        return True

    def _send_start(self, ctx: SessionCtx) -> None:
        """The lane's ``start`` marker for the session (a lane drops a duplicate), then ``lane_started``."""
        self._send(ctx, Features(session_id=ctx.session_id, tenant_id=ctx.tenant_id, seq=-1, kind="start",
                                 lane_id=ctx.lane))
        self.producer.flush()
        self.store.set_cursor(ctx.session_id, lane_started=1)

    def _retry_waiting(self) -> None:
        for ctx in list(self.sessions.values()):
            if not ctx.lane and (ctx.waiting or self.store.get_sink(ctx.session_id) is not None):
                if self._assign(ctx):
                    held, ctx.waiting = ctx.waiting, []
                    for msg in held:
                        self._dispatch(ctx, msg)
                    ctx.hold = None            # handled and checkpointed: the offset may move on

    def _new_stream(self, ctx: SessionCtx, first_block: int) -> None:
        """Start the session's audio afresh (no partial block) at block ``first_block``."""
        ctx.audio.start_session()
        ctx.pcm = BlockPcm(self.block_samples, first_block)

    def _pcm(self, ctx: SessionCtx, pcm: np.ndarray, seq: int) -> None:
        ctx.pcm.push(pcm)
        for feats in ctx.audio.push(pcm):
            self._block(ctx, feats)
        self.producer.flush()                  # features durable before the cursor moves
        self._checkpoint(ctx, seq)

    def _block(self, ctx: SessionCtx, feats: torch.Tensor) -> None:
        """Send the next block: its features [1, L, D, 12] and its PCM [7680]."""
        BLOCKS.labels(SERVICE, "audio").inc()
        index = ctx.next_block
        pcm = ctx.pcm.take(index)
        header = Features(session_id=ctx.session_id, tenant_id=ctx.tenant_id, seq=index, kind="block",
                          lane_id=ctx.lane)
        self._send(ctx, header, {"features": Tensor.from_numpy(np.asarray(feats, np.float32)),
                                 "pcm": Tensor.from_numpy(np.ascontiguousarray(pcm, np.float32))})

    def _flush_partial(self, ctx: SessionCtx) -> None:
        """Zero-pad and send the partial block, if any; the session's audio goes on from the next block."""
        ctx.pcm.pad_partial()
        for feats in ctx.audio.flush():
            self._block(ctx, feats)
        ctx.audio.start_session()

    def _end(self, ctx: SessionCtx, seq: int) -> None:
        self._flush_partial(ctx)
        self._send(ctx, Features(session_id=ctx.session_id, tenant_id=ctx.tenant_id, seq=ctx.next_block,
                                 kind="end", lane_id=ctx.lane))
        self.producer.flush()
        self._checkpoint(ctx, seq, features_end=ctx.next_block)
        self.sessions.pop(ctx.session_id, None)

    def _send(self, ctx: SessionCtx, header: Features, tensors: dict | None = None) -> None:
        self.producer.send(topics.name(topics.AUDIO_FEATURES), key=ctx.session_id.encode(),
                           value=encode(header, tensors), partition=ctx.partition)

    def _checkpoint(self, ctx: SessionCtx, seq: int, **extra) -> None:
        ctx.last_seq = seq
        self.store.set_cursor(ctx.session_id, audio_seq=seq, features_block=ctx.next_block - 1,
                              audio_pending=ctx.pcm.buf.astype("<f4").tobytes(), **extra)

