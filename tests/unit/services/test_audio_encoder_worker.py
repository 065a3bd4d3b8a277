"""The audio-encoder worker goes through the audio stage: same features, same block PCM, same cursor.

The worker runs with its real model code and message encoding; only Kafka and Redis are replaced by
in-memory fakes. Its output is compared with an independent :class:`AudioStage` run (and with the
backend encoding each expected block on its own) on the same PCM cut into small irregular chunks,
across a simulated restart (in-memory sessions dropped, state restored from the cursor) and
re-delivered chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_stages.audio_stage import AudioStage
from services.audio_encoder import worker as worker_mod
from services.common.messages import AudioIn, Features, Tensor, decode, encode

pytestmark = pytest.mark.unit

SID, TENANT, LANE, PARTITION = "s1", "t1", "lane-0", 3


class FakeStore:
    """The parts of StateStore the PCM path uses, in memory; values stored the way Redis returns them."""

    def __init__(self):
        self.reset()

    def reset(self):
        # the session already holds a lane (partition 3), the lane has its start marker, no block sent yet
        self.cursors: dict[str, dict[str, bytes]] = {SID: {"lane_partition": str(PARTITION).encode(),
                                                           "lane_started": b"1"}}
        self.free = True        # False: no lane is free (the session waits); the default session holds one
        self.claimed = True

    def get_cursor(self, session_id):
        return dict(self.cursors.get(session_id, {}))

    def set_cursor(self, session_id, **fields):
        cur = self.cursors.setdefault(session_id, {})
        cur.update({k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})

    def get_session(self, session_id, tenant=None):
        return _Record(LANE, "active") if self.claimed else _Record("", "waiting")

    def lane_session(self, lane_id):
        return SID if lane_id == LANE and self.claimed else ""

    def claim_lane(self, session_id, pool=""):
        if not self.free:
            return None
        self.claimed = True
        return LANE

    def get_lane(self, lane_id):
        return {"partition": str(PARTITION)}

    def get_sink(self, session_id):
        return object()         # the sink is already encoded: a re-read start does not encode it again

    def update_session(self, session_id, **fields):
        pass

    def mark_utterance_end(self, session_id, seq, last_block):
        self.utterance_ends = [*getattr(self, "utterance_ends", []), (session_id, seq, last_block)]


class _Record:
    def __init__(self, lane, state):
        self.lane, self.state = lane, state


class FakeProducer:
    def __init__(self):
        self.sent: list[tuple[str, bytes, bytes, int]] = []

    def send(self, topic, key=None, value=None, partition=None):
        self.sent.append((topic, key, value, partition))

    def flush(self):
        pass


class _Factory:
    """Stands in for the StateStore class: every constructor returns the one fake store."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.store


@pytest.fixture(scope="module")
def worker_parts():
    mp = pytest.MonkeyPatch()
    mp.setenv("LIVEAVATAR_MODEL_CONFIG", "tiny")
    mp.setattr(worker_mod, "make_producer", lambda *a, **k: FakeProducer())
    mp.setattr(worker_mod, "make_consumer", lambda *a, **k: None)
    store = FakeStore()
    mp.setattr(worker_mod, "StateStore", _Factory(store))
    try:
        worker = worker_mod.AudioEncoderWorker(worker_mod.AudioEncoderSettings())
    finally:
        mp.undo()
    return worker, store


@pytest.fixture
def worker(worker_parts):
    """A fresh session state for each test (the models are built once)."""
    w, store = worker_parts
    w.sessions.clear()
    w.producer.sent.clear()
    store.reset()
    return w


def _speech_like(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * envelope * rng.standard_normal(n)).astype(np.float32)


def _chunks(pcm: np.ndarray, sizes) -> list[np.ndarray]:
    out, at = [], 0
    for size in sizes:
        out.append(pcm[at:at + size])
        at += size
    assert at == len(pcm)
    return out


def _event(seq: int, kind: str, pcm: np.ndarray | None = None) -> bytes:
    tensors = None if pcm is None else {"pcm": Tensor.from_numpy(np.ascontiguousarray(pcm, np.float32))}
    return encode(AudioIn(session_id=SID, tenant_id=TENANT, seq=seq, kind=kind), tensors)


