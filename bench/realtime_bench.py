"""Real time from the client's side: speech streamed at real-time pace, every video fragment timed.

Usage (from the repository root)::

    .venv/bin/python bench/realtime_bench.py                          # 1 then 2 sessions, 40 s each; ~4 min
    .venv/bin/python bench/realtime_bench.py --sessions 1 --seconds 20 --lane-shape 4+1 --doc none
    .venv/bin/python bench/realtime_bench.py --json /tmp/rt.json --doc docs/realtime.md

For each session count N (``--sessions``, default ``1,2``) the local stack is started as ``liveavatar up``
starts it (``services.cli.stack_cmd.up``: broker, Redis, audio encoder, N lanes, stream packager, session
API; ``--lane-shape auto``, the default, lets ``up`` choose the lanes' shape and decoder threads for this
machine and the choice is recorded). Then N sessions run at once, each driven as a client would:

- ``POST /v1/sessions`` with an example image and ``{"idle": "pause"}`` (no video without speech), then
  wait until the session is ``active``;
- open ``WS /v1/sessions/{id}/media``, then ``WS /v1/sessions/{id}/audio``, and send held-out example speech
  (``examples/*.wav``, 24 kHz pcm16, looped to ``--seconds``) in 100 ms chunks on a drift-free real-time
  schedule;
- record the arrival of every media fragment.

Per session:

- **lag of block k** = arrival of block k's fragment - the moment the chunk holding block k's last audio
  sample (the sample at 0.48 (k + 1) s) was sent. It includes the 0.1 s chunking, the audio encoder,
  the lane (4 denoising steps and the decode), the packager and the WebSocket;
- lag **p50 / p95 / max** over every block whose audio was paced (the last, zero-padded block has no
  completing chunk);
- **growth** = median lag of the last 10 blocks - median lag of the first 10 (a stream that keeps up
  has none; one that falls behind grows by its deficit every block);
- **first fragment** = arrival of block 0's fragment - the first audio byte sent (it includes the 0.48 s of
  audio block 0 needs).

Goals (one session, idle 2-core machine): lag p95 <= 1.5 s, growth <= 0.25 s over 40 s, first fragment
<= 1.5 s. The machine may be shared: the load average before and after each round and the CPU seconds
of the stack's processes are recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import session_api_bench as sab  # noqa: E402 - stack helpers: tenants, CPU accounting, example speech, machine
from _benchlib import write_marked_section  # noqa: E402

GOALS = {"lag_p95_s": 1.5, "growth_s": 0.25, "first_fragment_s": 1.5}
DOC_BEGIN, DOC_END = "<!-- realtime-bench:begin -->", "<!-- realtime-bench:end -->"


def write_doc(path: Path, table: str) -> None:
    write_marked_section(path, DOC_BEGIN, DOC_END, table, heading=None)


# ---------------------------------------------------------------------------------------------
# One session as a client drives it, on the raw WebSocket protocol (docs/session-api.md), so every
# timestamp is taken right where the bytes leave or arrive
# ---------------------------------------------------------------------------------------------

def send_audio(ws_url: str, run: sab.SessionRun, pcm: bytes, rate: int) -> None:
    """Send ``pcm`` (pcm16 mono) in 100 ms chunks on a drift-free real-time schedule, then end the utterance."""
    from websockets.sync.client import connect

    step = int(rate * sab.CHUNK_S) * 2
    try:
        with connect(ws_url, open_timeout=30) as ws:
            ws.send(json.dumps({"format": "pcm16", "sample_rate": rate, "channels": 1}))
            ready = json.loads(ws.recv(timeout=30))
            if ready.get("type") != "ready":
                raise sab.BenchError(f"audio socket: {ready}")
            t0 = time.monotonic()
            run.audio_start = t0
            for k, i in enumerate(range(0, len(pcm), step)):
                chunk = pcm[i:i + step]
                ws.send(chunk)
                run.chunk_sent.append(((i + len(chunk)) / 2 / rate, time.monotonic()))
                delay = t0 + (k + 1) * sab.CHUNK_S - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            ws.send(json.dumps({"type": "end"}))
            while True:
                m = json.loads(ws.recv(timeout=60))
                if m["type"] == "utterance_end":
                    break
                if m["type"] == "error":
                    if m.get("status") == 429:
                        run.refused_chunks += 1
                    else:
                        run.errors.append(f"audio: {m}")
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the round goes on
        run.errors.append(f"audio: {type(exc).__name__}: {exc}")
    finally:
        run.audio_done = time.monotonic()


def read_media(ws_url: str, run: sab.SessionRun, stop: threading.Event) -> None:
    """Record the arrival time of every fragment (its JSON header, then its bytes)."""
    from websockets.sync.client import connect

    try:
        with connect(ws_url, open_timeout=30, max_size=None) as ws:
            while not stop.is_set():
                try:
                    head = json.loads(ws.recv(timeout=0.5))
                except TimeoutError:
                    continue
                if head.get("bytes"):
                    ws.recv(timeout=30)
                now = time.monotonic()
                if head["type"] == "init":
                    run.init_at = run.init_at or now
                elif head["type"] == "fragment":
                    if head["block"] in run.arrivals:
                        run.duplicates += 1
                    else:
                        run.arrivals[head["block"]] = now
                elif head["type"] == "end":
                    return
    except Exception as exc:  # noqa: BLE001
        run.errors.append(f"media: {type(exc).__name__}: {exc}")


def lags(run: sab.SessionRun) -> dict[int, float]:
    """Block -> arrival of its fragment minus the send time of the chunk holding its last audio sample."""
    sent_s = np.array([s for s, _ in run.chunk_sent])
    sent_t = np.array([t for _, t in run.chunk_sent])
    out = {}
    for b, arrived in sorted(run.arrivals.items()):
        i = int(np.searchsorted(sent_s, sab.BLOCK_S * (b + 1) - 1e-9))
        if i < len(sent_t):
            out[b] = arrived - float(sent_t[i])
    return out


def session_result(run: sab.SessionRun) -> dict:
    lag = lags(run)
    xs = [lag[b] for b in sorted(lag)]
    res: dict = {"session": run.sid, "avatar": run.avatar, "setup_s": sab.r3(run.setup_s),
                 "blocks": len(run.arrivals), "paced_blocks": len(xs), "duplicates": run.duplicates,
                 "in_order_no_gaps": sorted(run.arrivals) == list(range(len(run.arrivals))),
                 "refused_audio_chunks": run.refused_chunks, "errors": run.errors[:5]}
    if run.audio_start is not None and 0 in run.arrivals:
        res["first_fragment_s"] = sab.r3(run.arrivals[0] - run.audio_start)
    if xs:
        res["lag_p50_s"], res["lag_p95_s"] = sab.r3(sab.pct(xs, 50)), sab.r3(sab.pct(xs, 95))
        res["lag_max_s"] = sab.r3(max(xs))
        res["lag_s"] = [sab.r3(x) for x in xs]
    if len(xs) >= 20:
        res["growth_s"] = sab.r3(float(np.median(xs[-10:]) - np.median(xs[:10])))
    res["meets_goals"] = all(res.get(k) is not None and res[k] <= v for k, v in GOALS.items())
    return res


def run_round(n: int, seconds: float, lane_shape: str, run_root: Path) -> dict:
    import httpx

    from services.cli import stack_cmd

    run_dir = run_root / f"sessions-{n}"
    res: dict = {"sessions": n, "lanes": n, "load_before": sab.load()}
    t = time.monotonic()
    up = stack_cmd.up(run_dir, lanes=n, api=True, timeout_s=600, lane_shape=lane_shape)
    res["stack_up_s"] = sab.r3(time.monotonic() - t)
    res["lane_plan"] = up.get("lanes")
    try:
        port = stack_cmd.services_info(run_dir)["session-api"]["health_ports"][0]
        key = sab.create_tenant(run_dir, f"realtime-{n}", max_sessions=n)
        groups = sab.stack_pids(run_dir)
        runs: list[sab.SessionRun] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            for i in range(n):
                avatar = sab.AVATARS[i % len(sab.AVATARS)]
                t0 = time.monotonic()
                r = client.post("/v1/sessions", files={"image": (f"{avatar}.jpg",
                                (sab.EXAMPLES / f"{avatar}.jpg").read_bytes(), "image/jpeg")},
                                data={"options": json.dumps({"idle": "pause", "seed": i})})
                if r.status_code != 201:
                    raise sab.BenchError(f"POST /v1/sessions: {r.status_code} {r.text}")
                runs.append(sab.SessionRun(r.json()["id"], avatar, created_at=t0))
            deadline = time.monotonic() + 180
            pending = {run.sid: run for run in runs}
            while pending:
                if time.monotonic() > deadline:
                    raise sab.BenchError(f"sessions never became active: {list(pending)}")
                for sid, run in list(pending.items()):
                    if client.get(f"/v1/sessions/{sid}").json()["state"] == "active":
                        run.setup_s = time.monotonic() - run.created_at
                        del pending[sid]
                time.sleep(0.05)
            stop = threading.Event()
            base = f"ws://127.0.0.1:{port}/v1/sessions"
            readers = [threading.Thread(target=read_media, args=(f"{base}/{run.sid}/media?key={key}", run, stop),
                                        daemon=True) for run in runs]
            for th in readers:
                th.start()
            time.sleep(1.0)                           # media sockets subscribed before the first audio byte
            cpu0, wall0 = sab.cpu_by_component(groups), time.monotonic()
            senders = []
            for run in runs:
                pcm, rate = sab.example_pcm16(run.avatar, seconds)
                senders.append(threading.Thread(target=send_audio, args=(f"{base}/{run.sid}/audio?key={key}",
                                                                             run, pcm, rate), daemon=True))
            for th in senders:
                th.start()
            for th in senders:
                th.join(seconds + 120)
            expected = int(np.ceil(seconds / sab.BLOCK_S - 1e-9))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                newest = max((max(r.arrivals.values(), default=0.0) for r in runs), default=0.0)
                if all(len(r.arrivals) >= expected for r in runs) and time.monotonic() - newest > 2.0:
                    break
                if time.monotonic() - max(newest, max(r.audio_done or 0 for r in runs)) > 20:
                    break
                time.sleep(0.2)
            cpu1, wall = sab.cpu_by_component(groups), time.monotonic() - wall0
            res["cpu_cores_busy"] = sab.r3((sum(cpu1.values()) - sum(cpu0.values())) / wall)
            res["cpu_cores_by_component"] = {k: sab.r3((cpu1[k] - cpu0[k]) / wall) for k in cpu1}
            stop.set()
            for th in readers:
                th.join(10)
            for run in runs:
                client.delete(f"/v1/sessions/{run.sid}")
        res["expected_blocks"] = expected
        res["per_session"] = [session_result(run) for run in runs]
    finally:
        stack_cmd.down(run_dir)
    res["load_after"] = sab.load()
    res["meets_goals"] = all(p["meets_goals"] for p in res["per_session"])
    return res


def markdown(res: dict, argv: list[str]) -> str:
    m = res["machine"]
    cmd = "python bench/realtime_bench.py" + ("" if not argv else " " + " ".join(argv))
    lines = [f"Run: `{cmd}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']}, {m['date_utc']} UTC; "
             f"shipped `tiny-trained` model, {res['seconds']} s of speech per session.", "",
             "| sessions | lane shape (decoder threads) | session | lag p50 / p95 / max | growth (last 10 - first 10) | "
             "first fragment | blocks | goals met | load avg before / after | cores busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rnd in res["rounds"]:
        plan = rnd.get("lane_plan") or {}
        shape = f"{plan.get('shape', '?')} ({plan.get('decode_threads') or 1})"
        for i, p in enumerate(rnd["per_session"]):
            def s(k, p=p):
                return "n/a" if p.get(k) is None else f"{p[k]:.2f} s"
            lines.append(f"| {rnd['sessions']} | {shape} | {i + 1} ({p['avatar']}) | {s('lag_p50_s')} / "
                         f"{s('lag_p95_s')} / {s('lag_max_s')} | {s('growth_s')} | {s('first_fragment_s')} | "
                         f"{p['blocks']} | {'yes' if p['meets_goals'] else 'no'} | {rnd['load_before']} / "
                         f"{rnd['load_after']} | {rnd.get('cpu_cores_busy')} |")
    lines += ["", f"Goals (one session, idle 2-core machine): lag p95 <= {GOALS['lag_p95_s']} s, growth <= "
              f"{GOALS['growth_s']} s over 40 s, first fragment <= {GOALS['first_fragment_s']} s."]
    for rnd in res["rounds"]:
        plan = rnd.get("lane_plan") or {}
        if plan.get("reason"):
            lines.append(f"With {rnd['sessions']} lane(s) `liveavatar up` chose: {plan['reason']}.")
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    import tempfile

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", default="1,2", help="comma-separated concurrent session counts (default 1,2)")
    p.add_argument("--seconds", type=float, default=40.0, help="seconds of speech per session (default 40)")
    p.add_argument("--lane-shape", default="auto", help="lanes' shape, or auto: as `liveavatar up` (default auto)")
    p.add_argument("--run-root", default=None, help="run directories of the stacks (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--doc", default="docs/realtime.md", help="markdown file whose marked section to fill; 'none' skips")
    args = p.parse_args(argv)
    root = Path(args.run_root) if args.run_root else Path(tempfile.mkdtemp(prefix="liveavatar-realtime-"))
    res: dict = {"machine": sab.machine(), "seconds": args.seconds, "rounds": []}
    for n in (int(x) for x in args.sessions.split(",")):
        rnd = run_round(n, args.seconds, args.lane_shape, root)
        print(json.dumps({k: v for k, v in rnd.items() if k != "per_session"}), flush=True)
        for ps in rnd["per_session"]:
            print(json.dumps({k: v for k, v in ps.items() if k != "lag_s"}), flush=True)
        res["rounds"].append(rnd)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    table = markdown(res, argv)
    print(table)
    if args.doc != "none":
        write_doc(ROOT / args.doc if not Path(args.doc).is_absolute() else Path(args.doc), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
