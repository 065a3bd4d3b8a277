"""The stream-packager service: encoded blocks (topic ``frames``) -> fragmented MP4 (topic ``media``).

One :class:`~pipeline_stages.package_stage.PackageStage` per session: the first message of a session
emits the init segment, then every block its own fragment (H.264 + AAC, timestamps from the block
index, audio in sync). The ``media`` messages carry the block index as their sequence number.
The lane's decode rank has already encoded the video: the packager muxes the block's H.264 access
units as they are (the init segment's ``avcC`` and picture size come from the block's codec
configuration) and encodes only the audio (AAC). A block in the older raw form (``frames``) is
still accepted and encoded here with the same settings.

Idempotence and restart: a block at or below the session's ``media_block`` cursor is a duplicate and
is dropped. A restarted packager creates the session's stage at the next block
(``PackageStage(start_block=k)``), which gives the same init segment and continuous timestamps, so the
client's byte stream stays valid; only the audio encoder restarts (see docs/services.md).

Events: when the fragment of an utterance's last block is on ``media`` (the audio encoder marks which
block ends each utterance in Redis), the packager publishes ``utterance.ended`` on ``events``, flushed
before the mark is cleared, so a restart re-publishes (same event id) rather than loses it.
"""

from __future__ import annotations

import time

from infra import topics
from pipeline_stages import fmp4
from pipeline_stages.package_stage import PackageInputError, PackageStage, make_package_stage
from services.common import events
from services.common.health import BLOCK_LATENCY, BLOCKS, DUPLICATES, FPS
from services.common.kafka import make_consumer, make_producer
from services.common.logging import get_logger
from services.common.messages import Frames, Media, Tensor, WireError, decode, encode, h264_from_tensors
from services.common.redis_state import StateStore
from services.common.worker import GracefulStop, WorkerSettings, run_consume_loop

SERVICE = "stream-packager"
log = get_logger(SERVICE)


class PackagerSettings(WorkerSettings):
    group_id: str = "stream-packager"


class PackagerWorker:
    def __init__(self, s: PackagerSettings):
        self.s = s
        self.store = StateStore.from_settings(s)
        self.producer = make_producer(s.kafka())
        self.consumer = make_consumer(s.kafka(), s.group_id, [topics.name(topics.FRAMES)], max_poll_records=16)
        self.stages: dict[str, PackageStage] = {}
        self.stop = GracefulStop()
        self.ready = False
        self.t_last = time.monotonic()

    def run(self) -> None:
        run_consume_loop(SERVICE, self.s, self.consumer, self.producer, self._handle, self.stop,
                         lambda: self.ready, lambda: setattr(self, "ready", True),
                         active_sessions=lambda: len(self.stages))

    def _handle(self, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except WireError as exc:
            log.warning("dropped undecodable frames", error=str(exc))
            return
        h = msg.header
        if not isinstance(h, Frames):
            return
        sid = h.session_id
        if h.kind == "end":
            stage = self.stages.pop(sid, None)
            tail = stage.close() if stage is not None else b""
            self._emit(h, "end", h.seq, tail)
            self._utterances_ended(h, float("inf"), None)
            return
        if h.seq <= self.store.cursor_int(sid, "media_block"):
            DUPLICATES.labels(SERVICE).inc()
            return
        t0 = time.perf_counter()
        try:
            fragment, stage, n_frames = self._package(h, msg)
        except (WireError, PackageInputError, fmp4.Fmp4Error) as exc:   # malformed, like an undecodable message
            log.error("dropped a block that cannot be packaged", session_id=sid, block=h.seq, error=str(exc))
            return
        self._emit(h, "fragment", h.seq, fragment, start_time_s=float(stage.config.block_start_time(h.seq)))
        self.producer.flush()                                # media durable before the cursor moves
        self.store.advance_cursor(sid, "media_block", h.seq)
        self._utterances_ended(h, h.seq, stage)
        BLOCK_LATENCY.labels(SERVICE, "package").observe(time.perf_counter() - t0)
        BLOCKS.labels(SERVICE, "package").inc()
        now = time.monotonic()
        FPS.labels(SERVICE).set(n_frames / max(1e-6, now - self.t_last))
        self.t_last = now

    def _package(self, h: Frames, msg) -> tuple[bytes, PackageStage, int]:
        """The block's fragment (emitting the init segment first for a new stage), its stage and frame count."""
        sid, pcm = h.session_id, msg.tensors["pcm"].numpy()  # [T * 640] float32
        stage = self.stages.get(sid)
        if "h264" in msg.tensors:                            # the lane's form: H.264 access units, muxed as they are
            units, avcc = h264_from_tensors(msg.tensors)
            if stage is None:
                width, height = fmp4.sps_dimensions(fmp4.parameter_sets(avcc)[0])
                stage = self._new_stage(h, make_package_stage(width, height, h.fps, len(units), start_block=h.seq,
                                                              tiny=None, video_config=avcc))
            fragment = stage.push_encoded(units, pcm, avcc)
            if stage.state.inband_parameter_sets == 1 and stage.video_config != avcc:
                log.warning("codec configuration differs from the init segment's: parameter sets go in-band",
                            session_id=sid, block=h.seq)
            return fragment, stage, len(units)
        frames = msg.tensors["frames"].numpy()               # the raw form: [T, H, W, 3] uint8, encoded here
        if stage is None:
            height, width = frames.shape[1:3]
            stage = self._new_stage(h, make_package_stage(width, height, h.fps, frames.shape[0], start_block=h.seq,
                                                          tiny=None))
        return stage.push_block(frames, pcm), stage, frames.shape[0]

    def _new_stage(self, h: Frames, stage: PackageStage) -> PackageStage:
        self.stages[h.session_id] = stage
        self._emit(h, "init", -1, stage.init_segment())
        return stage

    def _emit(self, h: Frames, kind: str, seq: int, data: bytes, start_time_s: float = 0.0) -> None:
        header = Media(session_id=h.session_id, tenant_id=h.tenant_id, seq=seq, kind=kind, start_time_s=start_time_s)
        payload = {"data": Tensor("uint8", (len(data),), data)} if data else None
        self.producer.send(topics.name(topics.MEDIA), key=h.session_id.encode(), value=encode(header, payload))

    def _utterances_ended(self, h: Frames, block: float, stage: PackageStage | None) -> None:
        """Publish ``utterance.ended`` for the utterances whose last block is at or before ``block``."""
        ended = self.store.utterances_through(h.session_id, block)
        for seq, last in ended:
            data = {"last_block": last}
            if stage is not None:
                data["media_time_s"] = round(float(stage.config.block_start_time(last + 1)), 3)
            events.publish(self.producer, h.tenant_id,
                           events.make_event("utterance.ended", h.session_id, data, discriminator=str(seq)))
        if ended:
            self.producer.flush()                            # the events are durable before the marks go
            self.store.clear_utterances(h.session_id, [seq for seq, _ in ended])
