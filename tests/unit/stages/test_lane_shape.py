"""Lane shapes (``D+1`` / ``D``): which rank runs what, one clear error for a bad shape, the settings and
CLI that take a shape, the FLOP-model projection per shape and the local plan's choice.

That every shape gives the sequential runner's latents bit for bit is checked with real processes in
``tests/integration/stages/test_tpp.py``.
"""

from __future__ import annotations

import argparse
import os

import pytest

from models.liveavatar import LiveAvatarConfig
from pipeline_stages.tpp import LaneShape, RankSpec, TPPLane
from pipeline_stages.tpp.shape import parse_shape

pytestmark = pytest.mark.unit

CFG = LiveAvatarConfig.tiny()
# shape -> (ranks, steps of each rank, the decoder on its own rank)
EXPECTED = {
    "4+1": (5, [(0,), (1,), (2,), (3,), ()], True),
    "4": (4, [(0,), (1,), (2,), (3,)], False),
    "2+1": (3, [(0, 1), (2, 3), ()], True),
    "2": (2, [(0, 1), (2, 3)], False),
    "1+1": (2, [(0, 1, 2, 3), ()], True),
    "1": (1, [(0, 1, 2, 3)], False),
}


@pytest.mark.parametrize("text", list(EXPECTED))
def test_each_shape_splits_the_steps_in_order_and_ends_with_the_decoder(text):
    shape = LaneShape.parse(text, steps=4)
    ranks, steps, own = EXPECTED[text]
    assert shape.name == str(shape) == text
    assert shape.world_size == ranks and shape.decoder_rank == own
    assert [shape.steps_of(r) for r in range(ranks)] == steps
    # every step exactly once, in lane order: a block sees steps 0, 1, 2, 3 as in the sequential runner
    assert [s for r in range(ranks) for s in shape.steps_of(r)] == [0, 1, 2, 3]
    assert shape.decode_rank == ranks - 1 and shape.head == 0
    assert [shape.is_decode(r) for r in range(ranks)] == [r == ranks - 1 for r in range(ranks)]
    # the forward channel is a chain 0 -> 1 -> ... -> decode rank
    assert [shape.upstream(r) for r in range(ranks)] == [None, *range(ranks - 1)]
    assert [shape.downstream(r) for r in range(ranks)] == [*range(1, ranks), None]
    # the anchor goes from the decode rank to every other rank that denoises
    assert set(shape.anchor_peers(shape.decode_rank)) == {r for r in range(ranks) if steps[r]} - {ranks - 1}
    assert all(shape.anchor_peers(r) == () for r in range(ranks - 1))
    assert len({shape.stage_name(r) for r in range(ranks)}) == ranks


def test_stage_names_say_the_steps_and_the_decoder():
    assert [LaneShape.parse("4+1", 4).stage_name(r) for r in range(5)] == [
        "denoise-0", "denoise-1", "denoise-2", "denoise-3", "decode"]
    assert [LaneShape.parse("2", 4).stage_name(r) for r in range(2)] == ["denoise-0-1", "denoise-2-3+decode"]
    assert LaneShape.parse("1", 4).stage_name(0) == "denoise-0-3+decode"


def test_the_default_shape_is_the_reference_4_plus_1():
    assert LaneShape(steps=4) == LaneShape.parse("4+1", 4)
    assert LaneShape.valid(4) == ["4+1", "4", "2+1", "2", "1+1", "1"]


@pytest.mark.parametrize("text", ["3+1", "3", "8", "0", "0+1", "4+2", "+1", "", "two", "4 + 1 + 1", "-2"])
def test_an_invalid_shape_is_one_clear_error(text):
    with pytest.raises(ValueError, match=r"invalid lane shape") as err:
        LaneShape.parse(text, steps=4)
    assert "D+1" in str(err.value) or "valid shapes: 4+1, 4, 2+1, 2, 1+1, 1" in str(err.value)


def test_the_local_lane_refuses_a_bad_shape_before_starting_anything():
    with pytest.raises(ValueError, match="invalid lane shape '3\\+1'"):
        TPPLane(CFG, shape="3+1")
    lane = TPPLane(CFG, shape="2")
    assert lane.shape.world_size == 2 and lane.procs == []
    with pytest.raises(ValueError, match="is for 2 steps"):
        TPPLane(CFG, shape=LaneShape(steps=2, denoisers=1))


def test_a_rank_that_denoises_and_decodes_runs_its_steps_on_threads_and_switches_for_the_decode():
    def spec(shape, rank, **kw):
        return RankSpec(rank=rank, shape=LaneShape.parse(shape, 4), config=CFG, init_method="file:///x", **kw)

    last = spec("2", 1, threads=1, decode_threads=2)
    assert last.is_decode and last.torch_threads == 1 and last.decode_switch == 2
    assert spec("2", 1, threads=2, decode_threads=2).decode_switch is None
    assert spec("2", 1, threads=1).decode_switch is None
    alone = spec("2+1", 2, threads=1, decode_threads=2)
    assert alone.torch_threads == 2 and alone.decode_switch is None
    assert spec("2+1", 0, threads=1, decode_threads=2).torch_threads == 1


