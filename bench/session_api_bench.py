"""Session API benchmark: what a client of the REST/WebSocket API sees, on the local stack.

Usage (from the repository root)::

    .venv/bin/python bench/session_api_bench.py                      # lanes 1, 2, 3; ~5 min on 2 cores
    .venv/bin/python bench/session_api_bench.py --lanes 1 --seconds 12 --doc none --json /tmp/b.json

For each lane count N (default 1, 2, 3) the whole stack is started with the session API
(``services.cli.stack_cmd.up(run_dir, lanes=N, api=True)``: broker, Redis, audio-encoder, N lanes of
5 processes, stream-packager, session API), a tenant is created with the CLI, and N sessions run at
once, one per lane, exactly as a client would drive them:

  - ``POST /v1/sessions`` with an example image and ``{"idle": "pause"}`` (no video without speech, so the
    first fragment after the first audio byte is the first block of that speech); the client waits
    until the session is ``active`` (a lane holds it);
  - the client opens the media WebSocket, then the audio WebSocket, and streams example speech
    (24 kHz pcm16, resampled by the API, looped to ``--seconds``) in 100 ms chunks at real time;
  - every media fragment's arrival time is recorded at the client.

Per session it reports
  - **setup**: ``POST /v1/sessions`` -> state ``active``;
  - **time to first frame** (TTFF): the first audio byte sent -> media fragment 0 (the first video
    frames) received. It includes the 0.48 s of audio whose features block 0 needs (the audio stage
    encodes each block's 7,680 samples alone, block 0 included), sent at real time;
  - **block latency**: for block k, arrival of fragment k minus the send time of the audio chunk that
    completes block k (block k needs the audio up to 0.48 * (k + 1) s); p50/p95/max and
    its *drift* (mean of the last 5 blocks minus mean of the first 5 after warm-up: a session that
    falls behind real time has a growing latency);
  - **seconds per block** after warm-up: the least-squares slope of fragment arrival time against block
    index, blocks ``--warmup`` .. the last one whose audio was paced (the average time per block, not
    skewed by one late block at either end), and the sustained **FPS** = 12 frames / seconds per block;
  - audio chunks the API refused with 429 (more than ``LIVEAVATAR_MAX_QUEUED_AUDIO_S`` of audio queued:
    the session has fallen that far behind real time; the latency of later blocks is then approximate).

A round **holds real time** when every session's fragments arrive no slower than 0.48 s per block on
average after warm-up (tolerance 1 % for the pacing clock: audio is paced on a drift-free schedule,
so a session that keeps up averages 0.480 s exactly, give or take a few ms of jitter at the ends).
The answer to "how many concurrent sessions does this machine hold" is the largest N that does.

The machine is shared with other work: the load average before and after each round and the CPU
seconds the stack's processes used go into the results. Results go to ``--json`` and into the marked
section of docs/session-api.md (``--doc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _benchlib import cpu_model, cpu_seconds, load, write_marked_section  # noqa: E402

from services.common.examples import examples_dir  # noqa: E402

EXAMPLES = examples_dir()
AVATARS = ("cyclops_baker", "kitchen_grandmother", "music_producer")
BLOCK_S = 0.48                   # 12 frames at 25 fps
FRAMES_PER_BLOCK = 12
CHUNK_S = 0.1                    # audio chunk the client sends
REALTIME_TOLERANCE = 1.01
DOC_BEGIN, DOC_END = "<!-- session-api-bench:begin -->", "<!-- session-api-bench:end -->"


def write_doc(path: Path, table: str) -> None:
    write_marked_section(path, DOC_BEGIN, DOC_END, table, heading='Measured results')


class BenchError(RuntimeError):
    """A round could not run (stack not ready, session never active, no media)."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def r3(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None






def stack_pids(run_dir: Path) -> dict[str, list[int]]:
    """The local stack's processes by component: each service, the lanes (group + ranks), broker, Redis."""
    from infra.local.stack import LocalStack
    from services.cli import stack_cmd

    out: dict[str, list[int]] = {}
    for name, svc in stack_cmd.services_info(run_dir).items():
        label = "lanes" if name.startswith("lane-") else name
        pids = [svc["pid"]]
        if svc.get("rank_pids_file") and Path(svc["rank_pids_file"]).exists():
            pids += [int(x) for x in Path(svc["rank_pids_file"]).read_text().split()]
        out.setdefault(label, []).extend(pids)
    for name, srv in LocalStack(run_dir).status().items():
        out.setdefault(name, []).append(srv["pid"])
    return out


