"""Health, readiness and Prometheus metrics over HTTP for the worker services.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only when the service's
readiness check passes (its broker, Redis and model are up), else 503; ``/metrics`` is the Prometheus
text format. A tiny threaded stdlib server: the workers do not need a web framework.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Metrics shared by every worker service (labelled by service / stage).
BLOCK_LATENCY = Histogram("liveavatar_block_latency_seconds", "Time to process one block in a stage",
                          ["service", "stage"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
QUEUE_LAG = Gauge("liveavatar_queue_lag_messages", "Consumer lag: end offset minus position", ["service", "topic"])
FPS = Gauge("liveavatar_fps", "Video frames per second produced recently", ["service"])
ACTIVE_SESSIONS = Gauge("liveavatar_active_sessions", "Sessions this process currently holds state for", ["service"])
BLOCKS = Counter("liveavatar_blocks_total", "Blocks processed", ["service", "stage"])
DUPLICATES = Counter("liveavatar_duplicates_dropped_total", "Replayed messages dropped by idempotent consumers",
                     ["service"])
REFUSED = Counter("liveavatar_refused_total", "Inputs refused (backpressure or bad input)", ["service", "reason"])


class HealthServer:
    """Serve /healthz, /readyz and /metrics on ``host:port`` from a daemon thread."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool], service: str):
        self.ready, self.service = ready, service
        handler = self._handler()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"{service}-health", daemon=True)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - stdlib API
                if self.path == "/healthz":
                    self._send(200, "application/json", json.dumps({"status": "ok", "service": outer.service}))
                elif self.path == "/readyz":
                    try:
                        ok = bool(outer.ready())
                    except Exception:  # noqa: BLE001 - a failing check means not ready
                        ok = False
                    self._send(200 if ok else 503, "application/json",
                               json.dumps({"ready": ok, "service": outer.service}))
                elif self.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest().decode())
                else:
                    self._send(404, "application/json", json.dumps({"error": "not found"}))

            def _send(self, code: int, ctype: str, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet: structured logs come from the service itself
                pass

        return Handler
