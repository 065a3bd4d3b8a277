"""TPP benchmark: the sequential runner vs a local TPP lane on this CPU, the hand-off cost, and the GPU projection.

Usage (from the repository root)::

    .venv/bin/python bench/tpp.py                                   # 30 blocks, about 3 min on 2 cores
    .venv/bin/python bench/tpp.py --blocks 30 --json /tmp/tpp.json --doc docs/tpp.md

What it measures (tiny configuration, ``LiveAvatarConfig.tiny()``, seeded random weights, CPU, one torch
thread per process; input ``cyclops_baker.jpg`` + ``cyclops_baker.wav``, looped to ``--blocks`` blocks):

1. Throughput and latency. The same session (image, seed 0, the same ``--blocks`` x 7,680 samples)
   through :class:`pipeline_stages.sequential.SequentialRunner` and through
   :class:`pipeline_stages.tpp.TPPLane` (5 rank processes + this one). The audio is all available at
   once: it is pushed one block after the other without waiting for results, so the lane can pipeline.
   Each block's arrival time in the caller is recorded. Reported: steady-state blocks/s and FPS over
   blocks ``warmup .. blocks - 1 - steps`` (the fill before and the drain after are left out), time to
   first frame (first push -> block 0 in the caller), the lane's start-up and session-switch cost
   (start_session of a second session: sink encode in the caller, then the sink prefill on every
   denoise rank in turn and the decoder warm-up), and the CPU the processes and the whole machine used
   in the steady window (from /proc), which is what explains the numbers on a shared 2-core machine.
2. Per-stage compute time (each DenoiseStage.run, DecodeStage.run, the audio stage and packaging,
   timed in the sequential run, one process) and the pipeline model of
   :mod:`pipeline_stages.pipeline_model`: 1 / (slowest stage + hand-off), and min(1/slowest, C / sum)
   for C cores, compared with the measured lane.
3. The hand-off: a reference-size block latent [1,16,3,48,88] bf16 plus the block's audio features
   [1,25,1024,12] bf16 (and the tiny config's float32 pair) between two gloo processes on loopback, (a)
   with blocking dist.send/dist.recv (the reference's way) and (b) with our Link (isend + timed irecv):
   the hop latency to an idle receiver, and in a two-stage pipeline where both sides compute for one
   tiny denoise-step time per block, the hop latency and the time the sender is blocked per block.
4. The projection for the reference configuration on 4+1 H100/H800 GPUs: the §9 FLOPs of one
   denoising step (models/flops.py), the step time at the 989 TFLOPS bf16 peak and at the reference's
   implied 46 % MFU, TPP FPS = 12 / (step + hop) and single-GPU FPS = 12 / (4 steps + VAE). No GPU is
   used: the measured-step row stays "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline_stages.pipeline_model import implied_mfu, predict_lane, project_gpu, steady_rate  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402

EXAMPLES = examples_dir()
DOC_BEGIN, DOC_END = "<!-- tpp-bench:begin -->", "<!-- tpp-bench:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def r(x: float, n: int = 3) -> float:
    return round(float(x), n)


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc: what this benchmark's processes and the whole machine used
# ---------------------------------------------------------------------------------------------

def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def wait_for_quiet(max_busy_cores: float, timeout_s: float) -> float:
    """Wait (up to ``timeout_s``) until the machine's other work uses at most ``max_busy_cores`` over 2 s;
    returns the busy cores seen last. Other jobs on a shared machine take cores the lane would use."""
    deadline = time.monotonic() + timeout_s
    while True:
        b0, t0 = _machine_ticks()[0], time.monotonic()
        time.sleep(2.0)
        busy = (_machine_ticks()[0] - b0) / CLK_TCK / (time.monotonic() - t0)
        if busy <= max_busy_cores or time.monotonic() > deadline:
            return r(busy, 2)


def cpu_snapshot(pids: list[int]) -> dict[str, object]:
    busy, _ = _machine_ticks()
    return {"t": time.monotonic(), "busy": busy, "pids": {p: _proc_cpu_s(p) for p in pids}}


def cpu_window(a: dict, b: dict, blocks: int) -> dict[str, object]:
    """Cores used between two snapshots: by each of our processes, by all of ours, by the whole machine."""
    wall = b["t"] - a["t"]
    per = {str(p): r((b["pids"][p] - a["pids"][p]) / wall, 2) for p in a["pids"]}
    ours = sum((b["pids"][p] - a["pids"][p]) for p in a["pids"])
    machine = (b["busy"] - a["busy"]) / CLK_TCK
    return {"wall_s": r(wall), "ours_cores": r(ours / wall, 2), "machine_busy_cores": r(machine / wall, 2),
            "others_cores": r(max(0.0, machine - ours) / wall, 2), "per_process_cores": per,
            "ours_cpu_s_per_block": r(ours / blocks), "loadavg_1min": r(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def load_inputs(blocks: int, block_samples: int):
    from models.inputs import load_audio, load_image

    image = load_image(str(EXAMPLES / "cyclops_baker.jpg"), 50_000_000)
    image2 = load_image(str(EXAMPLES / "kitchen_grandmother.jpg"), 50_000_000)
    speech = load_audio(str(EXAMPLES / "cyclops_baker.wav"), 600.0)
    pcm = np.take(speech, np.arange(blocks * block_samples), mode="wrap").astype(np.float32)  # looped
    return image, image2, pcm, len(speech) / 16000


# ---------------------------------------------------------------------------------------------
# 1 + 2. The sequential runner, with per-stage times
# ---------------------------------------------------------------------------------------------

class StageTimes:
    """Wraps stage methods on these instances and records the wall and the CPU time of every call.

    With one torch thread a stage computes in the calling thread, so its thread CPU time is its compute
    time without the time it waited for a core (the machine may be shared); the wall time includes it.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def wrap(self, obj, method: str, name: str) -> None:
        fn = getattr(obj, method)
        calls, cpu = self.calls.setdefault(name, []), self.cpu.setdefault(name, [])

        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)

        setattr(obj, method, timed)


