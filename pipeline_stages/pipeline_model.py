"""A small throughput model of a TPP lane, and the GPU projection the TPP benchmark prints.

Pure arithmetic on measured (or computed) times: no torch, no processes. ``bench/tpp.py`` feeds it
the per-stage compute times it measured in one process, the hop time it measured between two gloo
processes, and the FLOPs of one real-size denoising step, and compares the predictions with the lane
it ran.

Three predictions of the steady-state throughput of a linear pipeline of stages ``t_1 .. t_n``
(seconds per block) with a hand-off of ``h`` seconds between neighbours:

* **pipeline** ``1 / (max t_i + h)``: every stage on its own core (or GPU); the slowest stage sets the
  pace and, conservatively, also pays the hand-off (a blocking send keeps the sender busy until the
  receiver has the block; with an asynchronous send the hand-off only adds latency, not period).
* **contention bound** ``min(1 / max t_i, C / sum t_i)``: the same stages sharing ``C`` cores. Each
  block needs ``sum t_i`` core-seconds in all, so ``C`` cores finish at most ``C / sum t_i`` blocks
  a second, whatever the schedule.
* **sequential** ``1 / sum t_i``: every stage in order in one process (one core).

The GPU projection (:func:`project_gpu`) turns the FLOPs of one denoising step into a step time at a
given peak and utilisation (MFU), then into frames per second for a 4+1 GPU TPP lane
(``frames / (step + hop)``) and for one GPU running the 4 steps and the VAE decode in sequence
(``frames / (steps x step + VAE)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class PipelineModelError(ValueError):
    """A throughput-model argument is invalid (no stages, a non-positive time, a bad window...)."""


def _check_times(stage_s: Mapping[str, float]) -> None:
    if not stage_s:
        raise PipelineModelError("need at least one stage time")
    for name, t in stage_s.items():
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise PipelineModelError(f"stage {name!r}: time must be a finite number > 0 s, got {t!r}")


def steady_rate(arrivals: Sequence[float], first: int, last: int) -> float:
    """Blocks per second between the arrivals of block ``first`` and block ``last`` (both included).

    ``arrivals[b]`` is the time block ``b`` became available; ``last - first`` intervals are counted,
    so warm-up blocks before ``first`` and drain blocks after ``last`` do not enter the rate.
    """
    if not 0 <= first < last < len(arrivals):
        raise PipelineModelError(f"need 0 <= first < last < {len(arrivals)} arrivals, got first={first}, last={last}")
    span = arrivals[last] - arrivals[first]
    if not span > 0:
        raise PipelineModelError(f"arrivals {first}..{last} are not increasing (span {span!r} s)")
    return (last - first) / span


@dataclass(frozen=True)
class LanePrediction:
    """Predicted blocks per second of a lane whose stages take ``stage_s`` seconds per block."""

    slowest: str                 # name of the slowest stage
    slowest_s: float             # its time per block
    total_s: float               # sum of all stage times (core-seconds per block)
    handoff_s: float
    cores: float
    pipeline_bps: float          # 1 / (slowest + hand-off): one core per stage
    contention_bps: float        # min(1 / slowest, cores / total)
    sequential_bps: float        # 1 / total: all stages in one process

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def predict_lane(stage_s: Mapping[str, float], handoff_s: float, cores: float) -> LanePrediction:
    """The three throughput predictions of the module docstring for these stage times."""
    _check_times(stage_s)
    if not (math.isfinite(handoff_s) and handoff_s >= 0):
        raise PipelineModelError(f"hand-off time must be a finite number >= 0 s, got {handoff_s!r}")
    if not (math.isfinite(cores) and cores > 0):
        raise PipelineModelError(f"cores must be a finite number > 0, got {cores!r}")
    slowest = max(stage_s, key=stage_s.__getitem__)
    t_max, total = float(stage_s[slowest]), float(sum(stage_s.values()))
    return LanePrediction(slowest, t_max, total, float(handoff_s), float(cores),
                          pipeline_bps=1.0 / (t_max + handoff_s),
                          contention_bps=min(1.0 / t_max, cores / total),
                          sequential_bps=1.0 / total)


@dataclass(frozen=True)
class GpuProjection:
    """One row of the GPU projection: a step time and the frame rates it implies."""

    mfu: float                   # fraction of the peak the step runs at
    step_s: float                # one denoising step of one block
    vae_s: float                 # the VAE decode of one block
    hop_s: float                 # hand-off between two TPP ranks
    tpp_fps: float               # frames / (step + hop): 4 DiT GPUs + 1 VAE GPU, VAE off the critical path
    single_fps: float            # frames / (steps x step + VAE): one GPU
    tpp_first_frame_s: float     # steps x (step + hop) + VAE: the fill latency of block 0 (no prefill)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def project_gpu(step_flops: float, vae_flops: float, peak_flops: float, mfu: float, hop_s: float,
                steps: int = 4, frames_per_block: int = 12) -> GpuProjection:
    """Step and VAE times at ``mfu`` of ``peak_flops`` (FLOP/s), and the TPP / single-GPU frame rates.

    The VAE is assumed to run at the same utilisation as the DiT step; in TPP it sits on its own GPU,
    so it only limits the rate if it is slower than a step (then ``tpp_fps`` uses it instead).
    """
    for name, v in (("step_flops", step_flops), ("vae_flops", vae_flops), ("peak_flops", peak_flops)):
        if not (math.isfinite(v) and v > 0):
            raise PipelineModelError(f"{name} must be a finite number > 0, got {v!r}")
    if not (0 < mfu <= 1):
        raise PipelineModelError(f"mfu must be in (0, 1], got {mfu!r}")
    if not (math.isfinite(hop_s) and hop_s >= 0):
        raise PipelineModelError(f"hop time must be a finite number >= 0 s, got {hop_s!r}")
    if steps < 1 or frames_per_block < 1:
        raise PipelineModelError(f"steps and frames_per_block must be >= 1, got {steps}, {frames_per_block}")
    rate = peak_flops * mfu
    step_s, vae_s = step_flops / rate, vae_flops / rate
    period = max(step_s + hop_s, vae_s)
    return GpuProjection(mfu, step_s, vae_s, hop_s,
                         tpp_fps=frames_per_block / period,
                         single_fps=frames_per_block / (steps * step_s + vae_s),
                         tpp_first_frame_s=steps * (step_s + hop_s) + vae_s)


def implied_mfu(step_flops: float, peak_flops: float, fps: float, frames_per_block: int = 12) -> float:
    """The utilisation a TPP lane needs for ``fps``: one step per ``frames_per_block / fps`` seconds."""
    if not (fps > 0 and step_flops > 0 and peak_flops > 0):
        raise PipelineModelError(f"need positive fps, step FLOPs and peak, got {fps!r}, {step_flops!r}, {peak_flops!r}")
    return step_flops / (frames_per_block / fps) / peak_flops
