"""``liveavatar up | status | down``: the whole local stack as local processes.

``up`` starts the broker and Redis (``infra/local``), creates the topics, then starts the service
supervisor (audio-encoder, stream-packager, the webhooks dispatcher, ``--lanes N`` lanes (1 to 5 processes each, by ``--lane-shape``), and the session
API unless ``api=False``) and returns once every service answers ``/readyz``. Logs and pid files live in
one run directory. ``status`` lists every service with its health (the CLI exits non-zero if any is
down); ``down`` stops everything ``up`` started and leaves no process behind.

The session API gets port 8000, or the next free one (:func:`stable_port`), unless
``LIVEAVATAR_API_PORT`` is set. Redis persists in the run directory, so tenants survive ``down`` /
``up``; the broker does not, so ``up`` first ends the sessions a previous run left live
(:func:`settle_previous_run`).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra import topics
from infra.local.stack import LOOPBACK, LocalStack, StackError, free_port, pid_alive, stop_pid
from services.cli.supervisor import SERVICES_FILE
from services.common.kafka import ensure_topics

SUPERVISOR_PID = "supervisor.pid"


def _probe(port: int, path: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, http.client.HTTPException):   # not (yet) our server
        return False


def services_info(run_dir: Path) -> dict:
    f = run_dir / SERVICES_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def service_status(run_dir: Path) -> dict[str, dict]:
    out = {}
    for name, svc in services_info(run_dir).items():
        paths = "/healthz" if name == "session-api" else "/readyz"
        ready = [_probe(p, paths) for p in svc["health_ports"]]
        out[name] = {"pid": svc["pid"], "alive": pid_alive(svc["pid"]), "ready": all(ready),
                     "ports": svc["health_ports"], "restarts": svc["restarts"], "log": svc["log"]}
    return out


def up(run_dir: Path, lanes: int = 1, timeout_s: float = 300.0, api: bool = True,
       env: dict[str, str] | None = None, lane_shape: str = "4+1", lane_decode_threads: int | None = None) -> dict:
    """Start everything; returns {"infra": StackInfo, "services": status, "lanes": plan}. Idempotent if already up.

    ``lane_shape`` is each lane's shape (``4+1``, ``2``, ...: docs/tpp.md), or ``auto``: the shape and decoder
    threads predicted to keep up on this machine (:func:`services.cli.lane_plan.plan_lanes`);
    ``lane_decode_threads`` overrides the decoder's threads. ``plan`` says what was chosen.
    """
    if lane_shape != "auto":
        from pipeline_stages.tpp.shape import parse_shape

        parse_shape(lane_shape)                # a bad shape fails before anything starts
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(run_dir)
    info = stack.up()
    ensure_topics(info.kafka_bootstrap, topics.all_topics())
    pid_file = run_dir / SUPERVISOR_PID
    if pid_file.exists() and pid_alive(int(pid_file.read_text())):
        return {"infra": info, "services": service_status(run_dir), "lanes": None}
    lane_plan = _lane_plan(lanes, lane_shape, lane_decode_threads)    # measures: only when starting lanes
    child_env = {**os.environ, **(env or {}), "LIVEAVATAR_KAFKA_BOOTSTRAP": info.kafka_bootstrap,
                 "LIVEAVATAR_REDIS_URL": info.redis_url, "LIVEAVATAR_JSON_LOGS": "true",
                 "LIVEAVATAR_RUN_DIR": str(run_dir)}
    settle_previous_run(info.redis_url, child_env.get("LIVEAVATAR_REDIS_NAMESPACE", "la"))
    if api and not child_env.get("LIVEAVATAR_API_PORT"):
        child_env["LIVEAVATAR_API_PORT"] = str(stable_port(API_PORT))
    argv = [sys.executable, "-m", "services.cli.supervisor", "--run-dir", str(run_dir), "--lanes", str(lanes),
            "--lane-shape", lane_plan["shape"]]
    if lane_plan["decode_threads"]:
        argv += ["--lane-decode-threads", str(lane_plan["decode_threads"])]
    if api:
        argv.append("--api")
    with open(run_dir / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(argv, env=child_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the service supervisor exited ({proc.returncode}); see {run_dir / 'supervisor.log'}")
        status = service_status(run_dir)
        if status and all(s["ready"] for s in status.values()):
            return {"infra": info, "services": status, "lanes": lane_plan}
        time.sleep(0.5)
    down(run_dir)
    raise StackError(f"services not ready within {timeout_s:.0f} s; logs in {run_dir}")


API_PORT = 8000


def stable_port(preferred: int, tries: int = 100) -> int:
    """``preferred`` if it is free on loopback, else the next free port above it (a stable address across
    ``down`` / ``up``; a random free port when none of ``tries`` is free)."""
    for port in range(preferred, preferred + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((LOOPBACK, port)) == 0:
                continue            # something answers there (a listener that allows address reuse, too)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    return free_port()


def api_address(run_dir: Path) -> str:
    """``http://127.0.0.1:PORT`` of the running session API ("" when there is none)."""
    svc = services_info(run_dir.resolve()).get("session-api")
    return f"http://{LOOPBACK}:{svc['health_ports'][0]}" if svc else ""


