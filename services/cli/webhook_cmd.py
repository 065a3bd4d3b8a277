"""``liveavatar tenants webhook NAME --url URL``: set a tenant's webhook endpoint, print its signing secret.

The secret (``whsec_...``) is printed alone on stdout, once; it is stored in Redis (the dispatcher signs
with it) and never logged. Running the command again rotates the secret. See docs/webhooks.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from infra.local.stack import LocalStack, default_run_dir


def run(args: argparse.Namespace) -> int:
    from services.common.events import check_url, set_webhook
    from services.common.redis_state import StateStore
    from services.session_api.tenants import get_tenant

    try:
        check_url(args.url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = args.redis_url
    run_dir = args.run_dir or default_run_dir()
    if url is None:
        info = LocalStack(run_dir).info()
        if info is None:
            print(f"error: no local stack is running in {run_dir}; start one with `liveavatar up` "
                  "or pass --redis-url", file=sys.stderr)
            return 2
        url = info.redis_url
    store = StateStore.from_url(url)
    if get_tenant(store, args.name) is None:
        print(f"error: no tenant {args.name!r}; create it with `liveavatar tenants create`", file=sys.stderr)
        return 2
    secret = set_webhook(store, args.name, args.url)
    if getattr(args, "json", False):
        print(json.dumps({"tenant_id": args.name, "url": args.url, "secret": secret}, indent=2))
        return 0
    print(f"tenant {args.name}: events go to {args.url}; the signing secret follows, shown once", file=sys.stderr)
    print(secret)
    return 0


def add_parser(tsub, parents: list, fmt, epilog) -> None:
    t = tsub.add_parser("webhook", parents=parents, formatter_class=fmt,
                        help="set a tenant's webhook endpoint; prints its signing secret alone on stdout",
                        description="Send the tenant's events (session.ready, utterance.ended, session.ended, ...)\n"
                                    "to URL as signed POSTs, and print the new signing secret alone on stdout.\n"
                                    "Running it again rotates the secret. See docs/webhooks.md.",
                        epilog=epilog("SECRET=$(liveavatar tenants webhook acme --url https://example.com/hooks)"))
    t.add_argument("name", metavar="NAME", help="the tenant")
    t.add_argument("--url", required=True, metavar="URL", help="absolute http:// or https:// URL of the receiver")
    t.add_argument("--redis-url", default=None, metavar="URL", help="Redis to write to (default: the local stack's)")
    t.set_defaults(func=run)
