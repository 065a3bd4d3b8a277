"""The webhooks dispatcher: events from the ``events`` topic -> signed POSTs to each tenant's endpoint.

At-least-once. The dispatcher reads a batch of events (consumer group ``webhooks``), delivers them in
parallel (``LIVEAVATAR_WEBHOOK_THREADS``), and commits a partition's offset only past events that are
*done*: delivered (a 2xx), given up on (recorded in the tenant's dead-letter list in Redis), or skipped
(the tenant has no endpoint). An event in flight when the process dies or stops is not committed, so
the next dispatcher delivers it again, with the same ``id``.

Retries. A connection error, a timeout, 408, 429 and any 5xx are retried after an exponential backoff
(``base * 2^n``, at most ``backoff_max``, with jitter; a ``Retry-After`` header, when longer, is
honoured up to ``backoff_max``), up to ``LIVEAVATAR_WEBHOOK_MAX_ATTEMPTS`` attempts. Any other status
(other 4xx, 3xx: redirects are not followed) is final: the event goes to the dead-letter list at once.
Each attempt is signed afresh (``t`` is the attempt's time) over the same body.
"""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kafka import OffsetAndMetadata
from prometheus_client import Counter, Histogram

from infra import topics
from services.common import events
from services.common.health import QUEUE_LAG, HealthServer
from services.common.kafka import make_consumer
from services.common.logging import get_logger
from services.common.redis_state import StateStore
from services.common.worker import LAG_EXPORT_S, GracefulStop, update_lag
from services.webhooks.settings import WebhookSettings

SERVICE = "webhooks"
log = get_logger(SERVICE)

DELIVERIES = Counter("liveavatar_webhook_deliveries_total", "Events done, by outcome",
                     ["outcome"])        # delivered | dead_letter | no_endpoint | malformed
