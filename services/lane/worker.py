"""The lane service: one image, one process per rank; the role comes from the rank.

- rank 0 (the head, the first denoise rank): reads its partition of ``audio-features`` and feeds the lane;
- the next ranks: denoise steps, joined by ``torch.distributed`` only;
- the last rank: the VAE decoder (alone in shape ``D+1``, after its denoising steps in shape ``D``); encodes
  each decoded block to H.264 access units and writes them to ``frames``, and the cursor to Redis.

Rank 0 feeds the ranks one session at a time, in partition order, and nothing of a session after its
``end`` marker (a re-sent end, a block that raced the end): the ranks have closed that session, so such a
message is dropped and counted, never fed.

The ranks are :func:`pipeline_stages.tpp.run_rank` with Kafka/Redis-backed sources and outputs; which rank
does what comes from the lane's shape (``LIVEAVATAR_LANE_SHAPE``, :class:`pipeline_stages.tpp.LaneShape`).

Restart (a rank died; the whole group is recreated, as LeaderWorkerSet's RecreateGroupOnPodRestart
does and as ``services.lane.group`` does locally): the head finds in Redis the session its lane was
serving and the last block the decoder emitted (``lane_block``). It restarts the session from the
sink stored in Redis (with the re-anchored latent when there is one), re-runs the previous
``kv_cache_blocks`` blocks as *replay* blocks (they refill every stage's KV ring and the decoder's
causal cache; their frames are not emitted), and continues at ``lane_block + 1``. The head commits
its Kafka offset at the block the replay would start from, so those blocks are still readable.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from dataclasses import dataclass

import torch
from kafka import OffsetAndMetadata, TopicPartition

from infra import topics
from models.generator import GenerationOptions
from models.liveavatar import LiveAvatarConfig, default_checkpoint
from pipeline_stages.package_stage import lane_stream_config
from pipeline_stages.sink import SinkInputs
from pipeline_stages.tpp import (
    AnchorReady,
    Block,
    BlockDone,
    EndSession,
    LaneShape,
    RankFailed,
    RankReady,
    RankReport,
    RankSpec,
    SessionEnded,
    SessionStarted,
    Shutdown,
    StartSession,
    run_rank,
)
from pipeline_stages.tpp.shape import parse_shape
from pipeline_stages.video_encode import BlockVideoEncoder
from services.common.health import ACTIVE_SESSIONS, BLOCK_LATENCY, BLOCKS, DUPLICATES, FPS, QUEUE_LAG, HealthServer
from services.common.kafka import make_consumer, make_producer
from services.common.logging import get_logger
from services.common.messages import (
    Features,
    Frames,
    WireError,
    decode,
    encode,
    h264_tensors,
    tensor_from_torch,
    tensor_to_torch,
)
from services.common.redis_state import StateStore
from services.common.worker import LAG_EXPORT_S, GracefulStop, WorkerSettings, update_lag

SERVICE = "lane"
log = get_logger(SERVICE)


class LaneSettings(WorkerSettings):
    lane_id: str = "lane-0"
    lane_partition: int = 0                  # partition of audio-features this lane owns
    # In a LeaderWorkerSet: lane id = <prefix>-<group index>, partition = base + group index
    lane_group_index: int | None = None
    lane_id_prefix: str = ""
    lane_partition_base: int = 0
    health_port_by_rank: bool = True         # local: ranks share a host, so rank r serves health_port + r
    lane_pool: str = "default"
    lane_shape: str = "4+1"                  # D+1 or D: D denoise ranks, the decoder on its own rank or not (docs/tpp.md)
    dist_rank: int = 0                       # LWS_WORKER_INDEX in a LeaderWorkerSet
    dist_world_size: int | None = None       # LWS_GROUP_SIZE in a LeaderWorkerSet: checked against the lane's ranks
    dist_init_method: str = ""               # file:///path locally; tcp://<leader>:29500 in a cluster
    dist_master_addr: str = ""
    dist_master_port: int = 29500
    device: str = "cpu"
    dtype: str = "float32"
    rank_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    decode_threads: int | None = None        # torch threads of the decode rank (unset: threads; docs/services.md)
    emit_latents: bool = False               # also put each block's final latent on the frames topic (tests)

    def model_post_init(self, _ctx) -> None:
        denoisers, own_decoder = parse_shape(self.lane_shape)    # a bad shape fails here, with the syntax
        ranks = denoisers + (1 if own_decoder else 0)
        if self.dist_world_size is not None and self.dist_world_size != ranks:
            raise ValueError(f"LIVEAVATAR_DIST_WORLD_SIZE={self.dist_world_size} but a lane of shape "
                             f"{self.lane_shape} has {ranks} ranks (the LeaderWorkerSet size must match)")
        if not 0 <= self.dist_rank < ranks:
            raise ValueError(f"LIVEAVATAR_DIST_RANK={self.dist_rank} is outside the lane's ranks 0..{ranks - 1}")
        if self.lane_group_index is not None and self.lane_id_prefix:
            object.__setattr__(self, "lane_id", f"{self.lane_id_prefix}-{self.lane_group_index}")
            object.__setattr__(self, "lane_partition", self.lane_partition_base + self.lane_group_index)

    def init_method(self) -> str:
        if self.dist_init_method:
            return self.dist_init_method
        if self.dist_master_addr:
            return f"tcp://{self.dist_master_addr}:{self.dist_master_port}"
        raise ValueError("set LIVEAVATAR_DIST_INIT_METHOD or LIVEAVATAR_DIST_MASTER_ADDR")


@dataclass
class _Serving:
    session_id: str
    tenant_id: str
    session_no: int
    next_block: int          # first block to run for real; smaller ones are replay or duplicates
    replay_from: int
    max_seen: int = -1       # highest block index fed to the lane (idempotence)
    silence: torch.Tensor | None = None   # features of a silent block (idle, interrupt)
    ended: bool = False      # its end marker was read: what follows it is a leftover


class KafkaLaneSource:
    """Rank 0's input: this lane's partition of audio-features, plus recovery from Redis."""

    def __init__(self, s: LaneSettings, store: StateStore, config: LiveAvatarConfig):
        self.s, self.store, self.config = s, store, config
        self.tp = TopicPartition(topics.name(topics.AUDIO_FEATURES), s.lane_partition)
        self.consumer = make_consumer(s.kafka(), group_id=f"lane-{s.lane_id}", topics=None,
                                      max_poll_records=2)   # read little ahead: interrupts act on what is queued
        self.consumer.assign([self.tp])
        self.pending: collections.deque = collections.deque()
        self.offsets: dict[int, int] = {}     # block index -> offset (recent blocks of the current session)
        self.serving: _Serving | None = None
        self.session_no = 0
        self._last_commit = 0.0
        self._next_lag = 0.0
        self._silence: torch.Tensor | None = None
        store.register_lane(s.lane_id, s.lane_partition, s.lane_pool)
        threading.Thread(target=self._heartbeat, daemon=True).start()
        self._resume()

    def _heartbeat(self) -> None:
        """Redis only: the Kafka consumer is not thread-safe, so commits happen in :meth:`get`."""
        while True:
            try:
                self.store.heartbeat_lane(self.s.lane_id)
            except Exception as exc:  # noqa: BLE001 - keep beating; Redis may come back
                log.warning("lane heartbeat failed", error=str(exc))
            time.sleep(2)

    def _commit(self, lane_block: int) -> None:
        """Commit the offset of the first block a restart would replay (never past an unemitted block)."""
        sv = self.serving
        if sv is None:
            return
        resume = lane_block + 1
        first = max(sv.replay_from, resume - self.config.dit.kv_cache_blocks)
        if first in self.offsets:
            self.consumer.commit({self.tp: OffsetAndMetadata(self.offsets[first], None, -1)})
            for b in [b for b in self.offsets if b < first]:
                del self.offsets[b]

    def _export_lag(self, lane_block: int) -> None:
        """Lag of this lane in blocks: unread on Kafka + read (started or not) but not yet emitted."""
        kafka_lag = update_lag(self.consumer, SERVICE).get(self.tp.topic, 0)
        sv = self.serving
        in_flight = 0
        if sv is not None:
            in_flight = max(0, sv.max_seen - lane_block)
        QUEUE_LAG.labels(SERVICE, self.tp.topic).set(kafka_lag + in_flight)   # in_flight includes read-ahead

    def _resume(self) -> None:
        """After a restart: continue the session this lane was serving, if any."""
        sid = self.store.lane_session(self.s.lane_id)     # outlives the heartbeat of a lane that restarted
        rec = self.store.get_session(sid) if sid else None
        if rec is None or rec.state not in ("active", "ending"):
            return
        resume = self.store.cursor_int(sid, "lane_block") + 1
        replay_from = max(0, resume - self.config.dit.kv_cache_blocks)
        start = self._start_item(sid, rec.tenant_id, anchor=resume > 0)
        if start is None:
            return
        self.serving = _Serving(sid, rec.tenant_id, start.session_no, resume, replay_from, silence=self._silence)
        self.pending.append(start)
        log.info("resuming session after restart", session_id=sid, tenant_id=rec.tenant_id,
                 resume_block=resume, replay_from=replay_from)

    def _start_item(self, sid: str, tenant: str, anchor: bool) -> StartSession | None:
        msg = self.store.get_sink(sid)
        if msg is None:
            log.error("no sink in Redis for session", session_id=sid)
            return None
        opts = msg.header.options or {}
        t = {k: tensor_to_torch(v) for k, v in msg.tensors.items()}
        anchor_t = self.store.get_anchor(sid) if anchor else None
        self._silence = tensor_to_torch(msg.tensors["silence"]) if "silence" in msg.tensors else None
        self.session_no += 1
        return StartSession(self.session_no, int(opts.get("seed", 0)), SinkInputs(t["ref"], t["motion"], t["text"]),
                            GenerationOptions(), None, None if anchor_t is None else tensor_to_torch(anchor_t),
                            tag=f"{tenant}/{sid}")

    def get(self, timeout: float):
        now = time.monotonic()
        if now - self._last_commit > 0.5:
            sv = self.serving                 # one read of the decoder's cursor serves the commit and the lag
            lane_block = self.store.cursor_int(sv.session_id, "lane_block") if sv is not None else -1
            self._commit(lane_block)
            if now >= self._next_lag:         # the end offsets are a broker request: once a second is enough
                self._export_lag(lane_block)
                self._next_lag = now + LAG_EXPORT_S
            self._last_commit = now
        if not self.pending:
            batch = self.consumer.poll(timeout_ms=int(timeout * 1000))
            for recs in batch.values():
                for rec in recs:
                    item = self._convert(rec)
                    if item is not None:
                        self.pending.append(item)
        return self._interrupted(self.pending.popleft()) if self.pending else None

    def _interrupted(self, item):
        """A block the session interrupted before the lane started it becomes silence (the avatar goes idle)."""
        sv = self.serving
        if (isinstance(item, Block) and sv is not None and sv.silence is not None and not item.replay
                and item.block_index <= self.store.cursor_int(sv.session_id, "drop_until")):
            return dataclasses.replace(item, audio=sv.silence, pcm=torch.zeros_like(item.pcm))
        return item

    def _convert(self, rec):
        try:
            msg = decode(rec.value)
        except WireError as exc:
            log.warning("dropped undecodable features", error=str(exc))
            return None
        h = msg.header
        if not isinstance(h, Features):
            return None
        sv = self.serving
        if h.kind == "start":
            if sv is not None and sv.session_id == h.session_id:
                DUPLICATES.labels(SERVICE).inc()          # replayed start of the session we serve
                return None
            item = self._start_item(h.session_id, h.tenant_id, anchor=False)
            if item is not None:
                self.serving = _Serving(h.session_id, h.tenant_id, item.session_no, 0, 0, silence=self._silence)
                self.offsets = {}
            return item
        if sv is None or h.session_id != sv.session_id:
            return None                                   # an old session's leftovers on this partition
        if sv.ended:                                      # after its end (a re-sent end, a late block): the
            DUPLICATES.labels(SERVICE).inc()              # ranks closed the session, a block would fail them
            log.warning("message after the session's end dropped", session_id=h.session_id, kind=h.kind,
                        seq=h.seq)
            return None
        if h.kind == "block":
            b = h.seq
            if b < sv.replay_from or b <= sv.max_seen:
                DUPLICATES.labels(SERVICE).inc()
                return None
            sv.max_seen = b
            self.offsets[b] = rec.offset
            return Block(sv.session_no, b, tensor_to_torch(msg.tensors["features"]),
                         tensor_to_torch(msg.tensors["pcm"]), replay=b < sv.next_block)
        if h.kind == "end":
            sv.ended = True
            return EndSession(sv.session_no)
        return None


class KafkaLaneOutput:
    """The decode rank's output: each block H.264-encoded to Kafka, cursor / anchor / usage / lane release
    to Redis.

    One :class:`~pipeline_stages.video_encode.BlockVideoEncoder` per session, opened at the first block
    this process emits (after a restart: the block after ``lane_block``). Every block starts with an IDR
    picture and the encoder's parameter sets depend only on the stream configuration, so the packager
    continues a session across a restart of this rank under the same init segment."""

    def __init__(self, s: LaneSettings, store: StateStore):
        self.s, self.store = s, store
        self.producer = make_producer(s.kafka())
        self.tags: dict[int, tuple[str, str]] = {}
        self.encoders: dict[int, BlockVideoEncoder] = {}
        self.t_last = time.monotonic()

    def _encode(self, item: BlockDone, fps: int):
        """The block's frames as H.264 access units (and the codec configuration)."""
        frames = item.frames.numpy()                       # [T, H, W, 3] uint8
        enc = self.encoders.get(item.session_no)
        if enc is None:
            t, height, width = frames.shape[:3]
            cfg = lane_stream_config(width, height, fps, t)
            enc = self.encoders[item.session_no] = BlockVideoEncoder(cfg, cfg.block_start_frame(item.block_index))
        t0 = time.perf_counter()
        block = enc.encode_block(frames)
        BLOCK_LATENCY.labels(SERVICE, "encode").observe(time.perf_counter() - t0)
        return block.access_units, enc.codec_config

    def put(self, item) -> None:
        if isinstance(item, SessionStarted):
            tenant, sid = item.tag.split("/", 1)
            self.tags[item.session_no] = (tenant, sid)
            self.encoders.pop(item.session_no, None)
            ACTIVE_SESSIONS.labels(SERVICE).set(1)
            return
        tenant, sid = self.tags.get(getattr(item, "session_no", -1), ("", ""))
        if not sid:
            return
        if isinstance(item, AnchorReady):
            self.store.put_anchor(sid, tensor_from_torch(item.latent),
                                  Frames(session_id=sid, tenant_id=tenant, seq=0, kind="block", lane_id=self.s.lane_id))
        elif isinstance(item, BlockDone):
            header = Frames(session_id=sid, tenant_id=tenant, seq=item.block_index, kind="block",
                            lane_id=self.s.lane_id)
            tensors = {**h264_tensors(*self._encode(item, header.fps)), "pcm": tensor_from_torch(item.pcm)}
            if self.s.emit_latents:
                tensors["latent"] = tensor_from_torch(item.latent)
            self.producer.send(topics.name(topics.FRAMES), key=sid.encode(), value=encode(header, tensors))
            self.producer.flush()                          # frames durable before the cursor moves
            self.store.advance_cursor(sid, "lane_block", item.block_index)
            self.store.add_usage(tenant, item.frames.shape[0] / 25.0)
            BLOCKS.labels(SERVICE, "decode").inc()
            now = time.monotonic()
            FPS.labels(SERVICE).set(item.frames.shape[0] / max(1e-6, now - self.t_last))
            self.t_last = now
        elif isinstance(item, SessionEnded):
            enc = self.encoders.pop(item.session_no, None)
            if enc is not None:
                enc.close()
            self.producer.send(topics.name(topics.FRAMES), key=sid.encode(), value=encode(
                Frames(session_id=sid, tenant_id=tenant, seq=-1, kind="end", lane_id=self.s.lane_id)))
            self.producer.flush()
            self.store.update_session(sid, state="ended")
            self.store.release_lane(self.s.lane_id, sid)
            self.tags.pop(item.session_no, None)
            ACTIVE_SESSIONS.labels(SERVICE).set(0)
            log.info("session ended on lane", session_id=sid, tenant_id=tenant, lane=self.s.lane_id)