def _sent(worker) -> list[tuple[Features, dict]]:
    out = []
    for topic, key, value, partition in worker.producer.sent:
        msg = decode(value)
        assert key == SID.encode() and partition == PARTITION and topic.endswith("audio-features")
        out.append((msg.header, {k: t.numpy() for k, t in msg.tensors.items()}))
    return out


def _stage_blocks(worker, streams: list[np.ndarray]) -> list[np.ndarray]:
    """Independent reference: the audio stage on the worker's encoder, one stream per utterance."""
    stage, out = AudioStage(worker.models.audio), []
    for pcm in streams:
        stage.start_session()
        out += [f.numpy() for f in stage.push(pcm)] + [f.numpy() for f in stage.flush()]
    return out


def _padded_blocks(pcm: np.ndarray, n: int) -> list[np.ndarray]:
    padded = np.concatenate([pcm, np.zeros(-len(pcm) % n, np.float32)])
    return [padded[i:i + n] for i in range(0, len(padded), n)]


def test_features_equal_the_audio_stage_on_100ms_chunks_across_a_restart(worker):
    n = worker.block_samples
    pcm = _speech_like(5 * n + 3001, seed=1)
    sizes = [1600] * 9 + [1, 0, 37, 7679, 1600, 1599] + [1600] * 13
    sizes.append(len(pcm) - sum(sizes))
    chunks = _chunks(pcm, sizes)
    half = 12
    for seq, chunk in enumerate(chunks[:half]):
        worker._handle_raw(_event(seq, "pcm", chunk))
    # restart: the in-memory state is lost; Kafka re-delivers the last uncommitted chunks
    worker.sessions.clear()
    for seq in range(half - 3, len(chunks)):
        worker._handle_raw(_event(seq, "pcm", chunks[seq]))
    worker._handle_raw(_event(len(chunks), "end"))

    sent = _sent(worker)
    blocks = [(h, t) for h, t in sent if h.kind == "block"]
    expected = _stage_blocks(worker, [pcm])
    expected_pcm = _padded_blocks(pcm, n)
    assert len(blocks) == len(expected) == len(expected_pcm) == 6
    assert [h.seq for h, _ in blocks] == list(range(6))
    assert [h.kind for h, _ in sent] == ["block"] * 6 + ["end"] and sent[-1][0].seq == 6
    for (h, t), want, want_pcm in zip(blocks, expected, expected_pcm, strict=True):
        assert t["features"].dtype == np.float32 and t["features"].shape == want.shape
        assert np.array_equal(t["features"], want), h.seq                      # bit-identical
        assert np.array_equal(t["pcm"], want_pcm), h.seq
        # what the worker computed before it went through the stage: the backend on the block alone
        assert np.array_equal(t["features"][0], worker.backend.encode_block(want_pcm)), h.seq
    # the cursor after the end: every chunk handled, every block sent, nothing pending
    cur = worker.store.get_cursor(SID)
    assert int(cur["audio_seq"]) == len(chunks) and int(cur["features_block"]) == 5
    assert cur["audio_pending"] == b""


