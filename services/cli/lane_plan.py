"""Which lane shape and thread split keep up on this machine: ``liveavatar up``'s default (``--lane-shape auto``).

A lane's shape (docs/tpp.md) sets how many processes it runs: ``4+1`` is five, ``1`` is one. On a GPU
each rank has its own device and more ranks mean more throughput; on a CPU every rank shares the same
few cores, each process costs its own wake-ups and hand-offs, and only the decoder needs more than one
core's worth of time. So the plan is: of the shapes predicted to hold real time (a block, 0.48 s of
video, made in at most 0.48 s), take the one with the most headroom (the shortest predicted time per
block, to 10 ms), then the fewest processes; when none is predicted to hold, take the one predicted
fastest and say so. Any jitter a stream without headroom meets becomes lag it never wins back.

The prediction uses per-block costs measured on the shipped ``tiny-trained`` model
(:data:`SHIPPED_COSTS`; ``bench/lane_shapes_bench.py`` and ``bench/vae_decode_bench.py`` measure them,
docs/tpp.md records the runs): a block leaves the lane every

    max(slowest rank's wall time, lanes x CPU seconds per block of one lane and its services / cores)

The constants are for this model at 64x64 on the machine they were measured on. The decode is most of
a lane's cost on CPU and it differs most between CPUs, so ``liveavatar up`` measures it on the machine it
runs on before it plans (:func:`measure_decode`: one block through the streaming decoder of the lanes'
model, about a second) and keeps the other constants (``--lane-shape`` and ``--lane-decode-threads``
override the plan).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field

from pipeline_stages.tpp.shape import parse_shape

BLOCK_S = 0.48            # 12 frames at 25 fps: the real-time budget of one block


@dataclass(frozen=True)
class Costs:
    """Per-block costs of one lane of a model, on cores that are otherwise idle."""

    steps: int = 4
    step_cpu_s: float = 0.009                       # one denoising step, one thread (wall = CPU)
    decode_wall_s: dict[int, float] = field(default_factory=lambda: {1: 0.34, 2: 0.23})   # by decoder threads
    decode_cpu_s: dict[int, float] = field(default_factory=lambda: {1: 0.34, 2: 0.46})
    hop_cpu_s: float = 0.01                         # one rank-to-rank hand-off (gloo wake-ups, 3 messages)
    services_cpu_s: float = 0.12                    # audio encoder, packager, session API, broker per block
    measured: bool = False                          # the decode costs were measured on this machine


#: The shipped tiny-trained model (v5) at 64x64 on the reference 2-core machine (the Intel Xeon of
#: 2026-12-05, host idle and fast, 18:35 UTC): one step and v5's width-8 decode from
#: bench/lane_shapes_bench.py (docs/tpp.md; the decode is 0.25-0.35 s of one core as that host's speed
#: varies, v4's width-12 decoder about twice that), the services' share from docs/hotpath.md.
#: ``liveavatar up`` replaces the decode with :func:`measure_decode`'s on its machine, so these decode
#: numbers serve only where nothing is measured (tests, a plan made without a model).
SHIPPED_COSTS = Costs()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(seconds: float = 0.5, stat: str = "/proc/stat") -> float:
    """How many cores other work keeps busy now: the non-idle share of the machine's CPU time over
    ``seconds`` (``/proc/stat``), times the cores it counts. Where there is no ``/proc/stat``, the
    1-minute load average. Not the load average on Linux: it trails by a minute, so a job that just
    ended (a benchmark, the previous run) would still count as busy and the plan would shrink for it."""

    def sample() -> tuple[int, int, int]:
        with open(stat) as f:
            lines = f.read().splitlines()
        total = [int(x) for x in lines[0].split()[1:8]]         # user nice system idle iowait irq softirq
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return sum(total), total[3] + total[4], cpus

    try:
        t0, idle0, cpus = sample()
        time.sleep(seconds)
        t1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if t1 <= t0:
        return 0.0
    return round((1.0 - (idle1 - idle0) / (t1 - t0)) * cpus, 2)


def _busy(cores: int, busy: float | None) -> float:
    """Cores other work keeps busy: ``busy`` or :func:`busy_cores`, as far as it leaves one core."""
    if busy is None:
        busy = busy_cores()
    return min(max(0.0, busy), cores - 1.0)


def _max_threads(free: float) -> float:
    """A decoder thread needs a core of its own, and the rest of the stack (denoising ranks, audio
    encoder, packager, API, broker) keeps one more busy at times (a core half busy still counts as
    free). Measured on 2 idle cores (docs/realtime.md): a 2-thread decoder there competed with the
    services, used 1.7 cores and fell behind by 3-3.5 s over 40 s, where a 1-thread decoder in its own
    process fell behind by 0.8 s on the same machine minutes apart."""
    return max(1.0, free - 0.5)


def measure_decode(model: str = "tiny-trained", threads: tuple[int, ...] = (1, 2), size: int = 64,
                   repeats: int = 3, costs: Costs = SHIPPED_COSTS, busy: float | None = None) -> Costs:
    """``costs`` with the decode measured here: the wall and CPU seconds of one block through the
    streaming decoder (``WanVAE.decode_step``, warm caches, as a lane's decode rank runs it) of
    ``model``'s VAE at ``size`` x ``size``, for each thread count, median of ``repeats`` blocks.

    Random weights of the model's architecture: the cost does not depend on the weights. CPU seconds
    are the process's (every thread's) time, so a thread that waits for a busy core counts as it does
    in the lane. Thread counts the plan could not give the decoder (above the free cores, as
    :func:`plan_lanes` counts them from ``busy``, default :func:`busy_cores`) are left out.
    """
    import torch

    from models.liveavatar import LiveAvatarConfig
    from models.vae import WanVAE

    cores = _cores()
    free = cores - _busy(cores, busy)
    config = LiveAvatarConfig.load(model)
    gen = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            vae = WanVAE(config.vae).eval()
            lat = size // config.vae.stride[1]
            z = torch.randn(1, config.vae.z_dim, config.dit.frames_per_block, lat, lat, generator=gen)  # [1, z, F, h, w]
            for t in sorted(x for x in threads if x <= _max_threads(free)):
                torch.set_num_threads(t)
                state = vae.init_decode_state()
                vae.decode_step(z, state)                                   # fills the caches (first block)
                walls, cpus = [], []
                for _ in range(repeats):
                    w0, c0 = time.perf_counter(), time.process_time()
                    vae.decode_step(z, state)                               # [1, 3, 4F, H, W]
                    walls.append(time.perf_counter() - w0)
                    cpus.append(time.process_time() - c0)
                wall[t], cpu[t] = round(statistics.median(walls), 4), round(statistics.median(cpus), 4)
    finally:
        torch.set_num_threads(before)
    return dataclasses.replace(costs, decode_wall_s=wall, decode_cpu_s=cpu, measured=True)


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
    busy: float = 0.0                # cores other work kept busy when the plan was made (busy_cores)
    decode_wall_s: dict[int, float] = field(default_factory=dict)   # the decode costs it planned with
    measured: bool = False           # the decode costs were measured on this machine (else SHIPPED_COSTS)

    def describe(self) -> str:
        verdict = ("holds real time" if self.holds
                   else "no shape is predicted to hold real time here; this one is the fastest")
        others = f", {self.busy:.1f} of them busy with other work" if self.busy >= 0.5 else ""
        return (f"lane shape {self.shape} ({self.processes} process{'es' if self.processes > 1 else ''} per lane), "
                f"decoder threads {self.decode_threads}: predicted {self.period_s:.3f} s per {BLOCK_S} s block "
                f"with {self.lanes} lane(s) on {self.cores} cores{others} ({verdict}){self._decode_note()}")

    def _decode_note(self) -> str:
        if not self.decode_wall_s:
            return ""
        per = ", ".join(f"{s:.3f} s with {t} thread{'s' if t > 1 else ''}" for t, s in sorted(self.decode_wall_s.items()))
        return f"; one block's decode {'measured here' if self.measured else 'as measured on the reference machine'}: {per}"


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

    ``busy`` is how many cores other work keeps busy (default: :func:`busy_cores`, as far as it
    leaves one core). The plan counts only the free cores, and gives the decoder no more threads than
    the free cores less the one the rest of the stack needs (:func:`_max_threads`): a thread that waits
    for a busy core spins and slows the decode down (measured in docs/tpp.md: a 2-thread decode on a
    saturated 2-core machine took 2.9x the 1-thread one).
    """
    cores = cores or _cores()
    busy = _busy(cores, busy)
    free = cores - busy
    candidates = []
    for d in range(costs.steps, 0, -1):
        if costs.steps % d:
            continue
        for shape in (f"{d}", f"{d}+1"):
            for t in sorted(costs.decode_wall_s):
                if t > _max_threads(free):
                    continue
                period = predict(shape, t, free, lanes, costs)
                procs = d + (1 if shape.endswith("+1") else 0)
                candidates.append(LanePlan(shape, 1, t, procs, round(period, 3), period <= BLOCK_S, cores, lanes,
                                           round(busy, 2), dict(costs.decode_wall_s), costs.measured))
    holding = [c for c in candidates if c.holds]
    if holding:
        return min(holding, key=lambda c: (round(c.period_s, 2), c.processes, c.decode_threads))   # most headroom
    return min(candidates, key=lambda c: (c.period_s, c.processes))
