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


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "tenants", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60)


def test_list_shows_the_tenants_and_revoke_makes_their_keys_fail(redis_url):
    a, b = f"lst-{uuid.uuid4().hex[:6]}", f"rev-{uuid.uuid4().hex[:6]}"
    key_a = _create(redis_url, a, "--max-sessions", "3").stdout.strip()
    key_b = _create(redis_url, b, "--minutes-per-day", "7").stdout.strip()
    listed = json.loads(_cli(redis_url, "list", "--json").stdout)["tenants"]
    rows = {t["tenant_id"]: t for t in listed}
    assert rows[a]["max_sessions"] == 3 and rows[b]["minutes_per_day"] == 7.0
    text = _cli(redis_url, "list").stdout.splitlines()
    assert text[0].split() == ["NAME", "MAX_SESSIONS", "MIN/DAY"] and any(ln.split()[0] == b for ln in text[1:])

    r = _cli(redis_url, "revoke", b)
    assert r.returncode == 0 and r.stdout.strip() == f"tenant {b} revoked (1 API key removed)", r.stdout + r.stderr
    store = StateStore.from_url(redis_url)
    assert tenant_for_key(store, key_b) is None and get_tenant(store, b) is None
    assert tenant_for_key(store, key_a).tenant_id == a                     # another tenant is untouched
    assert b not in {t["tenant_id"] for t in json.loads(_cli(redis_url, "list", "--json").stdout)["tenants"]}
    again = _cli(redis_url, "revoke", b)
    assert again.returncode == 2 and f"no tenant '{b}'" in again.stderr
    assert _create(redis_url, b).returncode == 0                           # the name is free again
