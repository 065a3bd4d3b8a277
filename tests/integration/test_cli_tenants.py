"""``liveavatar tenants create`` against the real Redis: the tenant keeps its name, a name is used once."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from services.common.redis_state import StateStore
from services.session_api.tenants import get_tenant, tenant_for_key

pytestmark = pytest.mark.integration


def _create(redis_url: str, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "tenants", "create", name, "--redis-url", redis_url,
                           *extra], capture_output=True, text=True, timeout=60)


def test_the_tenant_keeps_its_name_and_a_second_create_is_refused(redis_url):
    name = f"demo-{uuid.uuid4().hex[:6]}"
    r = _create(redis_url, name, "--max-sessions", "2")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert r.stdout.count("\n") == 1 and key.startswith("la_")
    assert r.stderr.startswith(f"tenant {name} created (max 2 sessions"), r.stderr
    store = StateStore.from_url(redis_url)
    tenant = tenant_for_key(store, key)
    assert tenant is not None and tenant.tenant_id == name and tenant.name == name and tenant.max_sessions == 2

    again = _create(redis_url, name)
    assert again.returncode == 2 and again.stdout == ""
    err = again.stderr.strip().splitlines()
    assert err == [f"error: tenant '{name}' already exists; choose another name"]
    # the first tenant and its key are untouched
    assert get_tenant(store, name).max_sessions == 2 and tenant_for_key(store, key).tenant_id == name


def test_json_output_carries_the_key(redis_url):
    name = f"json-{uuid.uuid4().hex[:6]}"
    r = _create(redis_url, name, "--json", "--minutes-per-day", "5")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tenant_id"] == name and out["minutes_per_day"] == 5.0
    assert tenant_for_key(StateStore.from_url(redis_url), out["api_key"]).tenant_id == name