def run_sequential(config, image, pcm, first: int, last: int) -> dict[str, object]:
    from models.liveavatar import build_models
    from pipeline_stages.sequential import SequentialRunner, SessionSpec

    n = config.audio.block_samples
    blocks = len(pcm) // n
    t0 = time.monotonic()
    models = build_models(config, seed=0)
    build_s = time.monotonic() - t0
    runner = SequentialRunner(models, package=True)
    times = StageTimes()
    t0 = time.monotonic()
    runner.start_session(SessionSpec(image, seed=0))
    session_start_s = time.monotonic() - t0
    times.wrap(runner.audio, "push", "audio")
    for stage in runner.denoise:
        times.wrap(stage, "run", stage.name)
    times.wrap(runner.decode, "run", "decode")
    times.wrap(runner.package, "push_block", "package")
    pids = [os.getpid()]
    arrivals, frames, snaps = [], [], {}
    t_push = time.monotonic()
    snaps["start"] = cpu_snapshot(pids)
    for b in range(blocks):
        out = runner.push_audio(pcm[b * n:(b + 1) * n])
        now = time.monotonic()
        if [o.block_index for o in out] != [b]:
            raise RuntimeError(f"sequential: block {b} did not come out alone and in order")
        arrivals.append(now)
        frames.append(out[0].frames)
        latent_shape = list(out[0].latent.shape)
        if b in (first, last):
            snaps[b] = cpu_snapshot(pids)
    snaps["end"] = cpu_snapshot(pids)
    runner.finish()
    runner.close_session()
    bps = steady_rate(arrivals, first, last)
    stage_ms = {k: r(1e3 * statistics.fmean(v[first + 1:last + 1]), 2) for k, v in times.calls.items()}
    stage_cpu_ms = {k: r(1e3 * statistics.fmean(v[first + 1:last + 1]), 2) for k, v in times.cpu.items()}
    return {"build_s": r(build_s, 2), "session_start_s": r(session_start_s, 2), "blocks": blocks,
            "ttff_s": r(arrivals[0] - t_push), "steady_blocks_per_s": r(bps), "steady_fps": r(bps * config.audio.block_frames, 2),
            "intervals_ms": [r(1e3 * (b - a), 1) for a, b in zip(arrivals, arrivals[1:])],
            "stage_ms": stage_ms, "stage_cpu_ms": stage_cpu_ms, "latent_shape": latent_shape,
            "cpu": cpu_window(snaps[first], snaps[last], last - first),
            "cpu_whole_run": cpu_window(snaps["start"], snaps["end"], blocks),
            "_frames": frames}


