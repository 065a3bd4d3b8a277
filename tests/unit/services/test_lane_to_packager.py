"""The decode rank's output and the stream packager: H.264 access units on ``frames``, muxed as they are.

The lane's :class:`KafkaLaneOutput` and the :class:`PackagerWorker` run with their real encoders and
message encoding; only Kafka and Redis are replaced by in-memory fakes. Checked against independent
computations: the media equals, byte for byte, what the in-process packager makes of the same raw
frames (``PackageStage.push_block``), and every frame decodes (FFmpeg through PyAV) to its input picture
across a restart of the decode rank (a new encoder) and a restart of the packager.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_stages.package_stage import lane_stream_config, make_package_stage
from pipeline_stages.tpp import BlockDone, SessionEnded, SessionStarted
from services.common.messages import Frames, Tensor, decode, encode
from services.common.session_io import assemble
from services.lane import worker as lane_mod
from services.stream_packager import worker as packager_mod
from tests.unit.stages.test_package_stage import assert_video_matches, chirp, picture
from tests.unit.stages.test_video_encode import decode_video

pytestmark = pytest.mark.unit

SID, TENANT, T, SIZE, N_BLOCKS = "s1", "t1", 12, 64, 6
CFG = lane_stream_config(SIZE, SIZE, 25, T)          # what both services choose for 64x64 blocks of 12


class FakeStore:
    """The parts of StateStore the decode rank's output and the packager use, in memory."""

    def __init__(self):
        self.cursors: dict[tuple[str, str], int] = {}

    def cursor_int(self, sid, name, default=-1):
        return self.cursors.get((sid, name), default)

    def advance_cursor(self, sid, name, value):
        self.cursors[sid, name] = max(value, self.cursor_int(sid, name))
        return True

    def add_usage(self, *a, **k):
        return 0.0

    def update_session(self, *a, **k):
        pass

    def release_lane(self, *a, **k):
        pass

    def utterances_through(self, sid, block):
        return []

    def clear_utterances(self, sid, seqs):
        pass


class FakeProducer:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic, key=None, value=None, partition=None):
        self.sent.append((topic, value))

    def flush(self):
        pass


@pytest.fixture
def services(monkeypatch):
    store = FakeStore()
    monkeypatch.setattr(lane_mod, "make_producer", lambda *a, **k: FakeProducer())
    monkeypatch.setattr(packager_mod, "make_producer", lambda *a, **k: FakeProducer())
    monkeypatch.setattr(packager_mod, "make_consumer", lambda *a, **k: None)
    monkeypatch.setattr(packager_mod.StateStore, "from_settings", classmethod(lambda cls, s: store))
    return store


def block(b: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``b``'s frames [T, H, W, 3] uint8 and PCM [T * 640] float32 (analytic pictures and chirp)."""
    frames = np.stack([picture(b * T + i, SIZE, SIZE) for i in range(T)])
    return frames, chirp(b * T * 640, T * 640, 16_000).astype(np.float32)


def lane_messages(store, blocks, restart_at: int | None = None) -> list[bytes]:
    """The frames-topic values the decode rank writes for ``blocks``; at ``restart_at`` the rank restarts
    (a new output, hence a new encoder, as after a crash)."""
    lanes = []
    for b in blocks:
        if not lanes or b == restart_at:
            lanes.append(lane_mod.KafkaLaneOutput(lane_mod.LaneSettings(), store))
            lanes[-1].put(SessionStarted(1, f"{TENANT}/{SID}"))
        frames, pcm = block(b)
        lanes[-1].put(BlockDone(1, b, torch.zeros(1), torch.from_numpy(frames), torch.from_numpy(pcm)))
    lanes[-1].put(SessionEnded(1))
    return [value for lane in lanes for _, value in lane.producer.sent]


def media_of(producer: FakeProducer):
    return [decode(value) for _, value in producer.sent]


def test_the_lane_sends_access_units_and_the_packager_muxes_them_as_the_in_process_packager_would(services):
    values = lane_messages(services, range(3))
    msgs = [decode(v) for v in values]
    assert [m.header.kind for m in msgs] == ["block"] * 3 + ["end"]
    for m in msgs[:3]:
        assert set(m.tensors) == {"h264", "h264_sizes", "avcc", "pcm"}
        assert m.tensors["h264_sizes"].shape == (T,)
    raw_bytes = T * SIZE * SIZE * 3
    assert all(len(v) < raw_bytes for v in values)    # 64x64 pictures: the H.264 block is smaller than raw

    packager = packager_mod.PackagerWorker(packager_mod.PackagerSettings())
    for v in values:
        packager._handle(v)
    media = media_of(packager.producer)
    assert [(m.header.kind, m.header.seq) for m in media] == [("init", -1), ("fragment", 0), ("fragment", 1),
                                                             ("fragment", 2), ("end", -1)]
    # independent: the in-process packager encoding the raw frames itself
    stage = make_package_stage(SIZE, SIZE, 25, T, tiny=None)
    want = [stage.init_segment()] + [stage.push_block(*block(b)) for b in range(3)] + [stage.close()]
    assert [m.tensors["data"].data for m in media] == want


def test_decode_rank_and_packager_restarts_keep_one_decodable_stream(services):
    values = lane_messages(services, range(N_BLOCKS), restart_at=3)
    first = packager_mod.PackagerWorker(packager_mod.PackagerSettings())
    for v in values[:4]:                               # blocks 0-3, then the packager dies
        first._handle(v)
    second = packager_mod.PackagerWorker(packager_mod.PackagerSettings())
    for v in values[2:]:                               # it re-reads from block 2: 2 and 3 are duplicates
        second._handle(v)
    got_first, got_second = media_of(first.producer), media_of(second.producer)
    assert [m.header.seq for m in got_second if m.header.kind == "fragment"] == [4, 5]
    inits = [m.tensors["data"].data for m in got_first + got_second if m.header.kind == "init"]
    assert len(inits) == 2 and inits[0] == inits[1]    # the session's init segment, whatever restarted
    data, blocks = assemble(got_first + got_second)
    assert blocks == list(range(N_BLOCKS))
    assert_video_matches(CFG, decode_video(data), 0, N_BLOCKS * T)   # the packager's audio restarts (docs)


def test_the_packager_still_takes_raw_frames(services):
    frames, pcm = block(0)
    value = encode(Frames(session_id=SID, tenant_id=TENANT, seq=0, kind="block", lane_id="lane-0"),
                   {"frames": Tensor.from_numpy(frames), "pcm": Tensor.from_numpy(pcm)})
    packager = packager_mod.PackagerWorker(packager_mod.PackagerSettings())
    packager._handle(value)
    stage = make_package_stage(SIZE, SIZE, 25, T, tiny=None)
    assert [m.tensors["data"].data for m in media_of(packager.producer)] == [stage.init_segment(),
                                                                            stage.push_block(frames, pcm)]


def test_a_malformed_encoded_block_is_dropped_not_fatal(services):
    good = decode(lane_messages(services, range(1))[0])
    tensors = dict(good.tensors, h264=Tensor("uint8", (5,), b"\x00\x00\x00\x09\x65"))
    tensors["h264_sizes"] = Tensor.from_numpy(np.array([5] + [0] * (T - 1), np.int64))
    packager = packager_mod.PackagerWorker(packager_mod.PackagerSettings())
    packager._handle(encode(good.header, tensors))
    assert packager.producer.sent == [] and services.cursor_int(SID, "media_block") == -1
