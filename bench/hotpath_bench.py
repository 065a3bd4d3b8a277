"""Hot-path benchmark: where the services' CPU goes per block (serialisation, polling, Redis writes).

Usage (from the repository root)::

    .venv/bin/python bench/hotpath_bench.py                       # ~2 min on 2 cores
    .venv/bin/python bench/hotpath_bench.py --idle-s 20 --seconds 20 --json /tmp/hotpath.json
    .venv/bin/python bench/hotpath_bench.py --serialisation-only   # part 1 only, no stack (~10 s)

What it measures (the shipped ``tiny-trained`` model at 64x64, one lane; CPU seconds = user + system time
from ``/proc/PID/stat``, per process, so the numbers hold on a shared machine where wall time does not):

  1. **Serialisation.** ``messages.encode`` / ``messages.decode`` of one real-size message of every hop
     (the API's 100 ms PCM chunk, a block of audio features, a block of H.264 frames, a media fragment),
     plus the torch conversions around them, timed directly (best of 5 runs of N calls). Per block: each
     hop's messages per block x (encode + decode).
  2. **Polling.** The stack as ``liveavatar up`` starts it (``services.cli.stack_cmd.up``: broker, Redis,
     supervisor, audio encoder, one lane, stream packager, webhooks, session API), left idle with no
     session for ``--idle-s``: the CPU each process burns waiting (poll timeouts, heartbeats, tickers,
     lag export). Idle cores x 0.48 s is what waiting costs per block while a session runs, too.
  3. **Per block with one session.** A session driven as a client drives it (``bench/realtime_bench.py``'s
     WebSocket client: 24 kHz pcm16 speech in 100 ms chunks at real time, every media fragment read):
     CPU seconds per block of every process (first audio byte -> last fragment, divided by the blocks),
     and the Redis commands per block: counts per command from ``INFO commandstats`` and per process from
     ``MONITOR`` (client port -> pid from /proc), the bytes Redis received (``total_net_input_bytes``).

Results: a table on stdout, and every number in ``--json``. docs/hotpath.md records runs.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import realtime_bench as rtb  # noqa: E402 - the real-time WebSocket client
import session_api_bench as sab  # noqa: E402 - tenants, example speech, machine
from _benchlib import cpu_seconds, load  # noqa: E402

from infra.local.stack import tcp_sockets  # noqa: E402

BLOCK = 7680
BLOCK_S = BLOCK / 16000
API_CHUNK = 1600                 # the client's 100 ms chunk, resampled to 16 kHz: one AudioIn per chunk
READ_COMMANDS = {"GET", "HGET", "HGETALL", "HMGET", "ZRANGE", "ZRANGEBYSCORE", "EXISTS", "PING", "SMEMBERS", "TYPE",
                 "SCAN", "INFO", "WATCH", "UNWATCH", "EVALSHA_RO", "SCRIPT", "CLIENT", "HELLO", "SELECT", "TTL"}


def r3(x: float) -> float:
    return round(float(x), 3)


# ---------------------------------------------------------------------------------------------
# Part 1: serialisation, timed directly on real-size tiny messages
# ---------------------------------------------------------------------------------------------

def _best_us(fn, n: int) -> float:
    """Microseconds per call of ``fn``: the best of 5 runs of ``n`` calls (the least disturbed)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def serialisation(n: int = 300) -> dict:
    """Encode + decode cost of every hop's message, per call and per block."""
    import torch
    from PIL import Image, ImageOps

    from models.checkpoints import SHIPPED_SPEC
    from models.liveavatar import LiveAvatarConfig, build_models, default_checkpoint
    from pipeline_stages.package_stage import lane_stream_config, make_package_stage
    from pipeline_stages.video_encode import BlockVideoEncoder
    from services.audio_encoder.backends import make_backend
    from services.common.messages import (
        AudioIn,
        Features,
        Frames,
        Media,
        Tensor,
        decode,
        encode,
        h264_from_tensors,
        h264_tensors,
        tensor_from_torch,
        tensor_to_torch,
    )

    torch.set_num_threads(1)
    config = LiveAvatarConfig.load(SHIPPED_SPEC)
    models = build_models(config, checkpoint=default_checkpoint(SHIPPED_SPEC), parts={"audio"})
    pcm = sab_pcm16k(BLOCK)
    feats = np.asarray(make_backend("torch", encoder=models.audio).encode_block(pcm), np.float32)[None]
    img = ImageOps.fit(Image.open(sab.EXAMPLES / "cyclops_baker.jpg").convert("RGB"), (64, 64))
    rng = np.random.default_rng(0)
    frames = np.clip(np.asarray(img, np.float32)[None] + rng.normal(0, 2, (12, 64, 64, 3)), 0, 255).astype(np.uint8)
    cfg = lane_stream_config(64, 64, 25, 12)
    enc = BlockVideoEncoder(cfg, 0)
    units, avcc = enc.encode_block(frames).access_units, enc.codec_config
    enc.close()
    stage = make_package_stage(64, 64, 25, 12, tiny=None, video_config=avcc)
    stage.init_segment()
    fragment = stage.push_encoded(units, pcm, avcc)
    ids = dict(session_id="s-" + "0" * 20, tenant_id="bench")
    pcm_t = torch.from_numpy(pcm.copy())

    # (hop, messages per block, encode side, decode side): each side builds / reads the message as the service does
    hops = [
        ("audio: AudioIn pcm 100 ms (session API -> audio encoder)", BLOCK / API_CHUNK,
         lambda: encode(AudioIn(**ids, seq=5, kind="pcm"), {"pcm": Tensor.from_numpy(pcm[:API_CHUNK])}),
         lambda raw: np.array(decode(raw).tensors["pcm"].numpy(), np.float32)),
        ("audio-features: block (audio encoder -> lane head)", 1.0,
         lambda: encode(Features(**ids, seq=5, kind="block", lane_id="lane-0"),
                        {"features": Tensor.from_numpy(feats), "pcm": Tensor.from_numpy(pcm)}),
         lambda raw: [tensor_to_torch(t) for t in decode(raw).tensors.values()]),
        ("frames: H.264 block (lane decode rank -> packager)", 1.0,
         lambda: encode(Frames(**ids, seq=5, kind="block", lane_id="lane-0"),
                        {**h264_tensors(units, avcc), "pcm": tensor_from_torch(pcm_t)}),
         lambda raw: h264_from_tensors(decode(raw).tensors)),
        ("media: fragment (packager -> session API)", 1.0,
         lambda: encode(Media(**ids, seq=5, kind="fragment", start_time_s=2.4),
                        {"data": Tensor("uint8", (len(fragment),), fragment)}),
         lambda raw: decode(raw).tensors["data"].data),
    ]
    rows, total = [], 0.0
    for name, per_block, enc_fn, dec_fn in hops:
        raw = enc_fn()
        e_us, d_us = _best_us(enc_fn, n), _best_us(lambda raw=raw, f=dec_fn: f(raw), n)
        ms = per_block * (e_us + d_us) / 1000
        total += ms
        rows.append({"hop": name, "bytes": len(raw), "per_block": r3(per_block), "encode_us": round(e_us, 1),
                     "decode_us": round(d_us, 1), "ms_per_block": r3(ms)})
    return {"hops": rows, "ms_per_block": r3(total)}


