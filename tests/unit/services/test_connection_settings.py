"""Kafka security and Redis TLS settings: validation, the kafka-python client configuration, no leaks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.kafka import KafkaConnection
from services.common.settings import LiveAvatarSettings

pytestmark = pytest.mark.unit


def _settings(monkeypatch, **env) -> LiveAvatarSettings:
    for k in list(__import__("os").environ):
        if k.startswith("LIVEAVATAR_KAFKA") or k.startswith("LIVEAVATAR_REDIS"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(f"LIVEAVATAR_{k}", v)
    return LiveAvatarSettings()


def test_plaintext_is_the_default_and_sends_no_credentials(monkeypatch):
    cfg = _settings(monkeypatch, KAFKA_BOOTSTRAP="b1:9092,b2:9092").kafka().client_config()
    assert cfg == {"bootstrap_servers": "b1:9092,b2:9092", "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_reaches_the_client_config(monkeypatch, tmp_path, mechanism):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = _settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM=mechanism,
                  KAFKA_SASL_USERNAME="svc", KAFKA_SASL_PASSWORD="hunter2", KAFKA_SSL_CAFILE=str(ca))
    cfg = s.kafka().client_config()
    assert cfg["security_protocol"] == "SASL_SSL"
    assert cfg["sasl_mechanism"] == mechanism
    assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("svc", "hunter2")
    assert cfg["ssl_cafile"] == str(ca) and cfg["ssl_check_hostname"] is True
    # the password is a secret: not in the log line, not in the connection's repr
    assert "hunter2" not in str(s.log_safe()) and "hunter2" not in repr(s.kafka())


def test_the_clients_accept_the_configuration(monkeypatch):
    """kafka-python validates its keyword arguments: an unknown or misspelt key fails here, not in a pod."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    cfg = KafkaConnection("127.0.0.1:1", "SASL_PLAINTEXT", "SCRAM-SHA-512", "u", "p").client_config()
    for klass in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(cfg) <= set(klass.DEFAULT_CONFIG), klass.__name__


@pytest.mark.parametrize("env, message", [
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs LIVEAVATAR_KAFKA_SASL_MECHANISM"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u"},
     "LIVEAVATAR_KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SASL_USERNAME": "u"}, "SASL settings are set but"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.crt"}, "no such file"),
    ({"KAFKA_SSL_CAFILE": "/etc/hostname"}, "use SSL or SASL_SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "PLAINTEXT"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u",
      "KAFKA_SASL_PASSWORD": "p"}, "SCRAM-SHA-512"),
    ({"REDIS_SSL_CAFILE": "/etc/hostname"}, "not rediss://"),
])
def test_inconsistent_settings_fail_at_start_with_a_clear_message(monkeypatch, env, message):
    with pytest.raises(ValidationError, match=message):
        _settings(monkeypatch, **env)


def test_redis_options_carry_the_ca_bundle(monkeypatch, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    s = _settings(monkeypatch, REDIS_URL="rediss://:pw@redis:6380/0", REDIS_SSL_CAFILE=str(ca))
    assert s.redis_options() == {"ssl_ca_certs": str(ca)}
    assert _settings(monkeypatch).redis_options() == {}


NEEDLES = (".kafka_bootstrap", "redis_url.get_secret_value()", "StateStore.from_url(",
           "KafkaProducer(", "KafkaConsumer(", "KafkaAdminClient(")


def client_offenders(root) -> list[str]:
    """Places under ``root`` (a services tree) that build a Kafka or Redis client from the bare address."""
    allowed = {root / "common" / "settings.py", root / "common" / "redis_state.py", root / "common" / "kafka.py"}
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path in allowed or path.is_relative_to(root / "cli"):
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(root.parent)}: {n}" for n in NEEDLES if n in text]
    return offenders


def test_services_build_every_client_from_the_settings():
    """Security reaches every client only if no service builds one from the bare address or URL: the
    services (the CLI's local-stack helpers aside) never read ``kafka_bootstrap`` or the Redis URL
    themselves; they call ``settings.kafka()`` and ``StateStore.from_settings``, and only
    services/common/kafka.py constructs kafka-python clients."""
    from pathlib import Path

    assert client_offenders(Path(__file__).resolve().parents[3] / "services") == []


def test_the_client_scan_sees_a_violation(tmp_path):
    (tmp_path / "services" / "common").mkdir(parents=True)
    (tmp_path / "services" / "worker.py").write_text("p = make_producer(s.kafka_bootstrap)\n")
    assert client_offenders(tmp_path / "services") == ["services/worker.py: .kafka_bootstrap"]
