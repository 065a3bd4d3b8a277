"""A real webhook receiver on 127.0.0.1 for the tests: verifies each delivery's signature with
``services.common.events.verify``, answers 204 (or 401 when the signature is wrong, or a planned failure),
and records every attempt."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.common import events


class Receiver:
    """A webhook receiver: verifies each delivery's signature, answers per a plan, records everything."""

    def __init__(self):
        self.secret = ""
        self.deliveries: list[dict] = []         # every attempt: id, attempt header, verified, body
        self.fail_first: dict[str, int] = {}     # event id -> attempts to fail (status below)
        self.status_for: dict[str, int] = {}     # event id -> status of those failing attempts
        self.hold: dict[str, threading.Event] = {}   # event id -> its first attempt waits for this
        self.holding = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - stdlib API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = events.verify(outer.secret, self.headers.get(events.SIGNATURE_HEADER, ""), body)
                event = json.loads(body)
                with outer.lock:
                    n = sum(1 for d in outer.deliveries if d["id"] == event["id"])
                    entry = {"id": event["id"], "verified": ok, "body": body, "status": None,
                             "attempt": self.headers.get("LiveAvatar-Delivery-Attempt")}
                    outer.deliveries.append(entry)
                gate = outer.hold.get(event["id"])
                if gate is not None and n == 0:
                    outer.holding.set()
                    gate.wait(30)                        # the dispatcher is killed meanwhile: no answer
                    return
                status = 401 if not ok else (outer.status_for.get(event["id"], 500)
                                             if n < outer.fail_first.get(event["id"], 0) else 204)
                entry["status"] = status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def of(self, sid: str, type_: str) -> list[dict]:
        """The verified events of one session and type, in arrival order (retries included)."""
        with self.lock:
            events_ = [json.loads(d["body"]) for d in self.deliveries if d["verified"]]
        return [e for e in events_ if e["session_id"] == sid and e["type"] == type_]

    def accepted(self) -> set[str]:
        """Ids of the events this receiver answered with a 2xx."""
        with self.lock:
            return {d["id"] for d in self.deliveries if d["status"] is not None and 200 <= d["status"] < 300}