def test_the_cursor_holds_the_partial_block_after_every_chunk(worker):
    n = worker.block_samples
    pcm = _speech_like(2 * n + 500, seed=2)
    chunks = _chunks(pcm, [1600] * 10 + [len(pcm) - 16000])
    for seq, chunk in enumerate(chunks):
        worker._handle_raw(_event(seq, "pcm", chunk))
        received = sum(len(c) for c in chunks[:seq + 1])
        cur = worker.store.get_cursor(SID)
        assert int(cur["audio_seq"]) == seq and int(cur["features_block"]) == received // n - 1
        pending = np.frombuffer(cur["audio_pending"], "<f4")
        assert np.array_equal(pending, pcm[received // n * n:received])


def test_end_of_utterance_and_interrupt_match_separate_stage_streams(worker):
    n = worker.block_samples
    first, second, third = _speech_like(n + 900, 3), _speech_like(2 * n + 1200, 4), _speech_like(n // 2, 5)
    seq = 0
    for part, close in ((first, "end_utterance"), (second, "interrupt"), (third, "end")):
        for chunk in _chunks(part, [1600] * (len(part) // 1600) + [len(part) % 1600]):
            worker._handle_raw(_event(seq, "pcm", chunk))
            seq += 1
        worker._handle_raw(_event(seq, close))
        seq += 1
        if close == "interrupt":
            assert int(worker.store.get_cursor(SID)["drop_until"]) == 3   # blocks 0..3 were sent
    sent = _sent(worker)
    blocks = [t["features"] for h, t in sent if h.kind == "block"]
    # the utterance end pads its partial block; the interrupt drops the partial block of the second part
    kept_second = second[:len(second) // n * n]
    expected = _stage_blocks(worker, [first, kept_second, third])
    assert [h.seq for h, _ in sent] == list(range(len(expected) + 1))
    assert len(blocks) == len(expected) == 5
    for got, want in zip(blocks, expected, strict=True):
        assert np.array_equal(got, want)
    pcms = [t["pcm"] for h, t in sent if h.kind == "block"]
    want_pcm = _padded_blocks(first, n) + _padded_blocks(kept_second, n) + _padded_blocks(third, n)
    assert all(np.array_equal(a, b) for a, b in zip(pcms, want_pcm, strict=True))


def _record_of(worker, offset: int, raw: bytes):
    from kafka.consumer.fetcher import ConsumerRecord

    return ConsumerRecord("audio", 0, 0, offset, 0, 0, SID.encode(), raw, None, None, len(SID), len(raw), -1)


def test_a_session_waiting_for_a_lane_is_never_committed_past_and_survives_a_restart(worker):
    from kafka import TopicPartition

    store, n = worker.store, worker.block_samples
    store.cursors, store.free, store.claimed = {}, False, False          # a new session; every lane is busy
    pcm = _speech_like(2 * n + 700, seed=6)
    chunks = _chunks(pcm, [1600] * (len(pcm) // 1600) + [len(pcm) % 1600])
    events = [_event(0, "start")] + [_event(seq, "pcm", c) for seq, c in enumerate(chunks, 1)]
    first = 40                                                            # the start's offset on the partition
    for i, raw in enumerate(events):
        worker._handle_record(_record_of(worker, first + i, raw))
    worker._retry_waiting()
    assert worker.producer.sent == []                                     # nothing can go anywhere yet
    assert worker.held() == {TopicPartition("audio", 0): first}           # committing past it would lose them
    # restart: memory lost; the broker re-delivers from the held offset
    worker.sessions.clear()
    for i, raw in enumerate(events):
        worker._handle_record(_record_of(worker, first + i, raw))
    assert worker.held() == {TopicPartition("audio", 0): first}
    store.free = True                                                     # a lane frees up
    worker._retry_waiting()
    assert worker.held() == {}
    worker._handle_raw(_event(len(events), "end"))
    sent = _sent(worker)
    assert [h.kind for h, _ in sent] == ["start"] + ["block"] * 3 + ["end"]
    got = [t["features"] for h, t in sent if h.kind == "block"]
    for a, b in zip(got, _stage_blocks(worker, [pcm]), strict=True):
        assert np.array_equal(a, b)


def test_a_lane_claimed_but_not_told_gets_its_start_marker_after_a_restart(worker):
    del worker.store.cursors[SID]["lane_started"]         # died between claiming the lane and the marker
    worker._handle_raw(_event(1, "pcm", _speech_like(1600, seed=7)))
    sent = _sent(worker)
    assert [h.kind for h, _ in sent] == ["start"] and worker.store.get_cursor(SID)["lane_started"] == b"1"
    worker._handle_raw(_event(2, "pcm", _speech_like(1600, seed=8)))
    assert len(_sent(worker)) == 1                        # once


def test_events_after_the_end_are_dropped_even_after_a_restart(worker):
    """A client's audio racing its own DELETE, or idle motion queued as the session ended, must not reach
    the lane after the end marker (the lane's ranks have closed the session)."""
    n = worker.block_samples
    pcm = _speech_like(n + 800, seed=9)
    worker._handle_raw(_event(0, "pcm", pcm))
    worker._handle_raw(_event(1, "end"))
    worker._handle_raw(_event(2, "pcm", _speech_like(n, seed=10)))          # late audio, in memory
    worker.sessions.clear()                                                  # restart: state from the cursor
    worker._handle_raw(_event(3, "pcm", _speech_like(2 * n, seed=11)))
    worker._handle_raw(_event(4, "end"))
    sent = _sent(worker)
    assert [h.kind for h, _ in sent] == ["block", "block", "end"]
    assert worker.sessions == {}                                             # nothing kept for the dead session
    for got, want in zip([t["features"] for h, t in sent[:2]], _stage_blocks(worker, [pcm]), strict=True):
        assert np.array_equal(got, want)
