"""The whole local stack with the session API (`liveavatar up`), once per e2e test session, and tenants."""

from __future__ import annotations

import itertools
import subprocess
import sys

import httpx
import pytest

from infra.local.stack import pid_alive
from services.cli import stack_cmd


@pytest.fixture(scope="session")
def api_stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api-stack")
    env = {"LIVEAVATAR_MAX_QUEUED_AUDIO_S": "6"}
    res = stack_cmd.up(run_dir, lanes=2, api=True, env=env, timeout_s=600)
    port = res["services"]["session-api"]["ports"][0]
    yield {"run_dir": run_dir, "info": res["infra"], "base": f"http://127.0.0.1:{port}", "port": port}
    pids = stack_cmd._all_pids(run_dir)
    stack_cmd.down(run_dir)
    assert not [p for p in pids if pid_alive(p)], "down left a process behind"


@pytest.fixture(scope="session")
def make_tenant(api_stack):
    """Create a tenant through the CLI, exactly as an operator does; returns its API key. Tenant names are
    unique, so each call gets its own (``name-1``, ``name-2``, ...)."""
    count = itertools.count(1)

    def create(name: str, max_sessions: int = 4, minutes_per_day: float = 600.0) -> str:
        r = subprocess.run([sys.executable, "-m", "services.cli", "tenants", "create", f"{name}-{next(count)}",
                            "--max-sessions", str(max_sessions), "--minutes-per-day", str(minutes_per_day),
                            "--run-dir", str(api_stack["run_dir"])], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("la_"), "the key must be alone on stdout"
        return lines[0]
    return create


@pytest.fixture()
def client(api_stack):
    with httpx.Client(base_url=api_stack["base"], timeout=30) as c:
        yield c
