"""Which lane shape and thread split keep up on this machine: ``liveavatar up``'s default (``--lane-shape auto``).

A lane's shape (docs/tpp.md) sets how many processes it runs: ``4+1`` is five, ``1`` is one. On a GPU
each rank has its own device and more ranks mean more throughput; on a CPU every rank shares the same
few cores, each process costs its own wake-ups and hand-offs, and only the decoder needs more than one
core's worth of time. So the plan is: of the shapes predicted to hold real time (a block, 0.48 s of
video, made in at most 0.48 s), take the one with the fewest processes, then the fewest decoder threads;
when none is predicted to hold, take the one predicted fastest and say so.

The prediction uses per-block costs measured on the shipped ``tiny-trained`` model
(:data:`SHIPPED_COSTS`; ``bench/lane_shapes_bench.py`` and ``bench/vae_decode_bench.py`` measure them,
docs/tpp.md records the runs): a block leaves the lane every

    max(slowest rank's wall time, lanes x CPU seconds per block of one lane and its services / cores)

The constants are for this model at 64x64; another model or machine needs its own measurement
(``--lane-shape`` and ``--lane-decode-threads`` override the plan).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline_stages.tpp.shape import parse_shape

BLOCK_S = 0.48            # 12 frames at 25 fps: the real-time budget of one block


@dataclass(frozen=True)
class Costs:
    """Per-block costs of one lane of a model, on cores that are otherwise idle."""

    steps: int = 4
    step_cpu_s: float = 0.012                       # one denoising step, one thread (wall = CPU)
    decode_wall_s: dict[int, float] = field(default_factory=lambda: {1: 0.56, 2: 0.39})   # by decoder threads
    decode_cpu_s: dict[int, float] = field(default_factory=lambda: {1: 0.56, 2: 0.77})
    hop_cpu_s: float = 0.01                         # one rank-to-rank hand-off (gloo wake-ups, 3 messages)
    services_cpu_s: float = 0.12                    # audio encoder, packager, session API, broker per block


#: The shipped tiny-trained model at 64x64 on the reference 2-core machine: the decode from
#: bench/vae_decode_bench.py (width 12: 0.56 s of one core; 2 threads 0.39 s wall, up to 0.77 CPU s), the
#: step and the services' share from docs/tpp.md and docs/services.md.
SHIPPED_COSTS = Costs()


@dataclass(frozen=True)
class LanePlan:
    shape: str
    threads: int                     # torch threads of every rank's denoising steps
    decode_threads: int              # torch threads of the decoder
    processes: int                   # processes per lane
    period_s: float                  # predicted seconds per block
    holds: bool                      # predicted to hold real time
    cores: int
    lanes: int
    busy: float = 0.0                # cores other work kept busy when the plan was made (load average)

    def describe(self) -> str:
        verdict = ("holds real time" if self.holds
                   else "no shape is predicted to hold real time here; this one is the fastest")
        others = f", {self.busy:.1f} of them busy with other work" if self.busy >= 0.5 else ""
        return (f"lane shape {self.shape} ({self.processes} process{'es' if self.processes > 1 else ''} per lane), "
                f"decoder threads {self.decode_threads}: predicted {self.period_s:.3f} s per {BLOCK_S} s block "
                f"with {self.lanes} lane(s) on {self.cores} cores{others} ({verdict})")


def predict(shape: str, decode_threads: int, cores: float, lanes: int = 1, costs: Costs = SHIPPED_COSTS) -> float:
    """Predicted seconds per block of each of ``lanes`` lanes of ``shape`` on ``cores`` cores."""
    denoisers, own_decoder = parse_shape(shape)
    if costs.steps % denoisers:
        raise ValueError(f"lane shape {shape}: {denoisers} denoise ranks cannot share {costs.steps} steps evenly")
    if decode_threads not in costs.decode_wall_s:
        raise ValueError(f"no measured decode cost at {decode_threads} threads")
    denoise = costs.steps // denoisers * costs.step_cpu_s
    decode = costs.decode_wall_s[decode_threads]
    slowest = max(denoise, decode) if own_decoder else denoise + decode
    ranks = denoisers + (1 if own_decoder else 0)
    cpu = (costs.steps * costs.step_cpu_s + costs.decode_cpu_s[decode_threads] + (ranks - 1) * costs.hop_cpu_s
           + costs.services_cpu_s)
    return max(slowest, lanes * cpu / cores)


def plan_lanes(cores: int | None = None, lanes: int = 1, costs: Costs = SHIPPED_COSTS,
               busy: float | None = None) -> LanePlan:
    """The shape and decoder threads for ``lanes`` lanes on ``cores`` cores (default: this machine's).

    ``busy`` is how many cores other work keeps busy (default: the 1-minute load average, as far as it
    leaves one core). The plan counts only the free cores, and gives the decoder no more threads than
    there are free cores: a thread that waits for a busy core spins and slows the decode down (measured
    in docs/tpp.md: a 2-thread decode on a saturated 2-core machine took 2.9x the 1-thread one).
    """
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = min(max(0.0, busy), cores - 1.0)
    free = cores - busy
    candidates = []
    for d in range(costs.steps, 0, -1):
        if costs.steps % d:
            continue
        for shape in (f"{d}", f"{d}+1"):
            for t in sorted(costs.decode_wall_s):
                if t > max(1.0, free + 0.5):        # a thread needs a core of its own (half a core busy: still free)
                    continue
                period = predict(shape, t, free, lanes, costs)
                procs = d + (1 if shape.endswith("+1") else 0)
                candidates.append(LanePlan(shape, 1, t, procs, round(period, 3), period <= BLOCK_S, cores, lanes,
                                           round(busy, 2)))
    holding = [c for c in candidates if c.holds]
    if holding:
        return min(holding, key=lambda c: (c.processes, c.decode_threads, c.period_s))
    return min(candidates, key=lambda c: (c.period_s, c.processes))