def sab_pcm16k(n: int) -> np.ndarray:
    """``n`` samples of example speech at 16 kHz, float32."""
    from models.inputs import load_audio

    return np.ascontiguousarray(load_audio(str(sab.EXAMPLES / "cyclops_baker.wav"), 60)[:n], np.float32)


# ---------------------------------------------------------------------------------------------
# The stack's processes, one by one, and who talks to Redis
# ---------------------------------------------------------------------------------------------

def stack_processes(run_dir: Path) -> dict[str, int]:
    """Label -> pid of every process of the local stack (each lane rank on its own)."""
    from infra.local.stack import LocalStack
    from services.cli import stack_cmd

    out: dict[str, int] = {}
    for name, srv in LocalStack(run_dir).status().items():
        out[name] = srv["pid"]
    sup = run_dir / stack_cmd.SUPERVISOR_PID
    if sup.exists():
        out["supervisor"] = int(sup.read_text())
    for name, svc in stack_cmd.services_info(run_dir).items():
        if svc.get("rank_pids_file"):
            out[f"{name} group"] = svc["pid"]
            ranks = Path(svc["rank_pids_file"]).read_text().split() if Path(svc["rank_pids_file"]).exists() else []
            for r, pid in enumerate(ranks):
                out[f"{name} rank {r}"] = int(pid)
        else:
            out[name] = svc["pid"]
    return out


