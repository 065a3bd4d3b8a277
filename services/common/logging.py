"""structlog, configured once per process.

Services log one JSON object per line (``json_logs=True``); the CLI logs human-readable lines.
Every log line passes through :func:`redact_secrets`, so API keys, passwords and tokens never reach
a log sink even when a caller passes them by mistake.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

#: Event-dict keys whose values are never logged.
SECRET_KEY_PATTERN = re.compile(r"(api[_-]?key|authorization|password|passwd|secret|token|credential)", re.IGNORECASE)
#: Values that look like bearer credentials are masked wherever they appear.
BEARER_PATTERN = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
#: Our own API keys have a recognisable prefix (see services.session_api); mask them anywhere.
API_KEY_PATTERN = re.compile(r"\bla_[A-Za-z0-9_-]{16,}")
REDACTED = "[redacted]"


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return API_KEY_PATTERN.sub(REDACTED, BEARER_PATTERN.sub(r"\1" + REDACTED, value))
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY_PATTERN.search(str(k)) else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask secret-looking keys and bearer/API-key-looking values."""
    return _redact_value(event_dict)


def configure_logging(json_logs: bool = False, level: str = "INFO", stream=None) -> None:
    """Configure structlog and the stdlib root logger once for this process."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    stream = stream or sys.stderr
    renderer: Any = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=lvl, stream=stream, format="%(levelname)s %(name)s %(message)s", force=True)
    for noisy in ("kafka", "urllib3"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))


def get_logger(name: str | None = None, **bound: Any):
    """A structlog logger, optionally with bound context (session_id, tenant_id, ...)."""
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)
