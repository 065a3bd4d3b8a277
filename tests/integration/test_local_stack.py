"""The embedded stack talks real protocols: Kafka through Tansu, and Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from kafka import TopicPartition

from infra.local.stack import LOOPBACK, LocalStack, pid_alive, tcp_sockets
from infra.topics import TopicSpec
from services.common.kafka import ensure_topics, make_consumer, make_producer

pytestmark = pytest.mark.integration


def test_round_trip_through_four_partitions_and_a_consumer_group(kafka_bootstrap):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=4)])
    producer = make_producer(kafka_bootstrap)
    sent = []
    for i in range(40):
        key = f"session-{i % 8}".encode()
        value = f"{i}".encode() + os.urandom(100)
        md = producer.send(topic, key=key, value=value).get(timeout=10)
        sent.append((md.partition, key, value))
    producer.close()
    assert {p for p, _, _ in sent} == {0, 1, 2, 3}, "keys should spread over all 4 partitions"

    consumer = make_consumer(kafka_bootstrap, group_id=f"g-{uuid.uuid4().hex[:6]}", topics=[topic])
    got = []
    deadline = time.monotonic() + 40
    while len(got) < len(sent) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500).items():
            got.extend((tp.partition, r.key, r.value) for r in records)
    consumer.commit()
    assignment = consumer.assignment()
    committed = {tp.partition: consumer.committed(tp) for tp in assignment}
    consumer.close()

    assert sorted(got) == sorted(sent)
    assert {tp.partition for tp in assignment} == {0, 1, 2, 3}
    # within a partition, order is the produce order
    for p in range(4):
        assert [v for q, _, v in got if q == p] == [v for q, _, v in sent if q == p]
    # the group committed the end offset of every partition
    assert committed == {p: sum(1 for q, _, _ in sent if q == p) for p in range(4)}


def test_same_key_stays_on_one_partition(kafka_bootstrap):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=4)])
    producer = make_producer(kafka_bootstrap)
    parts = {producer.send(topic, key=b"one-session", value=b"x%d" % i).get(timeout=10).partition for i in range(10)}
    producer.close()
    assert len(parts) == 1


def test_ensure_topics_refuses_fewer_partitions_than_required(kafka_bootstrap):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    assert ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=2)]) == [topic]
    assert ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=2)]) == []
    with pytest.raises(RuntimeError, match="cannot add partitions"):
        ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=4)])


def test_binary_value_of_a_few_megabytes_through_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    value = os.urandom(5 * 1024 * 1024 + 17)
    key = f"test:{uuid.uuid4().hex}"
    client.set(key, value, ex=30)
    assert client.get(key) == value
    assert 0 < client.ttl(key) <= 30
    client.delete(key)


def test_cli_up_status_down_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "services.cli", "infra"]
    up = subprocess.run(cli + ["up", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    info = LocalStack(run_dir).info()
    pids = [s.pid for s in info.servers.values()]
    try:
        status = subprocess.run(cli + ["status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        lines = status.stdout.strip().splitlines()
        assert len(lines) == 2 and all(" ready " in ln and f"{LOOPBACK}:" in ln for ln in lines), status.stdout
        # only loopback sockets are listening for these pids
        for srv in info.servers.values():
            assert _listen_addresses(srv.pid) == {f"{LOOPBACK}:{srv.port}"}, srv
    finally:
        down = subprocess.run(cli + ["down", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids)
    after = subprocess.run(cli + ["status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert after.returncode == 1


def _listen_addresses(pid: int) -> set[str]:
    """The TCP addresses a process listens on (IPv4 and IPv6)."""
    return {f"{sock.address}:{sock.port}" for sock in tcp_sockets([pid]) if sock.listening}


def test_missing_redis_server_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    from infra.local import stack as stack_mod

    with pytest.raises(stack_mod.StackError, match="apt-get install -y redis-server"):
        stack_mod.redis_binary()
    with pytest.raises(stack_mod.StackError, match="redis-server is not installed"):
        LocalStack(tmp_path / "run").up()


def test_committed_offsets_resume_a_restarted_consumer(kafka_bootstrap):
    """A consumer that restarts in the same group continues after the last committed record."""
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=1)])
    producer = make_producer(kafka_bootstrap)
    for i in range(10):
        producer.send(topic, key=b"s", value=str(i).encode())
    producer.flush()
    group = f"g-{uuid.uuid4().hex[:6]}"
    tp = TopicPartition(topic, 0)
    first = make_consumer(kafka_bootstrap, group_id=group, topics=[topic], max_poll_records=4)
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < 4 and time.monotonic() < deadline:
        for records in first.poll(timeout_ms=500).values():
            seen.extend(int(r.value) for r in records)
    first.commit({tp: __import__("kafka").OffsetAndMetadata(4, None, -1)})
    first.close()
    second = make_consumer(kafka_bootstrap, group_id=group, topics=[topic])
    rest = []
    deadline = time.monotonic() + 30
    while len(rest) < 6 and time.monotonic() < deadline:
        for records in second.poll(timeout_ms=500).values():
            rest.extend(int(r.value) for r in records)
    second.close()
    producer.close()
    assert rest == [4, 5, 6, 7, 8, 9]


def test_redis_state_survives_down_and_up_and_a_new_run_settles_the_old_sessions(tmp_path):
    from services.cli.stack_cmd import settle_previous_run
    from services.common.redis_state import SessionRecord, StateStore
    from services.session_api.tenants import create_tenant, tenant_for_key

    stack = LocalStack(tmp_path / "run")
    info = stack.up()
    try:
        store = StateStore.from_url(info.redis_url)
        _, key = create_tenant(store, "keeper")
        store.put_session(SessionRecord("s-live", "keeper", state="active", lane="lane-0"))
        store.put_session(SessionRecord("s-done", "keeper", state="ended"))
        store.register_lane("lane-0", 0)
        store.claim_lane("s-live")
        store.add_usage("keeper", 4.8)
        store.r.close()
        stack.down()                                   # written a moment ago: `down` saves before it stops
        info = stack.up()
        store = StateStore.from_url(info.redis_url)
        assert tenant_for_key(store, key).tenant_id == "keeper"
        assert store.get_usage("keeper") == 4.8 and store.get_session("s-live").state == "active"
        assert (tmp_path / "run" / "dump.rdb").exists()
        # what `liveavatar up` does before it starts the services: nothing serves the old live session
        assert settle_previous_run(info.redis_url) == ["s-live"]
        live = store.get_session("s-live")
        assert live.state == "ended" and live.error == "the local stack was stopped"
        assert store.get_session("s-done").state == "ended" and store.list_lanes() == {}
        assert store.lane_session("lane-0") == "" and tenant_for_key(store, key).tenant_id == "keeper"
    finally:
        stack.down()