def test_the_lane_service_takes_a_shape_and_checks_the_group_size(monkeypatch):
    from services.lane.worker import LaneSettings

    assert LaneSettings().lane_shape == "4+1"
    monkeypatch.setenv("LIVEAVATAR_LANE_SHAPE", "2")
    monkeypatch.setenv("LIVEAVATAR_DIST_WORLD_SIZE", "2")
    monkeypatch.setenv("LIVEAVATAR_DIST_RANK", "1")
    assert LaneSettings().lane_shape == "2"
    monkeypatch.setenv("LIVEAVATAR_DIST_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="shape 2 has 2 ranks"):
        LaneSettings()
    monkeypatch.setenv("LIVEAVATAR_LANE_SHAPE", "2+1")
    assert LaneSettings().dist_world_size == 3
    monkeypatch.setenv("LIVEAVATAR_LANE_SHAPE", "five")
    with pytest.raises(ValueError, match="invalid lane shape"):
        LaneSettings()


def test_the_cli_takes_a_lane_shape_and_refuses_a_bad_one(capsys):
    from services.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["up"]).lane_shape == "auto"
    assert parser.parse_args(["up", "--lane-shape", "2+1"]).lane_shape == "2+1"
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--lane-shape", "3"])
    assert "invalid lane shape '3'" in capsys.readouterr().err
    gen = parser.parse_args(["generate", "--image", "i.png", "--audio", "a.wav", "--out", "o.mp4", "--tpp",
                             "--lane-shape", "1"])
    assert gen.tpp and gen.lane_shape == "1"
    assert isinstance(gen, argparse.Namespace)


def test_the_supervisor_gives_each_lane_the_shapes_ranks(tmp_path):
    from services.cli.supervisor import plan

    for shape, ranks in (("4+1", 5), ("2", 2), ("1", 1)):
        (lane,) = [s for s in plan(tmp_path, 1, shape, {}, api=False, lane_env={"LIVEAVATAR_DECODE_THREADS": "2"})
                   if s.name == "lane-0"]
        assert len(lane.health_ports) == ranks
        assert lane.argv[lane.argv.index("--shape") + 1] == shape
        assert lane.env["LIVEAVATAR_DECODE_THREADS"] == "2"


# ---- the FLOP model's projection per shape ------------------------------------------------------

def test_the_shape_projection_matches_the_physical_bounds_tpp_and_one_gpu_rows():
    from models.flops import FlopBreakdown, lane_shape_period, physical_bound

    step, vae = FlopBreakdown(linear=100 * 10**12, attention=20 * 10**12), FlopBreakdown(conv=27 * 10**12)
    bound = physical_bound(step, step, vae, device="h800-sxm")
    step_s, vae_s = bound["step_ms_bf16"] / 1e3, bound["vae_block_ms_bf16_peak"] / 1e3
    assert lane_shape_period(step_s, vae_s, 4, True)["fps"] == pytest.approx(bound["tpp"]["fps_bf16"])
    assert lane_shape_period(step_s, vae_s, 1, False)["fps"] == pytest.approx(bound["single_gpu"]["fps_bf16"])
    # 2+1: two steps per rank; 2: the decoder after the last rank's two steps; hops only between ranks
    two = lane_shape_period(step_s, vae_s, 2, False, hop_s=0.001)
    assert two["period_s"] == pytest.approx(2 * step_s + vae_s + 0.001) and two["gpus"] == 2
    assert lane_shape_period(step_s, vae_s, 1, False, hop_s=0.001)["period_s"] == pytest.approx(4 * step_s + vae_s)
    assert lane_shape_period(step_s, vae_s, 2, True)["slowest"] == "denoise"


# ---- the local plan ------------------------------------------------------------------------------

