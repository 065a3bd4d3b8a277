"""Redis with a password and TLS (``rediss://``): a real ``redis-server --tls-port --requirepass``.

The test makes its own CA and a server certificate for 127.0.0.1 with ``openssl``, starts Debian's
redis-server with TLS only (no plaintext port) and a password, and connects through the same path every
service uses: ``LiveAvatarSettings`` -> ``StateStore.from_settings``. Negative controls: a wrong
password, no CA bundle (the system CAs do not know the test CA) and plaintext ``redis://`` all fail.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
import redis

from infra.local.stack import free_port, redis_binary, stop_pid
from services.common.redis_state import StateStore
from services.common.worker import WorkerSettings
from tests.integration.certs import make_server_certificate

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    d = tmp_path_factory.mktemp("redis-tls")
    make_server_certificate(d)
    port = free_port()
    log = open(d / "redis.log", "w")
    proc = subprocess.Popen(
        [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
         "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis.Redis.from_url(url, ssl_ca_certs=str(d / "ca.crt"), socket_timeout=1).ping():
                break
        except redis.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"TLS redis-server did not start: {(d / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.1)
    yield {"url": url, "port": port, "ca": str(d / "ca.crt")}
    stop_pid(proc.pid)
    log.close()


def _settings(monkeypatch, url: str, ca: str | None) -> WorkerSettings:
    monkeypatch.setenv("LIVEAVATAR_REDIS_URL", url)
    if ca:
        monkeypatch.setenv("LIVEAVATAR_REDIS_SSL_CAFILE", ca)
    else:
        monkeypatch.delenv("LIVEAVATAR_REDIS_SSL_CAFILE", raising=False)
    return WorkerSettings()


def test_the_services_store_works_over_tls_with_a_password(tls_redis, monkeypatch):
    s = _settings(monkeypatch, tls_redis["url"], tls_redis["ca"])
    store = StateStore.from_settings(s, namespace=f"tls{uuid.uuid4().hex[:6]}")
    conn = store.r.connection_pool.get_connection()
    try:
        assert conn.__class__.__name__ == "SSLConnection"
    finally:
        store.r.connection_pool.release(conn)
    key = store.k("probe")
    store.r.set(key, b"over-tls", ex=60)
    assert store.r.get(key) == b"over-tls"
    # the password never shows in the settings' log line
    assert PASSWORD not in str(s.log_safe())


def test_a_wrong_password_is_refused(tls_redis, monkeypatch):
    url = tls_redis["url"].replace(PASSWORD, "wrong")
    store = StateStore.from_settings(_settings(monkeypatch, url, tls_redis["ca"]))
    with pytest.raises(redis.AuthenticationError):
        store.r.ping()


def test_the_server_certificate_is_verified(tls_redis, monkeypatch):
    # Without the test CA the system CAs cannot verify the server: the handshake must fail.
    store = StateStore.from_settings(_settings(monkeypatch, tls_redis["url"], None))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        store.r.ping()


def test_plaintext_cannot_talk_to_the_tls_port(tls_redis, monkeypatch):
    url = tls_redis["url"].replace("rediss://", "redis://")
    store = StateStore.from_settings(_settings(monkeypatch, url, None))
    with pytest.raises(redis.ConnectionError):
        store.r.ping()


def test_a_ca_bundle_needs_a_rediss_url(tls_redis, monkeypatch):
    with pytest.raises(ValueError, match="not rediss://"):
        _settings(monkeypatch, tls_redis["url"].replace("rediss://", "redis://"), tls_redis["ca"])
