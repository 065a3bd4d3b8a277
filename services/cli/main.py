"""The ``liveavatar`` command line.

Subcommands are registered in :data:`COMMANDS`; each lives in its own module so that importing the
CLI stays cheap (torch is only imported by the commands that need it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infra.local.stack import LocalStack, StackError, default_run_dir
from services.common.logging import configure_logging


def _cmd_infra(args: argparse.Namespace) -> int:
    stack = LocalStack(args.run_dir or default_run_dir())
    if args.action == "up":
        info = stack.up()
        print(f"broker  ready  kafka://{info.kafka_bootstrap}")
        print(f"redis   ready  {info.redis_url}")
        print(f"run dir {info.run_dir}")
        return 0
    if args.action == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    status = stack.status()
    if args.json:
        print(json.dumps(status, indent=2))
    elif not status:
        print(f"no local stack recorded in {stack.run_dir}")
    else:
        for name, s in status.items():
            state = "ready" if s["ready"] else ("alive, not ready" if s["alive"] else "down")
            print(f"{name:7s} {state:16s} {s['address']}  pid {s['pid']}")
    return 0 if status and all(s["ready"] for s in status.values()) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from services.cli.demo import run_demo

    return run_demo(args)


def _cmd_up(args: argparse.Namespace) -> int:
    from services.cli import stack_cmd

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    res = stack_cmd.up(run_dir, lanes=args.lanes, timeout_s=args.timeout)
    info = res["infra"]
    print(f"broker          kafka://{info.kafka_bootstrap}")
    print(f"redis           {info.redis_url}")
    for name, s in res["services"].items():
        if name == "session-api":
            print(f"session API     http://127.0.0.1:{s['ports'][0]}")
        else:
            print(f"{name:15s} ready (health on {', '.join(map(str, s['ports']))})")
    if "session-api" not in res["services"]:
        print("session API     not built yet (issue 6)")
    print(f"run dir         {info.run_dir}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from services.cli import stack_cmd

    return stack_cmd.print_status(Path(args.run_dir) if args.run_dir else default_run_dir())


def _cmd_down(args: argparse.Namespace) -> int:
    from services.cli import stack_cmd

    stopped = stack_cmd.down(Path(args.run_dir) if args.run_dir else default_run_dir())
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_tenants(args: argparse.Namespace) -> int:
    from infra.local.stack import LocalStack
    from services.common.redis_state import StateStore
    from services.session_api.tenants import create_tenant

    url = args.redis_url
    if url is None:
        info = LocalStack(args.run_dir or default_run_dir()).info()
        if info is None:
            print("error: no local stack is running; start one with `liveavatar up` or pass --redis-url", file=sys.stderr)
            return 2
        url = info.redis_url
    try:
        tenant, key = create_tenant(StateStore.from_url(url), args.name, args.max_sessions, args.minutes_per_day)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tenant {tenant.tenant_id} created (max {tenant.max_sessions} sessions, "
          f"{tenant.minutes_per_day:g} min/day); its API key follows, shown once", file=sys.stderr)
    print(key)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from services.cli import generate

    return generate.run(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from services.cli import inspect_cmd

    return inspect_cmd.run(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from services.cli import train_cmd

    return train_cmd.run(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from services.cli import eval_cmd

    return eval_cmd.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveavatar", description="LiveAvatar: real-time streaming avatar video")
    parser.add_argument("--log-level", default="WARNING", help="log level for the CLI (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infra", help="start, stop or inspect the embedded broker and Redis")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--run-dir", default=None, help="run directory (default $LIVEAVATAR_RUN_DIR or ./.run)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=_cmd_infra)

    p = sub.add_parser("demo", help="the end-to-end demo on ../shared/examples (what `make demo` runs)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--examples", default=None, help="folder of example images and WAVs")
    p.add_argument("--out-dir", default="out", help="where the demo writes its outputs")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("up", help="start the whole local stack (broker, Redis, services, lanes) in the background")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--lanes", type=int, default=1, help="number of lanes (5 processes each)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("status", help="health of every service of the local stack (exit 1 if any is down)")
    p.add_argument("--run-dir", default=None)
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("down", help="stop everything `up` started")
    p.add_argument("--run-dir", default=None)
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("tenants", help="manage tenants of the session API")
    tsub = p.add_subparsers(dest="tenants_command", required=True)
    t = tsub.add_parser("create", help="create a tenant; prints its new API key alone on stdout")
    t.add_argument("name")
    t.add_argument("--max-sessions", type=int, default=4)
    t.add_argument("--minutes-per-day", type=float, default=600.0)
    t.add_argument("--run-dir", default=None)
    t.add_argument("--redis-url", default=None, help="default: the local stack's Redis")
    t.set_defaults(func=_cmd_tenants)

    from services.cli import generate

    p = sub.add_parser("generate", help="image + audio -> MP4 (single process, or a TPP lane with --tpp)")
    generate.add_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("inspect", help="parameter count, keys and FLOPs of a config (meta device)")
    from services.cli import inspect_cmd

    inspect_cmd.add_arguments(p)
    p.set_defaults(func=_cmd_inspect)

    from services.cli import eval_cmd, train_cmd

    p = sub.add_parser("train", help="train the tiny checkpoint from scratch (synthetic data, VAE, teacher, DMD)")
    train_cmd.add_arguments(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="quality report of a video: lip sync, identity, motion, frame quality")
    eval_cmd.add_arguments(p)
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(json_logs=False, level=args.log_level)
    try:
        return int(args.func(args) or 0)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
