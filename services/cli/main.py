"""The ``liveavatar`` command line.

Every subcommand is registered in :func:`build_parser`; each lives in its own module so that importing
the CLI stays cheap (torch is only imported by the commands that need it).

The stack verbs share one style: ``up``, ``status``, ``down``, ``infra up|status|down`` and
``tenants create|list|revoke`` all take ``--run-dir`` and ``--json`` from the same parent parsers, print one row
per part (``NAME  STATE  ADDRESS``) or one JSON object, and exit 0 when all is well, 1 when something
is down and 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infra.local.stack import LocalStack, StackError, default_run_dir
from services.common.logging import configure_logging

DISTRIBUTION = "liveavatar"


def package_version() -> str:
    """The installed distribution's version; the ``pyproject.toml`` next to the code when not installed."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


# ---------------------------------------------------------------------------------------------
# Shared flags and output
# ---------------------------------------------------------------------------------------------

def _run_dir_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help="run directory of the local stack: addresses, pid files and logs "
                        "(default $LIVEAVATAR_RUN_DIR, else ./.run)")
    return p


def _json_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return p


def _run_dir(args: argparse.Namespace) -> Path:
    return (args.run_dir or default_run_dir()).resolve()


def _print_rows(rows: list[dict]) -> None:
    """``NAME  STATE  ADDRESS [detail]``, one line per part of the stack."""
    for r in rows:
        detail = f"  restarts {r['restarts']}" if r.get("restarts") else ""
        detail += f"  ({r['detail']})" if r.get("detail") else ""
        print(f"{r['name']:16s} {'ready' if r['ready'] else 'DOWN':6s} {r['address']}{detail}")


def _report(args: argparse.Namespace, run_dir: Path, rows: list[dict], **extra) -> int:
    """Print the rows (or JSON); exit code 0 if every part is ready, else 1."""
    ok = bool(rows) and all(r["ready"] for r in rows)
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "ready": ok, "parts": rows, **extra}, indent=2))
    elif not rows:
        print(f"nothing running in {run_dir}")
    else:
        _print_rows(rows)
    return 0 if ok else 1


def _infra_rows(stack: LocalStack) -> list[dict]:
    return [{"name": name, "ready": s["ready"], "address": s["address"], "pid": s["pid"]}
            for name, s in stack.status().items()]


def _print_stopped(args: argparse.Namespace, run_dir: Path, stopped: list[str]) -> int:
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "stopped": stopped}, indent=2))
    else:
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def _cmd_infra(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    stack = LocalStack(run_dir)
    if args.infra_command == "up":
        stack.up()
        return _report(args, run_dir, _infra_rows(stack))
    if args.infra_command == "down":
        return _print_stopped(args, run_dir, stack.down())
    return _report(args, run_dir, _infra_rows(stack))


def _cmd_up(args: argparse.Namespace) -> int:
    from services.cli import stack_cmd

    run_dir = _run_dir(args)
    res = stack_cmd.up(run_dir, lanes=args.lanes, timeout_s=args.timeout, api=not args.no_api,
                       lane_shape=args.lane_shape, lane_decode_threads=args.lane_decode_threads)
    if res.get("lanes"):
        print(f"lanes: {res['lanes']['reason']}", file=sys.stderr)
    if not args.no_api:
        address = stack_cmd.api_address(run_dir)
        taken = "" if address.endswith(f":{stack_cmd.API_PORT}") else f" (port {stack_cmd.API_PORT} was taken)"
        print(f"session API: {address}{taken}", file=sys.stderr)
    return _report(args, run_dir, stack_cmd.status(run_dir))


def _cmd_status(args: argparse.Namespace) -> int:
    from services.cli import stack_cmd

    run_dir = _run_dir(args)
    return _report(args, run_dir, stack_cmd.status(run_dir))


def _cmd_down(args: argparse.Namespace) -> int:
    from services.cli import stack_cmd

    run_dir = _run_dir(args)
    return _print_stopped(args, run_dir, stack_cmd.down(run_dir))


def _cmd_tenants_create(args: argparse.Namespace) -> int:
    from services.common.redis_state import StateStore
    from services.session_api.tenants import check_tenant_name, create_tenant

    try:
        check_tenant_name(args.name)          # bad names fail before any connection is made
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = args.redis_url
    if url is None:
        info = LocalStack(_run_dir(args)).info()
        if info is None:
            print(f"error: no local stack is running in {_run_dir(args)}; start one with `liveavatar up` "
                  "or pass --redis-url", file=sys.stderr)
            return 2
        url = info.redis_url
    try:
        tenant, key = create_tenant(StateStore.from_url(url), args.name, args.max_sessions, args.minutes_per_day)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"tenant_id": tenant.tenant_id, "max_sessions": tenant.max_sessions,
                          "minutes_per_day": tenant.minutes_per_day, "api_key": key}, indent=2))
        return 0
    print(f"tenant {tenant.tenant_id} created (max {tenant.max_sessions} sessions, "
          f"{tenant.minutes_per_day:g} min/day); its API key follows, shown once", file=sys.stderr)
    print(key)
    return 0


