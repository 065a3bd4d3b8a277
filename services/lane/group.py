"""A local lane group: start every rank of one lane, and recreate the whole group when any rank exits.

This is what LeaderWorkerSet's ``RecreateGroupOnPodRestart`` does in a cluster: the ranks of a lane
share one ``torch.distributed`` group, so a lane is restarted as a unit. Each generation gets a fresh
``file://`` rendezvous in the run directory (no listening store socket).

    python -m services.lane.group --lane-id lane-0 --partition 0 --run-dir .run [--shape 4+1]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.local.stack import stop_pid
from pipeline_stages.tpp.shape import parse_shape
from services.common.logging import configure_logging, get_logger
from services.common.worker import GracefulStop

log = get_logger("lane-group")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.lane.group")
    p.add_argument("--lane-id", required=True)
    p.add_argument("--partition", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--shape", default="4+1", help="the lane's shape, D+1 or D (docs/tpp.md)")
    p.add_argument("--restart-backoff-s", type=float, default=1.0)
    args = p.parse_args(argv)
    denoisers, own_decoder = parse_shape(args.shape)
    world_size = denoisers + (1 if own_decoder else 0)
    configure_logging(json_logs=True, level=os.environ.get("LIVEAVATAR_LOG_LEVEL", "INFO"))
    run_dir = Path(args.run_dir)
    stop = GracefulStop().install()      # SIGTERM / SIGINT: stop the children gracefully
    parent = os.getppid()                # a group whose supervisor died stops too (never lingers)
    generation = 0
    while not stop.stopping:
        generation += 1
        rdv = run_dir / f"{args.lane_id}.rdv.{generation}"
        rdv.unlink(missing_ok=True)
        procs = []
        for rank in range(world_size):
            env = dict(os.environ, LIVEAVATAR_DIST_RANK=str(rank), LIVEAVATAR_DIST_INIT_METHOD=f"file://{rdv}",
                       LIVEAVATAR_LANE_ID=args.lane_id, LIVEAVATAR_LANE_PARTITION=str(args.partition),
                       LIVEAVATAR_LANE_SHAPE=args.shape)
            log_file = open(run_dir / f"{args.lane_id}.rank{rank}.log", "ab")
            procs.append(subprocess.Popen([sys.executable, "-m", "services.lane"], env=env, stdout=log_file,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        (run_dir / f"{args.lane_id}.pids").write_text(" ".join(str(pr.pid) for pr in procs))
        log.info("lane group started", lane=args.lane_id, generation=generation, pids=[pr.pid for pr in procs])
        while not stop.stopping and all(pr.poll() is None for pr in procs):
            if os.getppid() != parent:
                stop.event.set()
            time.sleep(0.2)
        if stop.stopping:      # graceful: the head drains and sends SHUTDOWN through the lane
            procs[0].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while any(pr.poll() is None for pr in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
        dead = [(r, pr.returncode) for r, pr in enumerate(procs) if pr.poll() is not None]
        for pr in procs:
            if pr.poll() is None:
                stop_pid(pr.pid, timeout_s=5)
            pr.wait()
        rdv.unlink(missing_ok=True)
        if not stop.stopping:
            log.warning("lane rank exited: recreating the group", lane=args.lane_id, exited=dead,
                        generation=generation)
            time.sleep(args.restart_backoff_s)
    log.info("lane group stopped", lane=args.lane_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
