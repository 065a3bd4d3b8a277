"""The lane throughput model against independent schedules, and the GPU projection against §9's figures."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from pipeline_stages.pipeline_model import (
    PipelineModelError,
    implied_mfu,
    predict_lane,
    project_gpu,
    steady_rate,
)

pytestmark = pytest.mark.unit


def simulate_one_core_per_stage(stage_s: list[float], handoff_s: float, blocks: int) -> list[float]:
    """Departure times of a linear pipeline, one core per stage, blocking hand-offs (the sender is busy
    until the receiver has the block; the last stage hands off to the caller)."""
    free = [0.0] * len(stage_s)          # when each stage can take its next block
    out = []
    for _ in range(blocks):
        t = 0.0                          # every block's input is available at once (whole audio pushed)
        for i, dt in enumerate(stage_s):
            start = max(t, free[i])
            t = start + dt + handoff_s   # compute, then the blocking hand-off
            free[i] = t
        out.append(t)
    return out


def simulate_shared_cores(stage_s: list[float], cores: int, blocks: int) -> list[float]:
    """Greedy list schedule of the (block, stage) tasks on ``cores`` cores: a task is ready when the block
    left the previous stage and the stage finished the previous block; lower blocks go first."""
    n = len(stage_s)
    done: dict[tuple[int, int], float] = {}
    running: list[tuple[float, int, int]] = []    # (finish time, block, stage)
    started: set[tuple[int, int]] = set()
    now, out = 0.0, [0.0] * blocks
    while len(done) < blocks * n:
        ready = sorted((b, i) for b in range(blocks) for i in range(n)
                       if (b, i) not in started
                       and (i == 0 or (b, i - 1) in done) and (b == 0 or (b - 1, i) in done))
        for b, i in ready[:cores - len(running)]:
            heapq.heappush(running, (now + stage_s[i], b, i))
            started.add((b, i))
        now, b, i = heapq.heappop(running)
        done[(b, i)] = now
        if i == n - 1:
            out[b] = now
    return out


def test_steady_rate_ignores_warmup_and_drain_blocks():
    period = 0.37
    arrivals = [5.0, 5.1, 5.15] + [6.0 + period * k for k in range(10)] + [9.9, 9.95]
    want = 1.0 / float(np.mean(np.diff(arrivals[3:13])))
    assert steady_rate(arrivals, 3, 12) == pytest.approx(want, rel=1e-12)
    assert steady_rate(arrivals, 3, 12) == pytest.approx(1 / period, rel=1e-9)


@pytest.mark.parametrize("stages", [[0.2, 0.5, 0.3, 0.25], [0.4, 0.4, 0.1], [0.05, 0.05, 0.05, 0.05, 0.6]])
def test_pipeline_rate_matches_a_one_core_per_stage_schedule(stages):
    h = 0.013
    dep = simulate_one_core_per_stage(stages, h, blocks=40)
    simulated = steady_rate(dep, 10, 39)
    pred = predict_lane({f"s{i}": t for i, t in enumerate(stages)}, h, cores=len(stages))
    assert pred.pipeline_bps == pytest.approx(simulated, rel=1e-9)
    assert pred.slowest == f"s{int(np.argmax(stages))}"


@pytest.mark.parametrize("stages,cores", [([0.2, 0.2, 0.2, 0.2, 0.1], 2), ([0.3, 0.1, 0.1, 0.1, 0.3], 2),
                                          ([0.2, 0.5, 0.2, 0.2, 0.1], 3), ([0.25, 0.25, 0.25, 0.25], 1)])
def test_no_shared_core_schedule_beats_the_contention_bound(stages, cores):
    dep = simulate_shared_cores(stages, cores, blocks=100)
    pred = predict_lane({f"s{i}": t for i, t in enumerate(stages)}, 0.0, cores=cores)
    # over the whole run the cores cannot do more than ``cores`` core-seconds of work a second
    assert 100 / dep[-1] <= pred.contention_bps * (1 + 1e-9)
    # over a steady window, work done for these blocks before the window opened (at most one block of
    # every stage in flight) can only add a little to the rate
    simulated = steady_rate(dep, 20, 99)
    assert simulated <= pred.contention_bps * (1 + len(stages) / 79)
    # the greedy schedule gets within 10 % of the bound: it is a bound that can be reached
    assert simulated >= 0.9 * pred.contention_bps


def test_contention_bound_limits():
    stages = {"a": 0.3, "b": 0.1, "c": 0.2}
    one = predict_lane(stages, 0.0, cores=1)
    many = predict_lane(stages, 0.0, cores=64)
    assert one.contention_bps == pytest.approx(one.sequential_bps) == pytest.approx(1 / 0.6)
    assert many.contention_bps == pytest.approx(1 / 0.3)
    assert one.total_s == pytest.approx(0.6)


def test_projection_reproduces_section9_figures():
    """§9 of the reference notes: 123 TFLOP per steady step at 989 TFLOPS -> 124 ms, TPP <= 97 FPS,
    4 steps >= 497 ms (<= 24 FPS) on one GPU; 45 FPS means 267 ms per step, about 46 % MFU."""
    step, peak = 123e12, 989e12
    row = project_gpu(step, vae_flops=1.0, peak_flops=peak, mfu=1.0, hop_s=0.0)
    assert row.step_s * 1e3 == pytest.approx(124, abs=1)
    assert row.tpp_fps == pytest.approx(97, abs=1)
    assert 4 * row.step_s * 1e3 == pytest.approx(497, abs=1)
    assert row.single_fps == pytest.approx(24, abs=0.5)
    mfu = implied_mfu(step, peak, fps=45)
    assert mfu == pytest.approx(0.46, abs=0.01)
    claimed = project_gpu(step, 1.0, peak, mfu, 0.0)
    assert claimed.step_s * 1e3 == pytest.approx(267, abs=1)
    assert claimed.tpp_fps == pytest.approx(45, rel=1e-9)


def test_projection_hop_and_vae_terms():
    row = project_gpu(100e12, 20e12, 1000e12, 0.5, hop_s=0.001, steps=4, frames_per_block=12)
    step, vae = 100e12 / 500e12, 20e12 / 500e12
    assert row.tpp_fps == pytest.approx(12 / (step + 0.001))
    assert row.single_fps == pytest.approx(12 / (4 * step + vae))
    assert row.tpp_first_frame_s == pytest.approx(4 * (step + 0.001) + vae)
    slow_vae = project_gpu(100e12, 300e12, 1000e12, 0.5, hop_s=0.0)
    assert slow_vae.tpp_fps == pytest.approx(12 / (300e12 / 500e12))   # the VAE GPU becomes the bottleneck


@pytest.mark.parametrize("call,match", [
    (lambda: predict_lane({}, 0.0, 2), "at least one stage"),
    (lambda: predict_lane({"a": 0.0}, 0.0, 2), "stage 'a'"),
    (lambda: predict_lane({"a": 0.1}, -1.0, 2), "hand-off"),
    (lambda: predict_lane({"a": 0.1}, 0.0, 0), "cores"),
    (lambda: steady_rate([0.0, 1.0], 1, 1), "first < last"),
    (lambda: steady_rate([1.0, 1.0, 1.0], 0, 2), "not increasing"),
    (lambda: project_gpu(1e12, 1e12, 1e15, 1.5, 0.0), "mfu"),
    (lambda: project_gpu(float("nan"), 1e12, 1e15, 0.5, 0.0), "step_flops"),
    (lambda: implied_mfu(1e12, 1e15, 0.0), "positive fps"),
])
def test_bad_arguments_raise_clear_value_errors(call, match):
    with pytest.raises(PipelineModelError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError)