ATTEMPTS = Counter("liveavatar_webhook_attempts_total", "Delivery attempts, by result class", ["result"])
ATTEMPT_SECONDS = Histogram("liveavatar_webhook_attempt_seconds", "Duration of one delivery attempt",
                            buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
USER_AGENT = "LiveAvatar-Webhooks/1"


def retryable(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (timeouts and connection errors always are)."""
    return status in (408, 429) or status >= 500


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):   # a 3xx is the receiver's answer, not a place to go
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


@dataclass
class Attempt:
    status: int            # HTTP status; 0 when no response (timeout, connection error)
    error: str = ""
    retry_after_s: float = 0.0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Attempt:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            resp.read(65536)
            return Attempt(resp.status)
    except urllib.error.HTTPError as exc:
        try:
            retry_after = float(exc.headers.get("Retry-After", "0") or 0)
        except ValueError:
            retry_after = 0.0
        return Attempt(exc.code, f"HTTP {exc.code}", retry_after)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:  # no response
        return Attempt(0, repr(getattr(exc, "reason", exc)))


class Dispatcher:
    def __init__(self, s: WebhookSettings, store: StateStore | None = None):
        self.s = s
        self.store = store or StateStore.from_settings(s)
        self.stop = GracefulStop()
        self.ready = False
        self.pool = ThreadPoolExecutor(s.webhook_threads, thread_name_prefix="webhook")

    # ---- one event -------------------------------------------------------------------------------
    def backoff(self, attempt: int, retry_after_s: float = 0.0) -> float:
        """Wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.s.webhook_backoff_max_s, self.s.webhook_backoff_base_s * 2 ** (attempt - 1))
        wait = base * random.uniform(0.5, 1.0)
        return max(wait, min(retry_after_s, self.s.webhook_backoff_max_s))

    def deliver(self, tenant_id: str, event: events.Event) -> bool:
        """Deliver one event with retries. True when done (delivered, dead-lettered, no endpoint); False
        when the dispatcher is stopping first (the event stays uncommitted and is delivered again)."""
        body = event.body()
        last = Attempt(0, "not attempted")
        for attempt in range(1, self.s.webhook_max_attempts + 1):
            hook = events.get_webhook(self.store, tenant_id)     # re-read: an operator may change it
            if hook is None:
                DELIVERIES.labels("no_endpoint").inc()
                return True
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       events.SIGNATURE_HEADER: events.sign(hook.secret, int(time.time()), body),
                       "LiveAvatar-Event-Id": event.id, "LiveAvatar-Delivery-Attempt": str(attempt)}
            t0 = time.perf_counter()
            last = post(hook.url, body, headers, self.s.webhook_timeout_s)
            ATTEMPT_SECONDS.observe(time.perf_counter() - t0)
            if last.ok:
                ATTEMPTS.labels("2xx").inc()
                DELIVERIES.labels("delivered").inc()
                log.info("event delivered", event_id=event.id, type=event.type, tenant_id=tenant_id,
                         session_id=event.session_id, attempt=attempt)
                return True
            ATTEMPTS.labels("error" if last.status == 0 else f"{last.status // 100}xx").inc()
            final = last.status != 0 and not retryable(last.status)
            log.warning("event delivery failed", event_id=event.id, type=event.type, tenant_id=tenant_id,
                        attempt=attempt, status=last.status, error=last.error, final=final)
            if final or attempt == self.s.webhook_max_attempts:
                break
            if self.stop.event.wait(self.backoff(attempt, last.retry_after_s)):
                return False
        events.dead_letter(self.store, tenant_id, {
            "event": event.model_dump(), "url": hook.url, "attempts": attempt, "status": last.status,
            "error": last.error, "gave_up": time.time()})
        DELIVERIES.labels("dead_letter").inc()
        log.error("event given up: dead-lettered", event_id=event.id, type=event.type, tenant_id=tenant_id,
                  attempts=attempt, status=last.status)
        return True

    def _one(self, raw: bytes) -> bool:
        try:
            tenant_id, event = events.decode_record(raw)
        except ValueError as exc:             # pydantic's ValidationError is a ValueError
            DELIVERIES.labels("malformed").inc()
            log.warning("dropped a malformed event record", error=str(exc)[:200])
            return True
        return self.deliver(tenant_id, event)

    # ---- batches ---------------------------------------------------------------------------------
    def deliver_batch(self, batch: dict) -> dict:
        """Deliver a poll's records in parallel; the offsets to commit: per partition, up to the first
        record that is not done (or past the last one)."""
        futures = {tp: [(rec.offset, self.pool.submit(self._one, rec.value)) for rec in recs]
                   for tp, recs in batch.items()}
        commit = {}
        for tp, items in futures.items():
            upto = None
            for offset, fut in items:
                if not fut.result():
                    break
                upto = offset + 1
            if upto is not None:
                commit[tp] = OffsetAndMetadata(upto, None, -1)
        return commit

    def run(self) -> None:
        s = self.s
        self.stop.install()
        # A batch may take as long as its slowest event's retries: stay in the group meanwhile.
        poll_interval_ms = int((s.retry_window_s() + 60) * 1000)
        consumer = make_consumer(s.kafka(), s.group_id, [topics.name(topics.EVENTS)],
                                 max_poll_records=s.webhook_max_records, max_poll_interval_ms=poll_interval_ms)
        health = HealthServer(s.health_host, s.health_port, self._is_ready, SERVICE).start()
        log.info("started", health_port=health.port)
        next_lag = 0.0
        try:
            while not self.stop.stopping:
                batch = consumer.poll(timeout_ms=s.poll_ms)
                self.ready = True
                if batch:
                    commit = self.deliver_batch(batch)
                    if commit:                 # stopping mid-batch: what is not done stays uncommitted
                        consumer.commit(commit)
                if time.monotonic() >= next_lag:
                    next_lag = time.monotonic() + LAG_EXPORT_S
                    update_lag(consumer, SERVICE)
        finally:
            log.info("stopping")
            self.pool.shutdown(wait=True, cancel_futures=True)
            consumer.close()
            health.stop()
            QUEUE_LAG.labels(SERVICE, topics.name(topics.EVENTS)).set(0)

    def _is_ready(self) -> bool:
        return self.ready and bool(self.store.r.ping())
