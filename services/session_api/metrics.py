"""The session API's Prometheus metrics (served at ``/metrics``)."""

from prometheus_client import Counter, Histogram

from services.common.health import ACTIVE_SESSIONS as SESSIONS  # noqa: F401  (re-exported; registered once per process)

REQUESTS = Counter("liveavatar_api_requests_total", "API requests", ["route", "status"])
LATENCY = Histogram("liveavatar_api_request_seconds", "API request latency", ["route"])
AUDIO_SECONDS = Counter("liveavatar_api_audio_seconds_total", "Seconds of audio accepted", ["tenant"])