#: Session states that need a live pipeline; after a restart of the stack nothing serves them any more.
_LIVE_STATES = ("created", "preparing", "waiting", "active", "ending")


def settle_previous_run(redis_url: str, namespace: str = "la") -> list[str]:
    """State a previous run left in Redis that no process serves any more: its live sessions end (their
    audio and media were on the broker, which keeps topics in memory) and its lane records go (the new
    lanes register afresh). Tenants, keys, usage and ended sessions stay. Returns the sessions ended."""
    from services.common.redis_state import StateStore

    store = StateStore.from_url(redis_url, namespace=namespace)
    ended = []
    for key in store.r.scan_iter(match=store.k("session", "*"), count=500):
        parts = key.decode().split(":")
        if len(parts) != 3 or store.r.type(key) != b"hash":
            continue
        rec = store.get_session(parts[2])
        if rec is not None and rec.state in _LIVE_STATES:
            store.update_session(rec.session_id, state="ended", error="the local stack was stopped")
            ended.append(rec.session_id)
    stale = [k for pat in (store.k("lane", "*"), store.k("lanesession", "*")) for k in store.r.scan_iter(match=pat)]
    if stale:
        store.r.delete(*stale)
    store.r.delete(store.k("lanes"))
    return ended


def _lane_plan(lanes: int, shape: str, decode_threads: int | None) -> dict:
    """The lanes' shape and decoder threads: as given (:func:`up` has checked it), or planned for this machine
    (``auto``)."""
    from services.cli.lane_plan import busy_cores, measure_decode, plan_lanes

    if shape == "auto":   # the decode, most of a lane's CPU cost, measured on this machine for the lanes' model
        busy = busy_cores()                                  # before the measurement keeps a core busy itself
        costs = measure_decode(os.environ.get("LIVEAVATAR_MODEL_CONFIG", "tiny-trained"), busy=busy)
        plan = plan_lanes(lanes=lanes, costs=costs, busy=busy)
        return {"shape": plan.shape, "decode_threads": decode_threads or plan.decode_threads,
                "auto": True, "reason": plan.describe()}
    return {"shape": shape, "decode_threads": decode_threads, "auto": False,
            "reason": f"lane shape {shape} as asked"}


def down(run_dir: Path, timeout_s: float = 60.0) -> list[str]:
    run_dir = run_dir.resolve()
    stopped = []
    pid_file = run_dir / SUPERVISOR_PID
    leftovers = _all_pids(run_dir)
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                stop_pid(pid, 2)
            stopped.append("services")
        pid_file.unlink(missing_ok=True)
    for pid in leftovers:                 # anything a crash left behind
        if pid_alive(pid):
            stop_pid(pid, 5)
    stopped += LocalStack(run_dir).down()
    return stopped


def _all_pids(run_dir: Path) -> list[int]:
    pids = []
    for svc in services_info(run_dir).values():
        pids.append(svc["pid"])
        if svc.get("rank_pids_file") and Path(svc["rank_pids_file"]).exists():
            pids += [int(x) for x in Path(svc["rank_pids_file"]).read_text().split()]
    return pids


def status(run_dir: Path) -> list[dict]:
    """One row per part of the stack (broker, Redis, then every service): name, ready, address, detail.

    Empty when nothing was ever started in ``run_dir``; a ``services`` row that is not ready when the
    infrastructure runs without a supervisor.
    """
    run_dir = run_dir.resolve()
    infra = LocalStack(run_dir).status()
    if not infra:
        return []
    rows = [{"name": name, "ready": s["ready"], "address": s["address"], "pid": s["pid"]} for name, s in infra.items()]
    svcs = service_status(run_dir)
    if not svcs:
        rows.append({"name": "services", "ready": False, "address": "", "detail": "no supervisor"})
    for name, s in svcs.items():
        scheme = "http://" if name == "session-api" else ""
        rows.append({"name": name, "ready": s["ready"], "address": ", ".join(f"{scheme}{LOOPBACK}:{p}" for p in s["ports"]),
                     "pid": s["pid"], "restarts": s["restarts"], "log": s["log"]})
    return rows