def test_on_two_cores_the_plan_keeps_one_decoder_thread_and_takes_the_most_headroom():
    from services.cli.lane_plan import SHIPPED_COSTS, Costs, plan_lanes, predict

    fast = Costs(decode_wall_s={1: 0.30, 2: 0.20}, decode_cpu_s={1: 0.30, 2: 0.45})   # a v5-like decoder
    plan = plan_lanes(cores=2, lanes=1, busy=0.0, costs=fast)
    assert plan.holds and plan.decode_threads == 1          # a second decoder thread would fight the services
    best = min(predict(s, 1, 2, 1, fast) for s in LaneShape.valid(4))
    assert plan.period_s == pytest.approx(best, abs=1e-3) and best < predict("1", 1, 2, 1, fast)
    tied = [s for s in LaneShape.valid(4) if round(predict(s, 1, 2, 1, fast), 2) == round(best, 2)]
    fewest = min(parse_shape(s)[0] + parse_shape(s)[1] for s in tied)
    assert plan.processes == fewest == 2 and plan.shape == "1+1"
    assert "holds real time" in plan.describe() and "lane shape 1+1" in plan.describe()
    assert plan_lanes(cores=4, lanes=1, busy=0.0, costs=fast).decode_threads in (1, 2)   # 4 cores may give 2
    slow = Costs(decode_wall_s={1: 0.56, 2: 0.39}, decode_cpu_s={1: 0.56, 2: 0.77})   # v4's decoder on an AMD EPYC
    behind = plan_lanes(cores=2, lanes=1, busy=0.0, costs=slow)       # nothing holds: the fastest, still 1 thread
    assert not behind.holds and behind.decode_threads == 1 and behind.shape == "1+1"
    assert behind.period_s == pytest.approx(min(predict(s, 1, 2, 1, slow) for s in LaneShape.valid(4)), abs=1e-3)
    shipped = plan_lanes(cores=2, lanes=1, busy=0.0)        # the shipped model's own costs: as measured, 1+1 holds
    assert shipped.holds and shipped.shape == "1+1" and shipped.decode_threads == 1
    assert shipped.period_s == pytest.approx(min(predict(s, 1, 2, 1, SHIPPED_COSTS) for s in LaneShape.valid(4)), abs=1e-3)


def test_when_nothing_holds_the_plan_says_so_and_takes_the_fastest():
    from services.cli.lane_plan import plan_lanes, predict

    plan = plan_lanes(cores=1, lanes=2, busy=0.0)
    assert not plan.holds and "no shape is predicted to hold" in plan.describe()
    assert plan.period_s == pytest.approx(min(predict(s, 1, 1, 2) for s in LaneShape.valid(4)), abs=1e-3)


def test_on_a_busy_machine_the_plan_counts_only_the_free_cores_and_spins_no_decoder_thread():
    from services.cli.lane_plan import plan_lanes, predict

    saturated = plan_lanes(cores=2, lanes=1, busy=15.0)       # load average 15 on 2 cores: one core at most
    assert saturated.busy == 1.0 and saturated.decode_threads == 1 and not saturated.holds
    assert saturated.period_s == pytest.approx(min(predict(s, 1, 1.0) for s in LaneShape.valid(4)), abs=1e-3)
    assert "busy with other work" in saturated.describe()
    assert plan_lanes(cores=8, lanes=1, busy=3.0).decode_threads == 2   # 5 free cores: the 2-thread decoder fits


def test_up_measures_the_decode_of_the_lanes_model_on_this_machine_and_plans_with_it():
    """The plan's decode costs come from this machine: the tiny model's streaming decoder timed for each
    thread count the free cores allow, and the plan says so; the constants it replaces stay untouched."""
    from services.cli.lane_plan import SHIPPED_COSTS, measure_decode, plan_lanes

    idle = measure_decode("tiny", threads=(1, 2), repeats=1, busy=0.0)
    assert idle.measured and not SHIPPED_COSTS.measured
    cores = len(os.sched_getaffinity(0))
    assert set(idle.decode_wall_s) == set(idle.decode_cpu_s) == {t for t in (1, 2) if t <= max(1.0, cores - 0.5)}
    assert all(v > 0 for v in [*idle.decode_wall_s.values(), *idle.decode_cpu_s.values()])
    assert (idle.steps, idle.step_cpu_s, idle.services_cpu_s) == (SHIPPED_COSTS.steps, SHIPPED_COSTS.step_cpu_s,
                                                                   SHIPPED_COSTS.services_cpu_s)
    saturated = measure_decode("tiny", threads=(1, 2), repeats=1, busy=99.0)   # no free core for a second thread
    assert set(saturated.decode_wall_s) == {1}
    plan = plan_lanes(cores=2, lanes=1, busy=0.0, costs=idle)
    assert plan.measured and plan.decode_wall_s == idle.decode_wall_s and "measured here" in plan.describe()
    assert "reference machine" in plan_lanes(cores=2, lanes=1, busy=0.0).describe()


def test_the_plan_counts_the_cores_busy_now_not_the_trailing_load_average(tmp_path):
    """busy_cores reads the non-idle share of CPU time over its window from /proc/stat (here a file
    rewritten during the window: 190 of 290 ticks busy, idle and iowait idle, on 2 CPUs = 1.31 cores), not the load average,
    which still counts a job that ended a minute ago."""
    import threading

    from services.cli.lane_plan import busy_cores

    stat = tmp_path / "stat"
    cpus = "cpu0 1 0 1 1 0 0 0 0 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\nintr 5\n"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n" + cpus)
    timer = threading.Timer(0.05, lambda: stat.write_text("cpu  200 0 190 890 10 0 0 0 0 0\n" + cpus))
    timer.start()
    assert busy_cores(seconds=0.3, stat=str(stat)) == pytest.approx(2 * 190 / 290, abs=0.01)
    timer.join()
    assert busy_cores(seconds=0.01, stat=str(stat)) == 0.0          # no tick passed: nothing measured busy
    assert 0.0 <= busy_cores(seconds=0.05) <= len(os.sched_getaffinity(0)) + 0.01   # this machine's
