"""The local stack's service supervisor: runs every service as a child process and restarts what exits.

It plays the part Kubernetes plays in a cluster (Deployments restart a pod; LeaderWorkerSet recreates a
lane group; here ``services.lane.group`` does the latter). ``liveavatar up`` starts it detached;
``liveavatar down`` sends it SIGTERM, and it stops every child gracefully (SIGTERM, then SIGKILL).

It writes ``services.json`` in the run directory: for each service its pid(s), health port(s) and log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from infra.local.stack import free_port, free_port_block, stop_pid
from pipeline_stages.tpp.shape import parse_shape
from services.common.logging import configure_logging, get_logger
from services.common.worker import GracefulStop

log = get_logger("supervisor")
SERVICES_FILE = "services.json"


@dataclass
class ServiceDef:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_ports: list[int]
    log: str
    pid: int = 0
    restarts: int = 0
    rank_pids_file: str = ""           # lane groups: where the group writes its rank pids
    health_path: str = "/readyz"
    extra: dict = field(default_factory=dict)


def plan(run_dir: Path, lanes: int, shape: str, extra_env: dict[str, str], api: bool,
         lane_env: dict[str, str] | None = None) -> list[ServiceDef]:
    """The services of one local stack, with their ports chosen now; ``shape`` is each lane's shape (``4+1``,
    ``2``, ...) and ``lane_env`` extra environment of the lanes only (e.g. their torch threads)."""
    denoisers, own_decoder = parse_shape(shape)
    ranks = denoisers + (1 if own_decoder else 0)
    py = sys.executable
    out = []
    port = free_port()
    out.append(ServiceDef("audio-encoder", [py, "-m", "services.audio_encoder"],
                          {**extra_env, "LIVEAVATAR_HEALTH_PORT": str(port)}, [port], str(run_dir / "audio-encoder.log")))
    port = free_port()
    out.append(ServiceDef("stream-packager", [py, "-m", "services.stream_packager"],
                          {**extra_env, "LIVEAVATAR_HEALTH_PORT": str(port)}, [port],
                          str(run_dir / "stream-packager.log")))
    port = free_port()
    out.append(ServiceDef("webhooks", [py, "-m", "services.webhooks"],
                          {**extra_env, "LIVEAVATAR_HEALTH_PORT": str(port)}, [port], str(run_dir / "webhooks.log")))
    for k in range(lanes):
        base = free_port_block(ranks)
        lane_id = f"lane-{k}"
        out.append(ServiceDef(lane_id, [py, "-m", "services.lane.group", "--lane-id", lane_id, "--partition", str(k),
                                        "--run-dir", str(run_dir), "--shape", shape],
                              {**extra_env, **(lane_env or {}), "LIVEAVATAR_HEALTH_PORT": str(base)},
                              list(range(base, base + ranks)), str(run_dir / f"{lane_id}.group.log"),
                              rank_pids_file=str(run_dir / f"{lane_id}.pids")))
    if api:
        port = int(extra_env.get("LIVEAVATAR_API_PORT", "0")) or free_port()
        out.append(ServiceDef("session-api", [py, "-m", "services.session_api"],
                              {**extra_env, "LIVEAVATAR_API_PORT": str(port)}, [port],
                              str(run_dir / "session-api.log")))
    return out


def _spawn(svc: ServiceDef) -> None:
    with open(svc.log, "ab") as out:
        proc = subprocess.Popen(svc.argv, env={**os.environ, **svc.env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    svc.pid = proc.pid
    svc.extra["proc"] = proc


def _write(run_dir: Path, services: list[ServiceDef]) -> None:
    data = {s.name: {f.name: getattr(s, f.name) for f in fields(s) if f.name != "extra"} for s in services}
    tmp = run_dir / (SERVICES_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(run_dir / SERVICES_FILE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.cli.supervisor")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--lanes", type=int, default=1)
    p.add_argument("--lane-shape", default="4+1", help="each lane's shape, D+1 or D (docs/tpp.md)")
    p.add_argument("--lane-threads", type=int, default=None, help="torch threads of each lane rank")
    p.add_argument("--lane-decode-threads", type=int, default=None, help="torch threads of each lane's decoder")
    p.add_argument("--api", action="store_true")
    args = p.parse_args(argv)
    configure_logging(json_logs=True)
    run_dir = Path(args.run_dir)
    extra = {k: v for k, v in os.environ.items() if k.startswith("LIVEAVATAR_")}
    lane_env = {}
    if args.lane_threads:
        lane_env["LIVEAVATAR_THREADS"] = str(args.lane_threads)
    if args.lane_decode_threads:
        lane_env["LIVEAVATAR_DECODE_THREADS"] = str(args.lane_decode_threads)
    services = plan(run_dir, args.lanes, args.lane_shape, extra, args.api, lane_env)
    stop = GracefulStop().install()      # SIGTERM / SIGINT: stop the children gracefully
    for svc in services:
        _spawn(svc)
    _write(run_dir, services)
    log.info("supervisor started", services=[s.name for s in services])
    while not stop.stopping:
        for svc in services:
            proc = svc.extra["proc"]
            if proc.poll() is not None and not stop.stopping:
                log.warning("service exited: restarting", service=svc.name, code=proc.returncode)
                time.sleep(0.5)
                _spawn(svc)
                svc.restarts += 1
                _write(run_dir, services)
        time.sleep(0.2)
    for svc in services:                  # graceful: SIGTERM everyone, then wait, then SIGKILL
        if svc.extra["proc"].poll() is None:
            svc.extra["proc"].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    for svc in services:
        proc = svc.extra["proc"]
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_pid(proc.pid, timeout_s=2)
            proc.wait()
    (run_dir / SERVICES_FILE).unlink(missing_ok=True)
    log.info("supervisor stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