def cpu_by_process(procs: dict[str, int]) -> dict[str, float]:
    return {k: cpu_seconds([pid]) for k, pid in procs.items()}


def port_owners(procs: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> process label, from the sockets each process holds."""
    label = {pid: name for name, pid in procs.items()}
    return {sock.port: label[sock.pid] for sock in tcp_sockets(procs.values())}


class RedisMonitor:
    """``MONITOR`` on a raw socket in a thread: (client port, command) of every command Redis runs."""

    _LINE = re.compile(rb'^\+[\d.]+ \[\d+ (?:[\d.:a-fA-F\[\]]+:(\d+)|lua)\] "([A-Za-z_]+)"')

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(b"MONITOR\r\n")
        self.counts: Counter = Counter()          # (port or 0 for lua, COMMAND) -> calls
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                m = self._LINE.match(line)
                if m:
                    self.counts[(int(m.group(1)) if m.group(1) else 0, m.group(2).decode().upper())] += 1

    def snapshot(self) -> Counter:
        return Counter(self.counts)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def redis_counters(client) -> tuple[dict[str, int], int]:
    """(calls per command, bytes received) so far, from INFO."""
    stats = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_").upper(): int(v["calls"]) for k, v in stats.items()}
    return calls, int(client.info("stats")["total_net_input_bytes"])


def redis_delta(before, after) -> tuple[dict[str, int], int]:
    (c0, b0), (c1, b1) = before, after
    calls = {k: v - c0.get(k, 0) for k, v in c1.items() if v - c0.get(k, 0) > 0}
    calls.pop("INFO", None)                       # the bench's own
    return calls, b1 - b0


def by_process(counts: Counter, owners: dict[int, str]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for (port, cmd), n in counts.items():
        who = "lua (inside EVAL)" if port == 0 else owners.get(port, "other (bench, CLI)")
        out.setdefault(who, Counter())[cmd] += n
    return {k: dict(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Parts 2 and 3: the stack idle, then one session at real time
# ---------------------------------------------------------------------------------------------

def _profilers(procs: dict[str, int], out: Path, seconds: float) -> list:
    """``py-spy record`` (collapsed stacks of the thread holding the GIL: Python CPU; not pausing the target) of every Python service during the feed."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--nonblocking", "--gil",
                              "--format", "raw", "-o", str(out / f"{label.replace(' ', '_')}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for label, pid in procs.items() if label not in ("broker", "redis", "supervisor") and "group" not in label]


def run_stack(run_dir: Path, idle_s: float, seconds: float, lane_shape: str, profile_dir: Path | None = None) -> dict:
    import httpx
    import redis

    from infra.local.stack import LocalStack
    from services.cli import stack_cmd

    res: dict = {"load_before": load()}
    t = time.monotonic()
    up = stack_cmd.up(run_dir, lanes=1, api=True, timeout_s=600, lane_shape=lane_shape)
    res["stack_up_s"], res["lane_plan"] = r3(time.monotonic() - t), up.get("lanes")
    try:
        procs = stack_processes(run_dir)
        rclient = redis.Redis.from_url(up["infra"].redis_url)
        mon = RedisMonitor("127.0.0.1", LocalStack(run_dir).info().servers["redis"].port)
        time.sleep(5.0)                                      # past the start-up work (consumer-group joins)
        owners = port_owners(procs)

        # part 2: idle
        c0, r0, m0, w0 = cpu_by_process(procs), redis_counters(rclient), mon.snapshot(), time.monotonic()
        time.sleep(idle_s)
        c1, r1, m1, wall = cpu_by_process(procs), redis_counters(rclient), mon.snapshot(), time.monotonic() - w0
        calls, nbytes = redis_delta(r0, r1)
        owners |= port_owners(procs)                         # connections opened meanwhile (redis-py is lazy)
        res["idle"] = {"seconds": r3(wall), "cores": {k: r3((c1[k] - c0[k]) / wall) for k in procs},
                       "redis_calls_per_s": {k: r3(v / wall) for k, v in calls.items()},
                       "redis_bytes_in_per_s": r3(nbytes / wall),
                       "redis_by_process_per_s": {w: {c: r3(n / wall) for c, n in d.items()}
                                                  for w, d in by_process(m1 - m0, owners).items()}}

        # part 3: one session at real time
        api = stack_cmd.services_info(run_dir)["session-api"]["health_ports"][0]
        key = sab.create_tenant(run_dir, "hotpath", max_sessions=1)
        run = None
        with httpx.Client(base_url=f"http://127.0.0.1:{api}", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            avatar = sab.AVATARS[0]
            r = client.post("/v1/sessions", files={"image": (f"{avatar}.jpg",
                            (sab.EXAMPLES / f"{avatar}.jpg").read_bytes(), "image/jpeg")},
                            data={"options": json.dumps({"idle": "pause", "seed": 1})})
            if r.status_code != 201:
                raise sab.BenchError(f"POST /v1/sessions: {r.status_code} {r.text}")
            run = sab.SessionRun(r.json()["id"], avatar, created_at=time.monotonic())
            deadline = time.monotonic() + 180
            while client.get(f"/v1/sessions/{run.sid}").json()["state"] != "active":
                if time.monotonic() > deadline:
                    raise sab.BenchError("the session never became active")
                time.sleep(0.05)
            base = f"ws://127.0.0.1:{api}/v1/sessions/{run.sid}"
            stop = threading.Event()
            reader = threading.Thread(target=rtb.read_media, args=(f"{base}/media?key={key}", run, stop), daemon=True)
            reader.start()
            time.sleep(1.0)
            procs = stack_processes(run_dir)
            owners = port_owners(procs)
            c0, r0, m0, w0 = cpu_by_process(procs), redis_counters(rclient), mon.snapshot(), time.monotonic()
            pcm, rate = sab.example_pcm16(avatar, seconds)
            spies = _profilers(procs, profile_dir, seconds + 5) if profile_dir else []
            rtb.send_audio(f"{base}/audio?key={key}", run, pcm, rate)
            expected = int(np.ceil(seconds / BLOCK_S - 1e-9))
            deadline = time.monotonic() + 60
            while len(run.arrivals) < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            c1, r1, m1, wall = cpu_by_process(procs), redis_counters(rclient), mon.snapshot(), time.monotonic() - w0
            owners |= port_owners(procs)
            for spy in spies:
                spy.wait(60)
            stop.set()
            reader.join(10)
            client.delete(f"/v1/sessions/{run.sid}")
        blocks = max(1, len(run.arrivals))
        calls, nbytes = redis_delta(r0, r1)
        res["session"] = {"blocks": len(run.arrivals), "expected_blocks": expected, "seconds": r3(wall),
                          "errors": run.errors[:3],
                          "cpu_s_per_block": {k: round((c1[k] - c0[k]) / blocks, 4) for k in procs},
                          "redis_calls_per_block": {k: r3(v / blocks) for k, v in sorted(calls.items())},
                          "redis_bytes_in_per_block": int(nbytes / blocks),
                          "redis_by_process_per_block": {w: {c: r3(n / blocks) for c, n in sorted(d.items())}
                                                         for w, d in by_process(m1 - m0, owners).items()}}
        if run.arrivals:
            lag = rtb.lags(run)
            xs = [lag[b] for b in sorted(lag)]
            res["session"]["lag_p50_s"] = r3(np.median(xs)) if xs else None
        mon.close()
    finally:
        stack_cmd.down(run_dir)
    res["load_after"] = load()
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Measured {m['date_utc']} UTC on {m['cores']} cores ({m['cpu']}); shipped `tiny-trained` model at "
             f"64x64, one lane. Load average {res.get('stack', {}).get('load_before', '-')} -> "
             f"{res.get('stack', {}).get('load_after', '-')} (shared machine: compare CPU seconds, not wall time).", ""]
    s = res.get("serialisation")
    if s:
        lines += ["| serialisation hop | bytes | msgs / block | encode us | decode us | ms CPU / block |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {h['hop']} | {h['bytes']:,} | {h['per_block']:.1f} | {h['encode_us']:.0f} | "
                  f"{h['decode_us']:.0f} | {h['ms_per_block']:.2f} |" for h in s["hops"]]
        lines += [f"| **total** | | | | | **{s['ms_per_block']:.2f}** |", ""]
    st = res.get("stack")
    if st and "session" in st:
        idle, ses = st["idle"]["cores"], st["session"]["cpu_s_per_block"]
        lines += [f"| process | idle cores (no session, {st['idle']['seconds']:.0f} s) | idle x 0.48 s | "
                  f"CPU s / block, one session ({st['session']['blocks']} blocks) |", "| --- | --- | --- | --- |"]
        for k in ses:
            lines.append(f"| {k} | {idle.get(k, 0):.3f} | {idle.get(k, 0) * BLOCK_S:.3f} | {ses[k]:.3f} |")
        svc = [k for k in ses if "rank" not in k]
        lines.append(f"| **services (all but the lane ranks)** | **{sum(idle.get(k, 0) for k in svc):.3f}** | "
                     f"{sum(idle.get(k, 0) for k in svc) * BLOCK_S:.3f} | **{sum(ses[k] for k in svc):.3f}** |")
        lines.append(f"| lane ranks | {sum(v for k, v in idle.items() if 'rank' in k):.3f} | | "
                     f"{sum(v for k, v in ses.items() if 'rank' in k):.3f} |")
        lines.append(f"| **whole stack** | **{sum(idle.values()):.3f}** | | **{sum(ses.values()):.3f}** |")
        lines.append("")
        calls = st["session"]["redis_calls_per_block"]
        writes = sum(v for k, v in calls.items() if k not in READ_COMMANDS)
        lines.append(f"Redis per block with one session: {sum(calls.values()):.1f} commands ({writes:.1f} not reads), "
                     f"{st['session']['redis_bytes_in_per_block']:,} bytes received; idle: "
                     f"{sum(st['idle']['redis_calls_per_s'].values()):.1f} commands/s. By process per block: "
                     + "; ".join(f"{w} {sum(d.values()):.1f} ({', '.join(f'{c} {n:g}' for c, n in d.items())})"
                                 for w, d in sorted(st["session"]["redis_by_process_per_block"].items())) + ".")
        if st["session"].get("lag_p50_s") is not None:
            lines.append(f"Lag p50 {st['session']['lag_p50_s']:.2f} s over {st['session']['blocks']} / "
                         f"{st['session']['expected_blocks']} blocks.")
        lines.append("")
    lines.append(f"Rerun: `{' '.join(['.venv/bin/python bench/hotpath_bench.py', *res.get('argv', [])])}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bench/hotpath_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--idle-s", type=float, default=20.0, help="seconds of the idle stack (default 20)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of speech of the session (default 20)")
    p.add_argument("--lane-shape", default="auto", help="the lane's shape, or auto as `liveavatar up` (default)")
    p.add_argument("--serialisation-only", action="store_true", help="part 1 only (no stack)")
    p.add_argument("--run-dir", default=None, help="run directory of the stack (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--profile", default=None, help="also py-spy every service during the session, collapsed stacks "
                                                   "into this folder (perturbs the CPU numbers a little)")
    args = p.parse_args(argv)
    res: dict = {"machine": sab.machine(), "argv": argv, "load_start": load()}
    print("part 1: serialisation ...", flush=True)
    res["serialisation"] = serialisation()
    if not args.serialisation_only:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="hotpath-bench-"))
        print(f"parts 2-3: the stack in {run_dir}, idle {args.idle_s:.0f} s, then one session "
              f"of {args.seconds:.0f} s ...", flush=True)
        res["stack"] = run_stack(run_dir, args.idle_s, args.seconds, args.lane_shape,
                                 Path(args.profile) if args.profile else None)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
