"""structlog set-up and the settings base: JSON lines, secrets redacted, LIVEAVATAR_ prefix."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import ValidationError

from services.common.logging import configure_logging, get_logger
from services.common.settings import LiveAvatarSettings

pytestmark = pytest.mark.unit


def test_json_logs_redact_secrets():
    buf = io.StringIO()
    configure_logging(json_logs=True, level="INFO", stream=buf)
    key = "la_" + "x" * 32
    get_logger("t", session_id="s1", tenant_id="acme").info(
        "created", api_key=key, headers={"Authorization": f"Bearer {key}"}, note=f"used key {key}", size=3
    )
    line = buf.getvalue().strip().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "created" and record["session_id"] == "s1" and record["tenant_id"] == "acme"
    assert record["size"] == 3
    assert key not in line
    assert record["api_key"] == "[redacted]" and record["headers"]["Authorization"] == "[redacted]"
    assert record["note"] == "used key [redacted]"


def test_console_logs_for_the_cli():
    buf = io.StringIO()
    configure_logging(json_logs=False, level="DEBUG", stream=buf)
    get_logger("t").debug("hello", block=3)
    out = buf.getvalue()
    assert "hello" in out and "block=3" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.strip().splitlines()[-1])


def test_unknown_log_level_is_rejected():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="LOUD")


def test_settings_read_the_prefix_and_mask_secrets(monkeypatch):
    monkeypatch.setenv("LIVEAVATAR_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    monkeypatch.setenv("LIVEAVATAR_REDIS_URL", "redis://:hunter2@r:6379/0")
    s = LiveAvatarSettings()
    assert s.kafka_bootstrap == "10.0.0.1:9092"
    assert s.redis_url.get_secret_value().endswith("@r:6379/0")
    assert "hunter2" not in json.dumps(s.log_safe())
    with pytest.raises(ValidationError):
        LiveAvatarSettings(not_a_field=1)