# ---------------------------------------------------------------------------------------------
# 1. The TPP lane
# ---------------------------------------------------------------------------------------------

def run_lane(config, image, image2, pcm, first: int, last: int) -> dict[str, object]:
    from pipeline_stages.sequential import SessionSpec
    from pipeline_stages.sink import prepare_sink
    from pipeline_stages.tpp import TPPLane

    n = config.audio.block_samples
    blocks = len(pcm) // n
    t0 = time.monotonic()
    lane = TPPLane(config, seed=0, timeout_s=120.0)
    res: dict[str, object] = {}
    try:
        lane.start()
        res["lane_start_s"] = r(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        lane.start_session(SessionSpec(image, seed=0))
        res["first_session_start_s"] = r(time.monotonic() - t0, 2)
        pids = [p.pid for p in lane.procs] + [os.getpid()]
        names = [p.name.removeprefix("liveavatar-") for p in lane.procs] + ["caller"]
        arrivals: dict[int, float] = {}
        frames: dict[int, torch.Tensor] = {}
        snaps: dict[int, dict] = {}

        steps = config.scheduler.num_inference_steps

        def stamp(results) -> None:
            now = time.monotonic()
            last_denoise = lane.progress.get(steps - 1, (0.0, -1))[1]     # supervisor's view of rank 3
            if last_denoise == blocks - 1 and "denoise_done_s" not in res:
                res["denoise_done_s"] = r(now - t_push)   # every block has left the last denoise rank
            for o in results:
                arrivals[o.block_index] = now
                frames[o.block_index] = o.frames
                if o.block_index in (first, last):
                    snaps[o.block_index] = cpu_snapshot(pids)

        t_push = time.monotonic()
        snaps["start"] = cpu_snapshot(pids)
        for b in range(blocks):                      # the whole audio, block after block, no waiting
            stamp(lane.push_audio(pcm[b * n:(b + 1) * n]))
        res["push_all_s"] = r(time.monotonic() - t_push)
        while len(arrivals) < blocks:
            stamp(lane.collect(block=True))
        snaps["end"] = cpu_snapshot(pids)
        stamp(lane.finish())
        t0 = time.monotonic()
        lane.close_session()
        res["close_session_s"] = r(time.monotonic() - t0)
        order = [arrivals[b] for b in range(blocks)]
        bps = steady_rate(order, first, last)
        cpu = cpu_window(snaps[first], snaps[last], last - first)
        whole = cpu_window(snaps["start"], snaps["end"], blocks)
        for c in (cpu, whole):
            c["per_process_cores"] = {nm: c["per_process_cores"][str(p)] for nm, p in zip(names, pids)}
        res.update({"blocks": blocks, "ttff_s": r(order[0] - t_push), "steady_blocks_per_s": r(bps),
                    "steady_fps": r(bps * config.audio.block_frames, 2),
                    "intervals_ms": [r(1e3 * (b - a), 1) for a, b in zip(order, order[1:])], "cpu": cpu,
                    "cpu_whole_run": whole,
                    "_frames": [frames[b] for b in range(blocks)]})
        # session switch: a second session (another image and seed) on the warm lane
        spec2 = SessionSpec(image2, seed=1)
        t0 = time.monotonic()
        sink, size = prepare_sink(lane.models, spec2)
        t1 = time.monotonic()
        lane.start_session_from_sink(sink, size, spec2)
        t2 = time.monotonic()
        # first frame of the new session, one block alone in the lane (no other block competes)
        t3 = time.monotonic()
        got = lane.push_audio(pcm[:n])
        while not got:
            got = lane.collect(block=True)
        t4 = time.monotonic()
        lane.finish()
        lane.close_session()
        res["switch"] = {"total_s": r(t2 - t0), "sink_encode_in_caller_s": r(t1 - t0),
                         "prefill_all_ranks_and_decoder_warmup_s": r(t2 - t1),
                         "ttff_alone_in_lane_s": r(t4 - t3)}
    finally:
        lane.stop()
    return res


# ---------------------------------------------------------------------------------------------
# 3. The hand-off between two gloo processes
# ---------------------------------------------------------------------------------------------

def busy(seconds: float, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    """Simulated stage compute: real matmuls on one core for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        torch.mm(x, w, out=y)


def _comm_worker(rank: int, init: str, payloads: dict, step_s: float, idle_iters: int, blocks: int, q) -> None:
    import datetime

    import torch.distributed as dist

    from pipeline_stages.transport import Header, Link, MsgKind

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    x, w, y = torch.randn(96, 96), torch.randn(96, 96), torch.empty(96, 96)
    link = Link(torch.device("cpu"), timeout_s=60.0)
    out: dict[str, dict] = {}
    def send(mode: str, tensors: list[torch.Tensor], k: int) -> None:
        if mode == "blocking":                       # the reference's way: returns once the receiver has it
            for t in tensors:
                dist.send(t, 1)
        else:                                        # ours: queue the message and return
            link.send(1, Header(MsgKind.BLOCK, 1, k), tensors)

    def recv(mode: str, bufs: list[torch.Tensor]) -> None:
        if mode == "blocking":
            for t in bufs:
                dist.recv(t, 0)
        else:
            link.recv(0)

    for pname, specs in payloads.items():
        tensors = [torch.randn(shape).to(getattr(torch, dt)) for shape, dt in specs]
        bufs = [torch.empty_like(t) for t in tensors]
        for mode in ("blocking", "link"):
            for phase, iters in (("idle", idle_iters), ("pipelined", blocks)):
                sent, blocked, got, posted = [], [], [], []
                dist.barrier()
                t_begin = time.monotonic()
                for k in range(iters):
                    if rank == 0:
                        if phase == "idle":
                            time.sleep(0.01)          # the receiver has long posted its receive
                        else:
                            busy(step_s, x, w, y)     # this stage's compute for block k
                        t = time.monotonic()
                        send(mode, tensors, k)
                        sent.append(t)
                        blocked.append(time.monotonic() - t)
                    else:
                        posted.append(time.monotonic())
                        recv(mode, bufs)
                        got.append(time.monotonic())
                        if phase == "pipelined":
                            busy(step_s, x, w, y)     # the next stage computes on it
                t_end = time.monotonic()
                if rank == 0 and mode == "link":
                    link.flush()                      # (not timed: the receiver drains the queue meanwhile)
                out[f"{pname}/{mode}/{phase}"] = {"sent": sent, "blocked": blocked, "got": got, "posted": posted,
                                                  "wall": t_end - t_begin, "iters": iters}
    dist.barrier()
    dist.destroy_process_group()
    q.put((rank, out))


def run_comm(payloads: dict[str, list], step_s: float, idle_iters: int, blocks: int) -> dict[str, object]:
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="tpp-bench-") as tmp:
        init = f"file://{tmp}/rendezvous"
        procs = [ctx.Process(target=_comm_worker, args=(rk, init, payloads, step_s, idle_iters, blocks, q))
                 for rk in (0, 1)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    res: dict[str, object] = {"simulated_step_ms": r(step_s * 1e3, 1)}
    for key in got[0]:
        s, rcv = got[0][key], got[1][key]
        # delivery: send called -> message complete at the receiver (includes waiting for a busy receiver);
        # hop: from the moment both sides were ready (send called and receive posted) to complete
        lat = [b - a for a, b in zip(s["sent"], rcv["got"])]
        hop = [g - max(a, p) for a, g, p in zip(s["sent"], rcv["got"], rcv["posted"])]
        wait = [g - p for g, p in zip(rcv["got"], rcv["posted"])]
        def ms(v, f=statistics.median, skip=2):       # the first messages open the connection
            return r(1e3 * f(v[skip:]))

        res[key] = {"hop_ms_p50": ms(hop), "hop_ms_mean": ms(hop, statistics.fmean),
                    "delivery_ms_p50": ms(lat), "delivery_ms_mean": ms(lat, statistics.fmean),
                    "receiver_wait_ms_mean": ms(wait, statistics.fmean),
                    "sender_blocked_ms_p50": ms(s["blocked"]), "sender_blocked_ms_mean": ms(s["blocked"], statistics.fmean),
                    "sender_period_ms": r(1e3 * s["wall"] / s["iters"], 1),
                    "receiver_period_ms": r(1e3 * (rcv["got"][-1] - rcv["got"][2]) / (len(rcv["got"]) - 3), 1),
                    "iters": s["iters"]}
    for pname, specs in payloads.items():
        res[f"{pname}/bytes"] = int(sum(np.prod(shape) * torch.tensor([], dtype=getattr(torch, dt)).element_size()
                                        for shape, dt in specs))
    return res


# ---------------------------------------------------------------------------------------------
# 4. The GPU projection
# ---------------------------------------------------------------------------------------------

NVLINK_HOP_S = 50e-6     # §9: 0.4 MB over NVLink is ~1 us of payload, dominated by 10-50 us of NCCL latency


def projection(measured_hop_s: float | None) -> dict[str, object]:
    from models.config import DiTConfig
    from models.flops import CLAIMED_FPS, DEVICE_SPECS, analytic_flops, analytic_vae_decode_flops
    from models.vae import VAEConfig

    grid = (48, 88)                                      # 384x704 latent
    dit = DiTConfig()
    steady = analytic_flops(dit, grid, steady_state=True)
    first = analytic_flops(dit, grid, steady_state=False)
    step = float(steady["section9"]["total"])            # the §9 formula (blocks + injector q/o)
    vae = float(analytic_vae_decode_flops(VAEConfig(), grid, dit.frames_per_block).total)
    spec = DEVICE_SPECS["h800-sxm"]
    peak = float(spec["bf16_tflops"]) * 1e12
    claimed = CLAIMED_FPS["v4_fp8_compile"]
    mfu_claim = implied_mfu(step, peak, claimed)
    rows = {}
    for name, mfu in (("bf16 peak (100 % MFU)", 1.0), ("reference's implied MFU (46 %)", 0.46)):
        row = project_gpu(step, vae, peak, mfu, NVLINK_HOP_S).as_dict()
        if measured_hop_s is not None:
            row["tpp_fps_with_cpu_loopback_hop"] = project_gpu(step, vae, peak, mfu, measured_hop_s).tpp_fps
        rows[name] = {(k[:-2] + "_ms" if k.endswith("_s") else k): (r(v * 1e3, 3) if k.endswith("_s") else r(v, 3))
                      for k, v in row.items()}
    return {"device": spec["name"], "peak_bf16_tflops": spec["bf16_tflops"],
            "step_tflop_section9": r(step / 1e12, 2), "step_tflop_closed_form_all_terms": r(steady["step"]["total"] / 1e12, 2),
            "first_block_step_tflop_section9": r(first["section9"]["total"] / 1e12, 2),
            "vae_decode_block_tflop": r(vae / 1e12, 2), "hop_assumed_ms": NVLINK_HOP_S * 1e3,
            "claimed_fps": claimed, "implied_mfu_of_claim": r(mfu_claim, 3), "rows": rows,
            "measured_step": "not measured (no GPU in this run)"}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    s, t, m, c, p = res["sequential"], res["tpp"], res["model"], res["comm"], res["projection"]
    fpb = res["frames_per_block"]
    lines = [f"Run: `{res['command']}` on {res['machine']['cpu']} ({res['machine']['cores']} cores), "
             f"torch {res['machine']['torch']}, {res['date']}; tiny config, {s['blocks']} blocks, steady window "
             f"blocks {res['window'][0]}..{res['window'][1]}. Load average at start / end: "
             f"{res['machine']['loadavg_at_start']} / {res['machine']['loadavg_at_end']}; cores busy with other "
             f"work just before each part: {res['machine']['busy_cores_before_part'] or 'not checked'}.", "",
             "**1. Sequential runner vs TPP lane (tiny, CPU)**", "",
             "| | sequential | TPP lane (5 ranks + caller) |", "|---|---|---|",
             f"| steady blocks/s | {s['steady_blocks_per_s']} | {t['steady_blocks_per_s']} |",
             f"| steady FPS ({fpb} frames/block) | {s['steady_fps']} | {t['steady_fps']} |",
             f"| speed-up | 1.00 | {r(t['steady_blocks_per_s'] / s['steady_blocks_per_s'], 2)} |",
             f"| time to first frame | {s['ttff_s']} s | {t['ttff_s']} s |",
             f"| start-up (models built + first session) | {s['build_s']} + {s['session_start_s']} s | "
             f"{t['lane_start_s']} + {t['first_session_start_s']} s |",
             f"| cores used by our processes in the window | {s['cpu']['ours_cores']} | {t['cpu']['ours_cores']} |",
             f"| CPU-seconds per block (all our processes) | {s['cpu']['ours_cpu_s_per_block']} | "
             f"{t['cpu']['ours_cpu_s_per_block']} |",
             f"| whole run (first push -> last block): cores ours / CPU-s per block | "
             f"{s['cpu_whole_run']['ours_cores']} / {s['cpu_whole_run']['ours_cpu_s_per_block']} | "
             f"{t['cpu_whole_run']['ours_cores']} / {t['cpu_whole_run']['ours_cpu_s_per_block']} |",
             f"| blocks per core-second in the window (rate / cores ours) | "
             f"{r(s['steady_blocks_per_s'] / s['cpu']['ours_cores'], 2)} | "
             f"{r(t['steady_blocks_per_s'] / t['cpu']['ours_cores'], 2)} |",
             f"| machine busy cores (others' share) | {s['cpu']['machine_busy_cores']} ({s['cpu']['others_cores']}) | "
             f"{t['cpu']['machine_busy_cores']} ({t['cpu']['others_cores']}) |",
             f"| output bit-identical | reference | {res['tpp_equals_sequential']} |", "",
             "Cores each lane process used in the steady window: " +
             ", ".join(f"{k} {v}" for k, v in t["cpu"]["per_process_cores"].items()) + "; over the whole run: " +
             ", ".join(f"{k} {v}" for k, v in t["cpu_whole_run"]["per_process_cores"].items()) + ".", "",
             f"The 4 denoise ranks had finished all {t['blocks']} blocks {t.get('denoise_done_s')} s after the first "
             f"push (seen by the caller); the decoder finished its last block at "
             f"{r(t['ttff_s'] + sum(t['intervals_ms']) / 1e3, 2)} s.", "",
             f"Session switch on the warm lane: {t['switch']['total_s']} s "
             f"(sink encode in the caller {t['switch']['sink_encode_in_caller_s']} s + sink prefill on the 4 denoise "
             f"ranks in turn and decoder warm-up {t['switch']['prefill_all_ranks_and_decoder_warmup_s']} s); "
             f"first frame of the new session alone in the lane: {t['switch']['ttff_alone_in_lane_s']} s; "
             f"close_session: {t['close_session_s']} s.", "",
             "**2. Per-stage compute (one process, one thread) and the pipeline model**", "",
             "| stage | wall ms per block | CPU ms per block |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {s['stage_cpu_ms'][k]} |" for k, v in s["stage_ms"].items()]
    lines += [f"| sum | {r(sum(s['stage_ms'].values()), 2)} | {r(sum(s['stage_cpu_ms'].values()), 2)} |"]
    lines += ["", "| prediction | blocks/s | vs measured TPP |", "|---|---|---|"]
    meas = t["steady_blocks_per_s"]
    for label, key in m["rows"]:
        lines.append(f"| {label} | {r(m[key], 3)} | {r(meas / m[key], 2)}x |")
    lines += ["", "**3. Hand-off between two gloo processes on loopback**", "",
              f"Payload: reference {c['reference/bytes']:,} bytes (latent + audio features, bf16); "
              f"tiny {c['tiny/bytes']:,} bytes (float32). Pipelined: both sides compute "
              f"{c['simulated_step_ms']} ms per block (one tiny denoise step).", "",
              "| payload | mode | idle: hop p50 | idle: sender blocked p50 | pipelined: hop p50 (both ready) | "
              "pipelined: delivery mean (send -> received) | pipelined: sender blocked per block, mean / p50 | "
              "pipelined: receiver wait mean | period per block, sender / receiver |",
              "|---|---|---|---|---|---|---|---|---|"]
    for pname in ("reference", "tiny"):
        for mode in ("blocking", "link"):
            i, q = c[f"{pname}/{mode}/idle"], c[f"{pname}/{mode}/pipelined"]
            lines.append(f"| {pname} | {'dist.send/recv' if mode == 'blocking' else 'Link (isend)'} | "
                         f"{i['hop_ms_p50']} ms | {i['sender_blocked_ms_p50']} ms | {q['hop_ms_p50']} ms | "
                         f"{q['delivery_ms_mean']} ms | {q['sender_blocked_ms_mean']} / {q['sender_blocked_ms_p50']} ms | "
                         f"{q['receiver_wait_ms_mean']} ms | {q['sender_period_ms']} / {q['receiver_period_ms']} ms |")
    lines += ["", f"**4. Projection, reference config (384x704), {p['device']}, §9 FLOPs**", "",
              f"Step: {p['step_tflop_section9']} TFLOP (§9 formula; {p['step_tflop_closed_form_all_terms']} with every "
              f"small term), first block {p['first_block_step_tflop_section9']} TFLOP; VAE decode per block "
              f"{p['vae_decode_block_tflop']} TFLOP (closed form). Hop: {p['hop_assumed_ms']} ms NCCL over NVLink "
              f"(assumed from §9, not measured). The claimed {p['claimed_fps']} FPS implies "
              f"{r(100 * p['implied_mfu_of_claim'], 1)} % bf16 MFU.", "",
              "| row | step | VAE | TPP FPS 12/(step+hop) | TPP FPS with our CPU hop | 1-GPU FPS 12/(4 step+VAE) | "
              "TPP first-frame fill |", "|---|---|---|---|---|---|---|"]
    for name, row in p["rows"].items():
        lines.append(f"| {name} | {row['step_ms']} ms | {row['vae_ms']} ms | {r(row['tpp_fps'], 1)} | "
                     f"{r(row.get('tpp_fps_with_cpu_loopback_hop', float('nan')), 1)} | {r(row['single_fps'], 1)} | "
                     f"{row['tpp_first_frame_ms']} ms |")
    lines.append(f"| measured step | {p['measured_step']} | | | | | |")
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else ""
    if DOC_BEGIN not in doc or DOC_END not in doc:
        raise SystemExit(f"{path} has no {DOC_BEGIN} ... {DOC_END} section to fill")
    head, rest = doc.split(DOC_BEGIN, 1)
    path.write_text(head + DOC_BEGIN + "\n" + text + "\n" + DOC_END + rest.split(DOC_END, 1)[1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=30, help="blocks per run (0.48 s of audio each)")
    ap.add_argument("--warmup", type=int, default=5, help="first blocks left out of the steady window")
    ap.add_argument("--hop-iters", type=int, default=40, help="messages per idle hop measurement")
    ap.add_argument("--pipelined-blocks", type=int, default=20, help="blocks per pipelined hop measurement")
    ap.add_argument("--quiet-cores", type=float, default=0.5,
                    help="before each part, wait until other work uses at most this many cores (0: no wait)")
    ap.add_argument("--quiet-timeout", type=float, default=30.0, help="longest wait for a quiet machine, s")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--doc", type=Path, help="fill the marked results section of this markdown file")
    args = ap.parse_args(argv)
    from models.liveavatar import LiveAvatarConfig

    config = LiveAvatarConfig.tiny()
    steps = config.scheduler.num_inference_steps
    first, last = args.warmup, args.blocks - 1 - steps
    if last - first < 3:
        raise SystemExit(f"--blocks {args.blocks} leaves no steady window after {args.warmup} warm-up blocks "
                         f"and {steps} drain blocks; use at least {args.warmup + steps + 4}")
    torch.set_num_threads(1)
    image, image2, pcm, speech_s = load_inputs(args.blocks, config.audio.block_samples)
    res: dict[str, object] = {
        "command": "python bench/tpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "frames_per_block": config.audio.block_frames,
        "window": [first, last], "speech_seconds": r(speech_s, 2),
        "machine": {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_at_start": r(os.getloadavg()[0], 2)}}
    t_all = time.monotonic()
    quiet = res["machine"]["busy_cores_before_part"] = {}

    def settle(part: str) -> None:
        if args.quiet_cores > 0:
            quiet[part] = wait_for_quiet(args.quiet_cores, args.quiet_timeout)

    settle("1-sequential")
    print(f"1/4 sequential runner, {args.blocks} blocks ...", flush=True)
    res["sequential"] = run_sequential(config, image, pcm, first, last)
    print(f"    {res['sequential']['steady_blocks_per_s']} blocks/s; 2/4 TPP lane ...", flush=True)
    settle("1-tpp")
    res["tpp"] = run_lane(config, image, image2, pcm, first, last)
    seq_frames, tpp_frames = res["sequential"].pop("_frames"), res["tpp"].pop("_frames")
    res["tpp_equals_sequential"] = all(torch.equal(a, b) for a, b in zip(seq_frames, tpp_frames))
    print(f"    {res['tpp']['steady_blocks_per_s']} blocks/s; 3/4 hand-off ...", flush=True)
    stage_ms = res["sequential"]["stage_ms"]
    step_s = statistics.fmean(v for k, v in stage_ms.items() if k.startswith("denoise")) / 1e3
    from models.config import DiTConfig

    ref, d = DiTConfig(), config.dit

    def audio_shape(c: DiTConfig) -> list[int]:
        return [1, c.num_audio_layers, c.audio_dim, c.vae_temporal_stride * c.frames_per_block]

    payloads = {   # what travels per hop: the block latent and the block's audio features
        "reference": [([1, ref.in_dim, ref.frames_per_block, 48, 88], "bfloat16"), (audio_shape(ref), "bfloat16")],
        "tiny": [(res["sequential"]["latent_shape"], "float32"), (audio_shape(d), "float32")]}
    settle("3-comm")
    res["comm"] = run_comm(payloads, step_s, args.hop_iters, args.pipelined_blocks)
    print("4/4 model and projection ...", flush=True)
    # 2. the pipeline model: the lane's stages are the 4 denoise ranks and the decode rank; the caller runs
    # the audio stage and packaging on the same cores, so the contention bound counts them too
    cpu_ms = res["sequential"]["stage_cpu_ms"]
    hop_s = res["comm"]["tiny/link/idle"]["hop_ms_p50"] / 1e3
    cores = res["machine"]["cores"]
    got = res["tpp"]["cpu"]["ours_cores"]

    def lane_only(ms: dict) -> dict:
        return {k: v / 1e3 for k, v in ms.items() if k.startswith("denoise") or k == "decode"}

    def every(ms: dict) -> dict:
        return {k: v / 1e3 for k, v in ms.items()}

    pred = predict_lane(lane_only(cpu_ms), hop_s, cores)
    res["model"] = {
        "handoff_ms": r(hop_s * 1e3), "slowest": pred.slowest, "slowest_cpu_ms": r(pred.slowest_s * 1e3, 2),
        "sum_all_stages_cpu_ms": r(sum(cpu_ms.values()), 2),
        "pipeline_wall_bps": predict_lane(lane_only(stage_ms), hop_s, cores).pipeline_bps,
        "pipeline_bps": pred.pipeline_bps,
        "contention_bps": predict_lane(every(cpu_ms), hop_s, cores).contention_bps,
        "contention_measured_cores_bps": predict_lane(every(cpu_ms), hop_s, got).contention_bps,
        "sequential_model_bps": predict_lane(every(cpu_ms), hop_s, 1).sequential_bps,
        "rows": [["1 / (slowest + hand-off), stage CPU times: one free core per rank", "pipeline_bps"],
                 ["1 / (slowest + hand-off), stage wall times of the sequential run", "pipeline_wall_bps"],
                 [f"min(1/slowest, C / sum of all stages incl. caller's audio + packaging), C = {cores} cores",
                  "contention_bps"],
                 [f"same, C = {got} (the cores our processes actually got in the window)",
                  "contention_measured_cores_bps"],
                 ["1 / sum of all stages (sequential, one free core)", "sequential_model_bps"]]}
    res["projection"] = projection(res["comm"]["reference/link/idle"]["hop_ms_p50"] / 1e3)
    res["machine"]["loadavg_at_end"] = r(os.getloadavg()[0], 2)
    res["total_s"] = r(time.monotonic() - t_all, 1)
    text = markdown(res)
    print(text)
    print(f"total {res['total_s']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if args.doc:
        write_doc(args.doc, text)
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
