"""The TPP lane's pieces that need no process group: its messages on the wire, its shape, its rank specs,
and the typed reports a rank sends its supervisors (the local lane and the lane service)."""

from __future__ import annotations

import dataclasses
import queue

import pytest
import torch

from models.generator import GenerationOptions
from models.liveavatar import LiveAvatarConfig
from pipeline_stages.sink import SinkInputs
from pipeline_stages.tpp import (
    AnchorReady,
    EndSession,
    Heartbeat,
    LaneBlock,
    LaneError,
    LaneShape,
    RankFailed,
    RankProgress,
    RankReady,
    RankSpec,
    Shutdown,
    StartSession,
    TPPLane,
    from_wire,
    run_rank,
    to_wire,
)
from pipeline_stages.transport import MsgKind

pytestmark = pytest.mark.unit

CFG = LiveAvatarConfig.tiny()


def _t(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _sink():
    return SinkInputs(_t(1, 16, 1, 8, 8, seed=1), _t(1, 16, 19, 8, 8, seed=2), _t(1, 5, 32, seed=3))


def _same(a, b) -> None:
    """Field by field, tensors by value."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, SinkInputs):
            assert all(torch.equal(p, q) for p, q in zip(x.tensors(), y.tensors(), strict=True))
        elif isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, (f.name, x, y)


@pytest.mark.parametrize("item", [
    StartSession(3, 11, _sink()),
    StartSession(4, 2**40, _sink(), GenerationOptions(rolling_sink=False, reanchor=False, reanchor_block=7, sink=False),
                 leads=[4, 30, 17], anchor=_t(1, 16, 1, 8, 8, seed=5), tag="acme/s-123"),
    StartSession(5, 0, _sink(), GenerationOptions(reanchor_block=0), leads=[], tag="ü/ß"),
    LaneBlock(3, 0, _t(1, 16, 3, 8, 8), _t(1, 4, 24, 12, seed=6), _t(7680, seed=7)),
    LaneBlock(3, 9, _t(1, 16, 3, 8, 8, dtype=torch.bfloat16), None, _t(7680, seed=7), replay=True),
    LaneBlock(3, 2, _t(1, 16, 3, 8, 8), _t(1, 4, 24, 12, seed=6), None),
    LaneBlock(3, 1, _t(1, 16, 3, 8, 8), None, None, replay=True),
    Heartbeat(3, -1),
    Heartbeat(8, 41),
    EndSession(3),
    Shutdown(),
    AnchorReady(6, _t(1, 16, 1, 8, 8, seed=9)),
], ids=lambda item: type(item).__name__)
def test_every_message_survives_the_wire(item):
    header, tensors = to_wire(item)
    _same(from_wire(header, tensors), item)


def test_block_flags_say_what_follows_the_latent():
    audio, pcm = _t(1, 4, 24, 12), _t(7680)
    h, t = to_wire(LaneBlock(1, 5, _t(1, 16, 3, 8, 8), None, pcm))
    assert h.kind == MsgKind.BLOCK and (h.session_no, h.block_index) == (1, 5) and len(t) == 2
    assert torch.equal(from_wire(h, t).pcm, pcm) and from_wire(h, t).audio is None   # not mistaken for audio
    h, t = to_wire(LaneBlock(1, 5, _t(1, 16, 3, 8, 8), audio, None))
    assert torch.equal(from_wire(h, t).audio, audio) and from_wire(h, t).pcm is None


def test_an_anchor_message_is_block_zeros():
    h, t = to_wire(AnchorReady(2, _t(1, 16, 1, 8, 8)))
    assert (h.kind, h.session_no, h.block_index) == (MsgKind.ANCHOR, 2, 0)


def test_what_does_not_travel_is_refused():
    with pytest.raises(TypeError):
        to_wire(RankReady(0))


def test_the_reference_shape_is_one_step_per_rank_then_the_decoder():
    shape = LaneShape(steps=4)
    assert shape.world_size == 5 and shape.head == 0 and shape.decode_rank == 4
    assert list(shape.denoise_ranks) == [0, 1, 2, 3]
    assert [shape.steps_of(r) for r in range(5)] == [(0,), (1,), (2,), (3,), ()]
    assert [shape.upstream(r) for r in range(5)] == [None, 0, 1, 2, 3]
    assert [shape.downstream(r) for r in range(5)] == [1, 2, 3, 4, None]
    assert [shape.stage_name(r) for r in range(5)] == ["denoise-0", "denoise-1", "denoise-2", "denoise-3", "decode"]
    # every step runs exactly once, in order, along the forward channel
    order, r = [], shape.head
    while r is not None:
        order += shape.steps_of(r)
        r = shape.downstream(r)
    assert order == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        shape.stage_name(5)
    with pytest.raises(ValueError):
        LaneShape(steps=0)


def test_rank_spec_is_keyword_only_and_checks_its_rank():
    with pytest.raises(TypeError):
        RankSpec(0, LaneShape(steps=4), CFG, "file:///x")   # the positional form is refused
    spec = RankSpec(rank=4, shape=LaneShape(steps=4), config=CFG, init_method="file:///x")
    assert spec.is_decode and spec.world_size == 5 and spec.stage_name == "decode"
    with pytest.raises(ValueError):
        RankSpec(rank=5, shape=LaneShape(steps=4), config=CFG, init_method="file:///x")


# ---- reports ------------------------------------------------------------------------------------


class _ListReporter:
    def __init__(self):
        self.items = []

    def put(self, item) -> None:
        self.items.append(item)


class _FakeQueue:
    """What the supervisor reads a rank's reports from (a multiprocessing queue in a real lane)."""

    def __init__(self, items=()):
        self.items = list(items)

    def get_nowait(self):
        if not self.items:
            raise queue.Empty
        return self.items.pop(0)

    def cancel_join_thread(self) -> None:
        pass


def _supervise(reports_by_rank: dict[int, list]) -> str:
    """Hand the reports to a local lane's supervisor (no processes) and return the LaneError it raises."""
    lane = TPPLane(CFG)
    lane.reports = [_FakeQueue(reports_by_rank.get(r, [])) for r in range(lane.shape.world_size)]
    with pytest.raises(LaneError) as err:
        lane._drain_reports(0.0)
    return str(err.value)


def _failure_report_of_a_rank_that_cannot_join(monkeypatch) -> RankFailed:
    """The report the real ``run_rank`` sends when it fails (here: an unusable rendezvous address)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    threads = torch.get_num_threads()
    reporter = _ListReporter()
    spec = RankSpec(rank=2, shape=LaneShape(steps=4), config=CFG, init_method="nosuchscheme://nowhere")
    try:
        with pytest.raises(RuntimeError, match="rendezvous"):
            run_rank(spec, None, None, reporter)
    finally:
        torch.set_num_threads(threads)
    [report] = reporter.items
    return report


def test_a_failing_rank_reports_who_where_and_why(monkeypatch):
    report = _failure_report_of_a_rank_that_cannot_join(monkeypatch)
    assert isinstance(report, RankFailed)
    assert (report.rank, report.block_index, report.peer) == (2, -1, None)
    assert "rendezvous" in report.detail


def test_the_local_supervisor_names_the_stage_from_a_real_failure_report(monkeypatch):
    report = _failure_report_of_a_rank_that_cannot_join(monkeypatch)
    msg = _supervise({0: [RankReady(0)], 1: [RankProgress(1, 3)], 2: [report]})
    assert msg.startswith("stage denoise-2 failed at block -1: RuntimeError: No rendezvous handler"), msg


def test_the_local_supervisor_blames_the_peer_a_report_names():
    msg = _supervise({1: [RankProgress(1, 6)], 2: [RankFailed(2, -1, "LinkTimeout: rank 1 did not answer", peer=1)]})
    assert msg.startswith("stage denoise-1 stopped responding: denoise-2 lost it (LinkTimeout: rank 1 did not answer)")
    assert msg.endswith("last block it finished: 6"), msg


def test_the_lane_service_logs_every_report_kind(monkeypatch):
    from services.lane import worker

    logged = []
    monkeypatch.setattr(worker.log, "info", lambda event, **kw: logged.append(("info", event, kw)))
    monkeypatch.setattr(worker.log, "error", lambda event, **kw: logged.append(("error", event, kw)))
    reporter = worker._LogReporter(2)
    reporter.put(RankProgress(2, 7))
    assert not reporter.ready and not logged
    reporter.put(RankReady(2))
    assert reporter.ready and logged[-1] == ("info", "rank ready", {"rank": 2})
    reporter.put(_failure_report_of_a_rank_that_cannot_join(monkeypatch))
    kind, event, kw = logged[-1]
    assert (kind, event, kw["rank"], kw["block"], kw["peer"]) == ("error", "rank failed", 2, -1, None)
    assert "rendezvous" in kw["detail"]