def _lazy(module: str, func: str = "run"):
    """A command handler that imports ``services.cli.<module>`` only when it runs."""
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"services.cli.{module}"), func)(args)
    return handler


def _lane_shape(text: str) -> str:
    if text == "auto":
        return text
    from pipeline_stages.tpp.shape import LaneShape

    try:
        return LaneShape.parse(text, steps=4).name     # the method's 4 steps; each lane checks its model's own
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

EXAMPLE_IMAGE = "examples/faces/face_812.png"
EXAMPLE_AUDIO = "examples/cyclops_baker.wav"
EXAMPLE_OUT = "out/face_812-speaks-cyclops_baker.mp4"


def _epilog(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {ln}" for ln in lines)


def build_parser() -> argparse.ArgumentParser:
    run_dir, as_json = _run_dir_parent(), _json_parent()
    stack_flags = [run_dir, as_json]
    fmt = argparse.RawDescriptionHelpFormatter

    parser = argparse.ArgumentParser(
        prog="liveavatar", formatter_class=fmt,
        description="LiveAvatar: real-time streaming audio-driven avatar video.",
        epilog=_epilog("make demo                     # or: liveavatar demo",
                       f"liveavatar generate --image {EXAMPLE_IMAGE} --audio {EXAMPLE_AUDIO} --out {EXAMPLE_OUT}",
                       "liveavatar up && liveavatar status && liveavatar down"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")
    parser.add_argument("--log-level", default="WARNING", metavar="LEVEL",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
                        help="log level of the CLI: DEBUG, INFO, WARNING or ERROR (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # the end-to-end demo
    p = sub.add_parser("demo", formatter_class=fmt,
                       help="the end-to-end demo on the bundled examples (what `make demo` runs)",
                       description="Synthetic faces from examples/faces/ speak the example speech: single\n"
                                   "process, a TPP lane and the whole local stack. Writes\n"
                                   "out/face_<id>-speaks-<speech>.mp4, their quality reports and a contact sheet.",
                       epilog=_epilog("liveavatar demo --out-dir out"))
    p.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help="run directory for the demo's local stack (default: a temporary directory, removed after)")
    p.add_argument("--examples", default=None, metavar="DIR",
                   help="examples folder (default: the repository's examples/, or $LIVEAVATAR_EXAMPLES_DIR)")
    p.add_argument("--out-dir", default="out", metavar="DIR", help="where the demo writes its outputs (default out)")
    p.set_defaults(func=_lazy("demo", "run_demo"))

    # the local stack
    p = sub.add_parser("up", parents=stack_flags, formatter_class=fmt,
                       help="start the whole local stack (broker, Redis, services, lanes) in the background",
                       epilog=_epilog("liveavatar up --lanes 2", "liveavatar status", "liveavatar down"))
    p.add_argument("--lanes", type=_positive_int, default=1, metavar="N",
                   help="number of lanes, one session each (default 1)")
    p.add_argument("--lane-shape", type=_lane_shape, default="auto", metavar="SHAPE",
                   help="each lane's shape: D+1 (D denoise processes and the decoder in its own) or D (the decoder "
                        "in the last denoise process), D in 1, 2, 4; 'auto' (default) picks the shape and decoder "
                        "threads predicted to keep up on this machine and prints the choice")
    p.add_argument("--lane-decode-threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads of each lane's decoder (default: auto's choice, else 1)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait until every service is ready (default 300)")
    p.add_argument("--no-api", action="store_true", help="do not start the session API")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("status", parents=stack_flags, formatter_class=fmt,
                       help="health of every part of the local stack (exit 1 if any is down)",
                       epilog=_epilog("liveavatar status --json"))
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("down", parents=stack_flags, formatter_class=fmt,
                       help="stop everything `up` started", epilog=_epilog("liveavatar down"))
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("infra", formatter_class=fmt, help="start, stop or inspect only the embedded broker and Redis",
                       epilog=_epilog("liveavatar infra up", "liveavatar infra status --json", "liveavatar infra down"))
    isub = p.add_subparsers(dest="infra_command", required=True, metavar="ACTION")
    for action, text in (("up", "start the broker and Redis"), ("status", "health of the broker and Redis "
                         "(exit 1 if either is down)"), ("down", "stop the broker and Redis")):
        a = isub.add_parser(action, parents=stack_flags, formatter_class=fmt, help=text,
                            epilog=_epilog(f"liveavatar infra {action}"))
        a.set_defaults(func=_cmd_infra)

    p = sub.add_parser("tenants", formatter_class=fmt, help="manage tenants of the session API",
                       epilog=_epilog("liveavatar tenants create acme --max-sessions 2"))
    tsub = p.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", parents=stack_flags, formatter_class=fmt,
                        help="create a tenant; prints its new API key alone on stdout",
                        description="Create a tenant named NAME (its id is NAME, unchanged; a name can be used\n"
                                    "once) and print its API key alone on stdout. The key is shown only this once.",
                        epilog=_epilog("KEY=$(liveavatar tenants create acme --max-sessions 2)"))
    t.add_argument("name", metavar="NAME", help="tenant name: 1-64 ASCII letters, digits, '-', '_' or '.', "
                   "starting with a letter or digit")
    t.add_argument("--max-sessions", type=_positive_int, default=4, metavar="N",
                   help="sessions the tenant may run at once (default 4)")
    t.add_argument("--minutes-per-day", type=float, default=600.0, metavar="MIN",
                   help="minutes of video the tenant may generate per day (default 600)")
    t.add_argument("--redis-url", default=None, metavar="URL", help="Redis to write to (default: the local stack's)")
    t.set_defaults(func=_cmd_tenants_create)
    from services.cli import tenants_cmd, webhook_cmd

    tenants_cmd.add_parsers(tsub, stack_flags, fmt, _epilog)
    webhook_cmd.add_parser(tsub, stack_flags, fmt, _epilog)

    # model commands
    from services.cli import eval_cmd, generate, inspect_cmd, train_cmd

    p = sub.add_parser("generate", formatter_class=fmt,
                       help="image + audio -> MP4 (single process, or a TPP lane with --tpp)",
                       epilog=_epilog(f"liveavatar generate --image {EXAMPLE_IMAGE} --audio {EXAMPLE_AUDIO} "
                                      f"--out {EXAMPLE_OUT}"))
    generate.add_arguments(p)
    p.set_defaults(func=_lazy("generate"))

    p = sub.add_parser("inspect", formatter_class=fmt,
                       help="parameter count, keys and FLOPs of a config (meta device)",
                       epilog=_epilog("liveavatar inspect --config reference"))
    inspect_cmd.add_arguments(p)
    p.set_defaults(func=_lazy("inspect_cmd"))

    p = sub.add_parser("train", formatter_class=fmt,
                       help="train the tiny checkpoint from scratch (synthetic data, VAE, teacher, DMD)",
                       epilog=_epilog("liveavatar train --out runs/quick --quick"))
    train_cmd.add_arguments(p)
    p.set_defaults(func=_lazy("train_cmd"))

    p = sub.add_parser("eval", formatter_class=fmt,
                       help="quality report of a video: lip sync, identity, motion, frame quality",
                       epilog=_epilog(f"liveavatar eval {EXAMPLE_OUT} --reference {EXAMPLE_IMAGE} "
                                      f"--audio {EXAMPLE_AUDIO} --out out/eval"))
    eval_cmd.add_arguments(p)
    p.set_defaults(func=_lazy("eval_cmd"))
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
