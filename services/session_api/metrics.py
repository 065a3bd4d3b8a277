"""The session API's Prometheus metrics (served at ``/metrics``)."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.health import ACTIVE_SESSIONS as SESSIONS  # noqa: F401  (re-exported; registered once per process)

REQUESTS = Counter("liveavatar_api_requests_total", "API requests", ["route", "status"])
LATENCY = Histogram("liveavatar_api_request_seconds", "API request latency", ["route"])
AUDIO_SECONDS = Counter("liveavatar_api_audio_seconds_total", "Seconds of audio accepted", ["tenant"])
#: How late the event loop runs a task that asked to sleep (``LIVEAVATAR_EVENT_LOOP_PROBE_S``): anything that
#: blocks the loop shows up here. Buckets from 0.5 ms to 1 s (bench/event_loop_bench.py reads them).
EVENT_LOOP_LAG = Histogram("liveavatar_api_event_loop_lag_seconds", "Event-loop lag: overshoot of a short sleep",
                           buckets=(.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .1, .25, .5, 1))
EVENT_LOOP_LAG_MAX = Gauge("liveavatar_api_event_loop_lag_max_seconds", "Largest event-loop lag seen since start")