def cpu_by_component(groups: dict[str, list[int]]) -> dict[str, float]:
    return {k: cpu_seconds(v) for k, v in groups.items()}


def example_pcm16(name: str, seconds: float) -> tuple[bytes, int]:
    """The example speech as pcm16 bytes at its own rate (24 kHz), looped to ``seconds``."""
    import av

    with av.open(str(EXAMPLES / f"{name}.wav")) as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    n = int(seconds * rate)
    x = np.tile(x, -(-n // len(x)))[:n]
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes(), rate


def machine() -> dict:
    cpu = cpu_model()
    mem_gib = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "python": platform.python_version(),
            "torch": torch.__version__, "kernel": platform.release(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


# ---------------------------------------------------------------------------------------------
# One session, as a client drives it: media WebSocket in one thread, audio WebSocket in another
# ---------------------------------------------------------------------------------------------

@dataclass
class SessionRun:
    sid: str
    avatar: str
    created_at: float = 0.0                     # monotonic time of the POST /v1/sessions
    setup_s: float = 0.0
    audio_start: float | None = None            # monotonic time of the first audio byte sent
    chunk_sent: list[tuple[float, float]] = field(default_factory=list)   # (audio seconds so far, time)
    audio_done: float | None = None
    arrivals: dict[int, float] = field(default_factory=dict)             # block -> first arrival time
    duplicates: int = 0
    refused_chunks: int = 0                     # audio frames the API refused with 429 (too much queued)
    init_at: float | None = None
    errors: list[str] = field(default_factory=list)


def send_audio(session, run: SessionRun, pcm: bytes, rate: int) -> None:
    """Stream ``pcm`` (pcm16) at real time over the session's audio WebSocket (the project's client), then end."""
    try:
        with session.audio(rate, "pcm16", 1) as stream:
            try:
                stream.send_paced(pcm, chunk_s=CHUNK_S, speed=1.0)             # drift-free real-time schedule
                stream.end(timeout_s=60)
            finally:
                rep = stream.report
                run.audio_start = rep.started_at
                run.chunk_sent = list(rep.sent_at)
                run.refused_chunks = rep.refused_chunks
                run.errors.extend(f"audio: {e}" for e in rep.errors)
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the round goes on
        run.errors.append(f"audio: {type(exc).__name__}: {exc}")
    finally:
        run.audio_done = time.monotonic()


def read_media(session, run: SessionRun, stop: threading.Event) -> None:
    """Record each media fragment's arrival time (the client stamps a piece when its bytes arrive)."""
    try:
        with session.media() as media:
            while not stop.is_set():
                try:
                    piece = media.next(timeout_s=0.5)
                except TimeoutError:
                    continue
                except StopIteration:
                    return
                if piece.type == "init":
                    run.init_at = run.init_at or piece.received_at
                elif piece.type == "fragment":
                    if piece.block in run.arrivals:
                        run.duplicates += 1
                    else:
                        run.arrivals[piece.block] = piece.received_at
                elif piece.type == "end":
                    return
    except Exception as exc:  # noqa: BLE001
        run.errors.append(f"media: {type(exc).__name__}: {exc}")


def session_metrics(run: SessionRun, warmup: int) -> dict:
    """TTFF, block latency, seconds per block and FPS of one session (see the module docstring)."""
    blocks = sorted(run.arrivals)
    res: dict = {"session": run.sid, "avatar": run.avatar, "setup_s": r3(run.setup_s), "blocks": len(blocks),
                 "duplicates": run.duplicates, "refused_audio_chunks": run.refused_chunks, "errors": run.errors[:5]}
    res["in_order_no_gaps"] = blocks == list(range(len(blocks)))
    if run.audio_start is not None:
        res["arrivals_s"] = [r3(run.arrivals[b] - run.audio_start) for b in blocks]   # from the first audio byte
    if not blocks or run.audio_start is None or 0 not in run.arrivals:
        res["holds_real_time"] = False
        return res
    res["ttff_s"] = r3(run.arrivals[0] - run.audio_start)

    # Block latency: arrival of block k - send time of the chunk that completes its audio.
    sent_s = np.array([s for s, _ in run.chunk_sent])
    sent_t = np.array([t for _, t in run.chunk_sent])
    lat = {}
    for b in blocks:
        need = BLOCK_S * (b + 1)                  # each block's features come from its own 7,680 samples
        i = int(np.searchsorted(sent_s, need - 1e-9))
        if i < len(sent_t):                       # the last, padded block has no completing chunk
            lat[b] = run.arrivals[b] - sent_t[i]
    steady = [lat[b] for b in sorted(lat) if b >= warmup]
    res["latency_p50_s"], res["latency_p95_s"] = r3(pct(steady, 50)), r3(pct(steady, 95))
    res["latency_max_s"] = r3(max(steady)) if steady else None
    res["latency_drift_s"] = r3(np.mean(steady[-5:]) - np.mean(steady[:5])) if len(steady) >= 10 else None

    # Seconds per block and FPS after warm-up, over the blocks whose audio was paced (not the padded tail):
    # the least-squares slope of arrival time against block index, i.e. the average time per block, which
    # one late block at either end (the last paced block waits for the end of the utterance) cannot skew.
    last = max(lat) if lat else blocks[-1]
    span = [b for b in blocks if warmup <= b <= last]
    if len(span) >= 3:
        spb = float(np.polyfit(span, [run.arrivals[b] for b in span], 1)[0])
        res["s_per_block"] = r3(spb)
        res["fps"] = round(FRAMES_PER_BLOCK / spb, 2)
        res["holds_real_time"] = bool(spb <= BLOCK_S * REALTIME_TOLERANCE) and res["in_order_no_gaps"]
    else:
        res["holds_real_time"] = False
    return res


# ---------------------------------------------------------------------------------------------
# One round: N lanes, N concurrent sessions
# ---------------------------------------------------------------------------------------------

def create_tenant(run_dir: Path, name: str, max_sessions: int) -> str:
    r = subprocess.run([sys.executable, "-m", "services.cli", "tenants", "create", name, "--max-sessions",
                        str(max_sessions), "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    if r.returncode != 0 or not r.stdout.strip().startswith("la_"):
        raise BenchError(f"tenants create failed: {r.stderr[-500:]}")
    return r.stdout.strip()


def run_round(n: int, seconds: float, warmup: int, run_root: Path) -> dict:
    from liveavatar_client import LiveAvatar
    from liveavatar_client.errors import ApiError

    from services.cli import stack_cmd

    run_dir = run_root / f"lanes-{n}"
    res: dict = {"lanes": n, "sessions": n, "load_before": load()}
    t = time.monotonic()
    stack_cmd.up(run_dir, lanes=n, api=True, timeout_s=600)
    res["stack_up_s"] = r3(time.monotonic() - t)
    try:
        port = stack_cmd.services_info(run_dir)["session-api"]["health_ports"][0]
        key = create_tenant(run_dir, f"bench-{n}", max_sessions=n)
        groups = stack_pids(run_dir)
        runs: list[SessionRun] = []
        sessions: dict = {}
        with LiveAvatar(f"http://127.0.0.1:{port}", key, timeout=60) as client:
            # 1. Create the sessions (one per lane) and wait until a lane holds each.
            for i in range(n):
                avatar = AVATARS[i % len(AVATARS)]
                t0 = time.monotonic()
                try:
                    session = client.create_session(EXAMPLES / f"{avatar}.jpg", {"idle": "pause", "seed": i})
                except ApiError as exc:
                    raise BenchError(f"POST /v1/sessions: {exc}") from exc
                sessions[session.id] = session
                runs.append(SessionRun(session.id, avatar, created_at=t0))
            deadline = time.monotonic() + 180
            pending = {run.sid: run for run in runs}
            while pending:
                if time.monotonic() > deadline:
                    raise BenchError(f"sessions never became active: {list(pending)}")
                for sid, run in list(pending.items()):
                    if sessions[sid].refresh().state == "active":
                        run.setup_s = time.monotonic() - run.created_at
                        del pending[sid]
                time.sleep(0.05)

            # 2. All sessions at once: media readers first, then the audio senders.
            stop = threading.Event()
            readers = [threading.Thread(target=read_media, args=(sessions[run.sid], run, stop), daemon=True)
                       for run in runs]
            for th in readers:
                th.start()
            # Idle baseline: sessions active, media sockets open, no audio ("pause": nothing is generated).
            idle0, t_idle = cpu_by_component(groups), time.monotonic()
            time.sleep(5.0)
            idle1 = cpu_by_component(groups)
            t_idle = time.monotonic() - t_idle
            res["idle_cores_busy"] = r3((sum(idle1.values()) - sum(idle0.values())) / t_idle)
            res["idle_cores_by_component"] = {k: r3((idle1[k] - idle0[k]) / t_idle) for k in idle1}
            cpu0, wall0 = idle1, time.monotonic()
            senders = []
            for run in runs:
                pcm, rate = example_pcm16(run.avatar, seconds)
                senders.append(threading.Thread(target=send_audio, args=(sessions[run.sid], run, pcm, rate),
                                                daemon=True))
            for th in senders:
                th.start()
            for th in senders:
                th.join(seconds + 120)

            # 3. Read until every session's media is quiet for 3 s after its audio ended.
            expected = int(np.ceil(seconds / BLOCK_S - 1e-9))      # the last partial block is zero-padded
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                newest = max((max(r.arrivals.values(), default=0.0) for r in runs), default=0.0)
                if all(len(r.arrivals) >= expected for r in runs) and time.monotonic() - newest > 3.0:
                    break
                if time.monotonic() - max(newest, max(r.audio_done or 0 for r in runs)) > 20:
                    break                           # nothing more is coming
                time.sleep(0.2)
            cpu1, wall = cpu_by_component(groups), time.monotonic() - wall0
            cpu = sum(cpu1.values()) - sum(cpu0.values())
            res["cpu_cores_busy"] = r3(cpu / wall)
            res["cpu_cores_by_component"] = {k: r3((cpu1[k] - cpu0[k]) / wall) for k in cpu1}
            n_blocks = sum(len(r.arrivals) for r in runs)
            res["cpu_s_per_block"] = r3(cpu / n_blocks) if n_blocks else None
            # what one more block costs above the idle baseline (polling loops, heartbeats)
            res["marginal_cpu_s_per_block"] = r3((cpu - res["idle_cores_busy"] * wall) / n_blocks) if n_blocks else None
            stop.set()
            for th in readers:
                th.join(10)
            for run in runs:
                sessions[run.sid].end()
        res["expected_blocks"] = expected
        res["per_session"] = [session_metrics(run, warmup) for run in runs]
    finally:
        stack_cmd.down(run_dir)
    per = res["per_session"]
    res["holds_real_time"] = all(p["holds_real_time"] for p in per)
    spb = [p["s_per_block"] for p in per if p.get("s_per_block")]
    res["worst_s_per_block"] = max(spb) if spb else None
    res["min_fps"] = min((p["fps"] for p in per if p.get("fps")), default=None)
    ttff = [p["ttff_s"] for p in per if p.get("ttff_s") is not None]
    res["ttff_mean_s"] = r3(np.mean(ttff)) if ttff else None
    res["ttff_max_s"] = max(ttff) if ttff else None
    res["load_after"] = load()
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def markdown(res: dict, argv: list[str]) -> str:
    m = res["machine"]
    cmd = "bench/session_api_bench.py" + ("" if not argv else " " + " ".join(argv))
    lines = [f"Measured {m['date_utc']} UTC on {m['cores']} CPU cores ({m['cpu']}, {m['memory_gib']} GiB), "
             f"Python {m['python']}, torch {m['torch']}, tiny configuration, no GPU. Rerun: "
             f"`.venv/bin/python {cmd}`.",
             f"Each session streams {res['seconds']:g} s of example speech at real time; warm-up = the first "
             f"{res['warmup']} blocks. The machine is shared: see the load average.", "",
             "| lanes = sessions | holds real time | s/block (worst session) | FPS (lowest) | TTFF mean / max | "
             "block latency p50 / p95 (worst) | latency drift (worst) | setup (max) | stack CPU: cores busy, "
             "CPU s per block | load before / after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rounds"]:
        if "error" in r:
            lines.append(f"| {r['lanes']} | error: {r['error']} | | | | | | | | |")
            continue
        per = r["per_session"]

        def worst(k, per=per):
            vals = [p[k] for p in per if p.get(k) is not None]
            return max(vals) if vals else None

        def s(v):
            return "-" if v is None else f"{v:.3f}"

        lines.append(
            f"| {r['lanes']} | {'yes' if r['holds_real_time'] else '**no**'} | {s(r['worst_s_per_block'])} | "
            f"{r['min_fps'] if r['min_fps'] is not None else '-'} | {s(r['ttff_mean_s'])} / {s(r['ttff_max_s'])} s | "
            f"{s(worst('latency_p50_s'))} / {s(worst('latency_p95_s'))} s | {s(worst('latency_drift_s'))} s | "
            f"{s(worst('setup_s'))} s | {r['cpu_cores_busy']}, {s(r.get('cpu_s_per_block'))} | "
            f"{r['load_before']} / {r['load_after']} |")
    lines += ["", f"**Concurrent tiny-config sessions this machine holds at real time: {res['max_realtime_sessions']}** "
              f"(largest N tried whose every session averaged <= {BLOCK_S} s per block after warm-up).", ""]
    est = res.get("cpu_estimate")
    if est:
        lines += [f"CPU-bound estimate for this machine with nothing else running: a block costs the stack "
                  f"(services, lanes, broker, Redis) {est['marginal_cpu_s_per_block']:.3f} CPU-seconds above its idle "
                  f"load; idle, a lane uses {est['idle_cores_per_lane']:.3f} cores and everything else "
                  f"{est['idle_cores_rest']:.3f} (means over the rounds). So {m['cores']} cores hold "
                  f"{est['sessions_float']:.2f} sessions at real time: **{est['sessions']}**, if the work spread "
                  f"perfectly over the cores and the 5 ranks of a lane never waited on each other.", ""]
        big = max((r for r in res["rounds"] if r.get("cpu_cores_by_component")), key=lambda r: r["lanes"])
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(big["cpu_cores_by_component"].items(),
                                                            key=lambda kv: -kv[1]))
        lines += [f"Cores used by component with {big['lanes']} session(s): {parts}.", ""]
    lines += ["<details><summary>Per session</summary>", "",
              "| lanes | session | avatar | blocks | in order | TTFF | s/block | FPS | latency p50 / p95 / max | "
              "drift | setup | audio chunks refused (429) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rounds"]:
        for p in r.get("per_session", []):
            lines.append(f"| {r['lanes']} | {p['session']} | {p['avatar']} | {p['blocks']} | {p['in_order_no_gaps']} | "
                         f"{p.get('ttff_s')} | {p.get('s_per_block')} | {p.get('fps')} | {p.get('latency_p50_s')} / "
                         f"{p.get('latency_p95_s')} / {p.get('latency_max_s')} | {p.get('latency_drift_s')} | "
                         f"{p['setup_s']} | {p['refused_audio_chunks']} |")
    lines += ["", "</details>"]
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 3], help="lane counts to try (= sessions)")
    p.add_argument("--seconds", type=float, default=24.0, help="seconds of speech per session")
    p.add_argument("--warmup", type=int, default=5, help="blocks left out of the steady-state numbers")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--doc", default=str(ROOT / "docs" / "session-api.md"), help="markdown file to update, or 'none'")
    p.add_argument("--run-root", type=Path, default=None, help="where the stacks' run directories go (default: tmp)")
    args = p.parse_args(argv)
    if args.seconds < BLOCK_S * (args.warmup + 12):
        p.error(f"--seconds must cover the warm-up plus at least 12 blocks ({BLOCK_S * (args.warmup + 12):.2f} s)")

    res: dict = {"machine": machine(), "seconds": args.seconds, "warmup": args.warmup, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="la-api-bench-", dir=args.run_root) as tmp:
        for n in args.lanes:
            print(f"[session-api-bench] {n} lane(s), {n} session(s) ...", flush=True)
            try:
                r = run_round(n, args.seconds, args.warmup, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a failed round is a result too
                r = {"lanes": n, "error": f"{type(exc).__name__}: {exc}"}
            res["rounds"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "per_session"}), flush=True)
    ok = [r["lanes"] for r in res["rounds"] if r.get("holds_real_time")]
    res["max_realtime_sessions"] = max(ok) if ok else 0
    done = [r for r in res["rounds"] if r.get("marginal_cpu_s_per_block")]
    if done:
        c = float(np.mean([r["marginal_cpu_s_per_block"] for r in done]))
        idle_lane = float(np.mean([r["idle_cores_by_component"].get("lanes", 0.0) / r["lanes"] for r in done]))
        idle_rest = float(np.mean([r["idle_cores_busy"] - r["idle_cores_by_component"].get("lanes", 0.0)
                                   for r in done]))
        cores = res["machine"]["cores"]
        # n sessions at real time (one lane each) need idle_rest + n * (idle_lane + c / 0.48) cores
        n = (cores - idle_rest) / (idle_lane + c / BLOCK_S)
        res["cpu_estimate"] = {"marginal_cpu_s_per_block": r3(c), "idle_cores_per_lane": r3(idle_lane),
                               "idle_cores_rest": r3(idle_rest), "sessions_float": r3(n), "sessions": int(n)}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    table = markdown(res, argv)
    print(table)
    if args.doc != "none":
        write_doc(Path(args.doc), table)
    return 0 if all("error" not in r for r in res["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
