"""The webhooks dispatcher as a real process against the real broker and Redis, delivering to a real HTTP
receiver on 127.0.0.1 that verifies every signature: retries keep the event id and body, 5xx and 429 are
retried, other 4xx are not (dead letter), and killing the dispatcher mid-delivery loses no event."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from infra import topics
from infra.local.stack import free_port
from services.common import events
from services.common.kafka import ensure_topics, make_producer
from services.common.redis_state import StateStore
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def env(local_stack, monkeypatch):
    prefix, ns = f"wh{uuid.uuid4().hex[:8]}-", f"wh{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("LIVEAVATAR_TOPIC_PREFIX", prefix)          # topics.name() here and in the child
    ensure_topics(local_stack.kafka_bootstrap, [s for s in topics.all_topics() if s.name == topics.name(topics.EVENTS)])
    store = StateStore.from_url(local_stack.redis_url, namespace=ns)
    receiver = Receiver()
    store.r.hset(store.k("tenantcfg", "acme"), mapping={"name": "acme", "max_sessions": 1, "minutes_per_day": 1})
    receiver.secret = events.set_webhook(store, "acme", receiver.url)
    child_env = {**os.environ, "LIVEAVATAR_KAFKA_BOOTSTRAP": local_stack.kafka_bootstrap,
                 "LIVEAVATAR_REDIS_URL": local_stack.redis_url, "LIVEAVATAR_REDIS_NAMESPACE": ns,
                 "LIVEAVATAR_TOPIC_PREFIX": prefix, "LIVEAVATAR_WEBHOOK_BACKOFF_BASE_S": "0.1",
                 "LIVEAVATAR_WEBHOOK_BACKOFF_MAX_S": "0.4", "LIVEAVATAR_WEBHOOK_MAX_ATTEMPTS": "5",
                 "LIVEAVATAR_WEBHOOK_TIMEOUT_S": "20", "LIVEAVATAR_GROUP_ID": f"webhooks-{ns}"}
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "services.webhooks"],
                             env={**child_env, "LIVEAVATAR_HEALTH_PORT": str(free_port())},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    producer = make_producer(local_stack.kafka_bootstrap)
    yield {"store": store, "receiver": receiver, "start": start, "producer": producer}
    producer.close()
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    receiver.httpd.shutdown()


def _publish(producer, n: int, tag: str) -> list[events.Event]:
    evs = [events.make_event("utterance.ended", f"s_{tag}", {"last_block": i}, discriminator=str(i)) for i in range(n)]
    for ev in evs:
        events.publish(producer, "acme", ev)
    producer.flush()
    return evs


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_retries_keep_the_id_and_body_5xx_429_retried_4xx_dead_lettered(env):
    rc, store = env["receiver"], env["store"]
    evs = _publish(env["producer"], 4, "retry")
    rc.fail_first = {evs[0].id: 2, evs[1].id: 3, evs[2].id: 1, evs[3].id: 1}
    rc.status_for = {evs[2].id: 429, evs[3].id: 400}
    env["start"]()
    _wait(lambda: rc.accepted() >= {e.id for e in evs[:3]} and store.r.llen(store.k("webhookdead", "acme")) == 1,
          90, "deliveries")
    by_id = {e.id: [d for d in rc.deliveries if d["id"] == e.id] for e in evs}
    assert [len(by_id[e.id]) for e in evs] == [3, 4, 2, 1]          # failures + the success; 400: no retry
    for e in evs:
        attempts = by_id[e.id]
        assert all(d["verified"] for d in attempts)                   # every attempt signed afresh, verifiable
        assert {d["body"] for d in attempts} == {e.body()}            # the same bytes, hence the same id
        assert [d["attempt"] for d in attempts] == [str(i) for i in range(1, len(attempts) + 1)]
    (dead,) = events.dead_letters(store, "acme")
    assert dead["event"]["id"] == evs[3].id and dead["status"] == 400 and dead["attempts"] == 1


def test_killing_the_dispatcher_mid_delivery_loses_no_event(env):
    rc = env["receiver"]
    evs = _publish(env["producer"], 6, "kill")
    gate = rc.hold[evs[2].id] = threading.Event()                   # its first attempt hangs...
    first = env["start"]()
    assert rc.holding.wait(60), "the dispatcher never reached the held event"
    first.send_signal(signal.SIGKILL)                                 # ...and the dispatcher dies mid-delivery
    first.wait()
    del rc.hold[evs[2].id]
    gate.set()
    env["start"]()
    _wait(lambda: rc.accepted() >= {e.id for e in evs}, 90, "every event after the restart")
    assert all(d["verified"] for d in rc.deliveries)
    redelivered = [d for d in rc.deliveries if d["id"] == evs[2].id]
    assert len(redelivered) >= 2 and {d["body"] for d in redelivered} == {evs[2].body()}   # same id, again
