"""``liveavatar tenants list | revoke NAME``: the tenants of the session API, in the local stack's Redis.

``list`` prints one row per tenant (``NAME  MAX_SESSIONS  MIN/DAY``) or, with ``--json``, one object;
``revoke`` removes a tenant and its API keys (they answer 401 from then on). Both take ``--run-dir``,
``--json`` and ``--redis-url`` like ``tenants create``; each action registers itself in
:func:`add_parsers`, so another one is one more function here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infra.local.stack import LocalStack, default_run_dir


def store_of(args: argparse.Namespace):
    """The tenants' Redis: ``--redis-url``, else the local stack's; ``None`` (message printed) when neither."""
    from services.common.redis_state import StateStore

    url = args.redis_url
    if url is None:
        run_dir = (args.run_dir or default_run_dir()).resolve()
        info = LocalStack(Path(run_dir)).info()
        if info is None:
            print(f"error: no local stack is running in {run_dir}; start one with `liveavatar up` "
                  "or pass --redis-url", file=sys.stderr)
            return None
        url = info.redis_url
    return StateStore.from_url(url)


def run_list(args: argparse.Namespace) -> int:
    from services.session_api.tenants import list_tenants

    store = store_of(args)
    if store is None:
        return 2
    rows = [{"tenant_id": t.tenant_id, "max_sessions": t.max_sessions, "minutes_per_day": t.minutes_per_day}
            for t in list_tenants(store)]
    if args.json:
        print(json.dumps({"tenants": rows}, indent=2))
    elif not rows:
        print("no tenants; create one with `liveavatar tenants create NAME`", file=sys.stderr)
    else:
        print(f"{'NAME':24s} {'MAX_SESSIONS':>12s} {'MIN/DAY':>8s}")
        for r in rows:
            print(f"{r['tenant_id']:24s} {r['max_sessions']:12d} {r['minutes_per_day']:8g}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from services.session_api.tenants import revoke_tenant

    store = store_of(args)
    if store is None:
        return 2
    try:
        keys = revoke_tenant(store, args.name)
    except KeyError:
        print(f"error: no tenant {args.name!r} (see `liveavatar tenants list`)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"tenant_id": args.name, "revoked": True, "keys_removed": keys}, indent=2))
    else:
        print(f"tenant {args.name} revoked ({keys} API key{'s' if keys != 1 else ''} removed)")
    return 0


def add_parsers(tsub, parents: list, fmt, epilog) -> None:
    """Register ``tenants list`` and ``tenants revoke`` on the ``tenants`` sub-parsers."""
    redis_help = "Redis of the tenants (default: the local stack's)"
    t = tsub.add_parser("list", parents=parents, formatter_class=fmt, help="list the tenants",
                        epilog=epilog("liveavatar tenants list", "liveavatar tenants list --json"))
    t.add_argument("--redis-url", default=None, metavar="URL", help=redis_help)
    t.set_defaults(func=run_list)
    t = tsub.add_parser("revoke", parents=parents, formatter_class=fmt,
                        help="remove a tenant; its API keys stop working at once",
                        description="Remove tenant NAME and every API key of it: requests with those keys get\n"
                                    "401 from now on. The name can be created again afterwards.",
                        epilog=epilog("liveavatar tenants revoke acme"))
    t.add_argument("name", metavar="NAME", help="the tenant")
    t.add_argument("--redis-url", default=None, metavar="URL", help=redis_help)
    t.set_defaults(func=run_revoke)
