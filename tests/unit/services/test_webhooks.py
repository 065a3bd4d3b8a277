"""Webhook signing, event ids, the retry policy and the dispatcher's commit rule (no broker needed)."""

from __future__ import annotations

import hashlib
import hmac
import json
from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from services.common import events
from services.webhooks.settings import WebhookSettings
from services.webhooks.worker import Dispatcher, retryable

pytestmark = pytest.mark.unit


def test_the_signature_is_hmac_sha256_of_t_dot_body_and_verify_checks_window_and_mac():
    body = b'{"id":"evt_1","type":"session.ready"}'
    header = events.sign("whsec_k", 1700000000, body)
    expected = hmac.new(b"whsec_k", b"1700000000." + body, hashlib.sha256).hexdigest()   # independent
    assert header == f"t=1700000000,v1={expected}"
    assert events.verify("whsec_k", header, body, now=1700000000 + events.REPLAY_WINDOW_S)
    assert not events.verify("whsec_k", header, body, now=1700000000 + events.REPLAY_WINDOW_S + 1)   # replayed
    assert not events.verify("whsec_other", header, body, now=1700000000)
    assert not events.verify("whsec_k", header, body + b" ", now=1700000000)
    for garbage in ("", "t=abc,v1=00", "v1=" + expected, "t=1700000000"):
        assert not events.verify("whsec_k", garbage, body, now=1700000000)


def test_event_ids_are_stable_per_event_and_the_body_is_the_documented_shape():
    a = events.make_event("utterance.ended", "s_1", {"last_block": 3}, discriminator="7", created=1.0)
    b = events.make_event("utterance.ended", "s_1", {"last_block": 3}, discriminator="7", created=2.0)
    c = events.make_event("utterance.ended", "s_1", {"last_block": 5}, discriminator="8")
    assert a.id == b.id != c.id
    assert a.id != events.make_event("session.ended", "s_1", discriminator="7").id
    assert set(json.loads(a.body())) == {"id", "type", "created", "session_id", "data"}
    tenant, back = events.decode_record(events.encode_record("acme", a))
    assert tenant == "acme" and back == a
    with pytest.raises(ValueError):
        events.decode_record(b'{"tenant_id": "acme", "event": {"type": "nope"}}')
    with pytest.raises(ValueError):
        events.make_event("session.exploded", "s_1")


@pytest.mark.parametrize("status,retry", [(500, True), (502, True), (503, True), (408, True), (429, True),
                                          (400, False), (401, False), (404, False), (410, False), (301, False)])
def test_which_statuses_are_retried(status, retry):
    assert retryable(status) is retry


def test_backoff_doubles_with_jitter_is_capped_and_honours_retry_after():
    d = Dispatcher(WebhookSettings(webhook_backoff_base_s=1.0, webhook_backoff_max_s=10.0), store=object())
    for attempt, nominal in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)):
        waits = [d.backoff(attempt) for _ in range(50)]
        assert all(nominal * 0.5 <= w <= nominal for w in waits)
    assert d.backoff(1, retry_after_s=7.0) == 7.0 and d.backoff(1, retry_after_s=99.0) == 10.0
    s = WebhookSettings(webhook_backoff_base_s=1.0, webhook_backoff_max_s=10.0, webhook_max_attempts=4,
                        webhook_timeout_s=2.0)
    assert s.retry_window_s() == (1 + 2 + 4) + 4 * 2.0


def test_offsets_are_committed_only_up_to_the_first_event_not_done():
    d = Dispatcher(WebhookSettings(webhook_threads=2), store=object())
    outcome = {b"a": True, b"b": False, b"c": True, b"d": True}      # b: abandoned (stopping)
    d._one = lambda raw: outcome[raw]
    tp0, tp1 = TopicPartition("events", 0), TopicPartition("events", 1)
    rec = lambda off, v: SimpleNamespace(offset=off, value=v)          # noqa: E731
    commit = d.deliver_batch({tp0: [rec(10, b"a"), rec(11, b"b"), rec(12, b"c")], tp1: [rec(5, b"d")],
                              TopicPartition("events", 2): [rec(0, b"b")]})
    assert {tp: c.offset for tp, c in commit.items()} == {tp0: 11, tp1: 6}    # tp0 stops before b; tp2: nothing