class _LogReporter:
    """Progress and errors of this rank, to the structured log (the group supervisor watches exits)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.ready = False

    def put(self, item: RankReport) -> None:
        if isinstance(item, RankReady):
            self.ready = True
            log.info("rank ready", rank=self.rank)
        elif isinstance(item, RankFailed):
            log.error("rank failed", rank=self.rank, block=item.block_index, detail=item.detail, peer=item.peer)


def run_lane_rank(s: LaneSettings) -> None:
    config = LiveAvatarConfig.load(s.model)
    shape = LaneShape.parse(s.lane_shape, config.scheduler.num_inference_steps)
    spec = RankSpec(rank=s.dist_rank, shape=shape, config=config, init_method=s.init_method(),
                    device=s.device, dtype=s.dtype, weights_seed=s.weights_seed,
                    checkpoint=default_checkpoint(s.model, s.checkpoint),
                    timeout_s=s.rank_timeout_s, heartbeat_s=s.heartbeat_s, threads=s.threads,
                    decode_threads=s.decode_threads)
    store = StateStore.from_settings(s)
    reporter = _LogReporter(s.dist_rank)
    port = s.health_port + s.dist_rank if s.health_port and s.health_port_by_rank else s.health_port
    health = HealthServer(s.health_host, port, lambda: reporter.ready, f"{SERVICE}-{spec.stage_name}").start()
    stop = GracefulStop().install()
    source = KafkaLaneSource(s, store, config) if s.dist_rank == 0 else None
    output = KafkaLaneOutput(s, store) if spec.is_decode else None
    if source is not None:
        source = _StoppableSource(source, stop)
    log.info("lane rank starting", lane=s.lane_id, rank=s.dist_rank, stage=spec.stage_name, shape=shape.name,
             health_port=health.port)
    try:
        run_rank(spec, source, output, reporter)      # sets the rank's torch threads (spec.torch_threads)
    finally:
        health.stop()


class _StoppableSource:
    """On SIGTERM the head finishes the block in hand and shuts the lane down (graceful drain)."""

    def __init__(self, inner: KafkaLaneSource, stop: GracefulStop):
        self.inner, self.stop = inner, stop

    def get(self, timeout: float):
        if self.stop.stopping:
            return Shutdown()
        return self.inner.get(timeout)
