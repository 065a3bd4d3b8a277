"""Kafka over TLS through the clients every service uses, against the real broker.

The local broker (Tansu) speaks plaintext only, so the test puts a TLS terminator in front of it: an
asyncio proxy with a certificate from a CA the test makes, and a broker that advertises the proxy's
port, so that every connection the clients open (bootstrap, then the advertised broker) is TLS. The
producer, the consumer and the admin client all come from ``LiveAvatarSettings.kafka()``, as in the
services. Negative control: without the CA bundle the handshake fails and nothing is produced.

SASL (PLAIN, SCRAM) cannot be tested here: Tansu's ``--authentication`` needs users created through an
authenticated connection, which its in-memory storage cannot bootstrap. The SASL client settings are
unit-tested in tests/unit/services/test_connection_settings.py.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
import time
import uuid

import pytest
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaError

from infra.local.stack import free_port, stop_pid, tansu_binary
from infra.topics import TopicSpec
from services.common.kafka import KafkaConnection, ensure_topics, make_consumer, make_producer
from services.common.settings import LiveAvatarSettings
from tests.integration.certs import make_server_certificate

pytestmark = pytest.mark.integration


class TLSProxy:
    """Terminates TLS on ``port`` and forwards the bytes to a plaintext ``upstream`` port."""

    def __init__(self, port: int, upstream: int, context: ssl.SSLContext):
        self.port, self.upstream, self.context = port, upstream, context
        self.loop = asyncio.new_event_loop()
        self.handshakes = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context))
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader, writer) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def start(self) -> TLSProxy:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("kafka-tls")
    make_server_certificate(d)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "server.crt", d / "server.key")

    broker_port, tls_port = free_port(), free_port()
    log = open(d / "broker.log", "w")
    proc = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{tls_port}", "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proxy = TLSProxy(tls_port, broker_port, context).start()
    deadline = time.monotonic() + 30
    # readiness through TLS: the broker advertises the proxy, so a plaintext probe could not succeed
    kafka = KafkaConnection(f"127.0.0.1:{tls_port}", "SSL", ssl_cafile=str(d / "ca.crt"))
    while not _ready(kafka):
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"broker did not start: {(d / 'broker.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield {"bootstrap": f"127.0.0.1:{tls_port}", "ca": str(d / "ca.crt"), "proxy": proxy}
    proxy.stop()
    stop_pid(proc.pid)
    log.close()


def _ready(kafka: KafkaConnection) -> bool:
    try:
        KafkaAdminClient(**kafka.client_config(), request_timeout_ms=2000).close()
        return True
    except KafkaError:
        return False


def _settings(monkeypatch, bootstrap: str, ca: str | None) -> LiveAvatarSettings:
    monkeypatch.setenv("LIVEAVATAR_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("LIVEAVATAR_KAFKA_SECURITY_PROTOCOL", "SSL")
    if ca:
        monkeypatch.setenv("LIVEAVATAR_KAFKA_SSL_CAFILE", ca)
    else:
        monkeypatch.delenv("LIVEAVATAR_KAFKA_SSL_CAFILE", raising=False)
    return LiveAvatarSettings()


def test_admin_producer_and_consumer_speak_tls(tls_broker, monkeypatch):
    kafka = _settings(monkeypatch, tls_broker["bootstrap"], tls_broker["ca"]).kafka()
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    before = tls_broker["proxy"].handshakes
    assert ensure_topics(kafka, [TopicSpec(topic, 1)]) == [topic]
    producer = make_producer(kafka)
    producer.send(topic, b"over tls").get(timeout=20)
    producer.close()
    consumer = make_consumer(kafka, None)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    got, deadline = [], time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        got = [m.value for batch in consumer.poll(500).values() for m in batch]
    consumer.close()
    assert got == [b"over tls"]
    # every client connected through the TLS terminator (admin, producer, consumer: one or more each)
    assert tls_broker["proxy"].handshakes - before >= 3


def test_without_the_ca_the_handshake_fails(tls_broker, monkeypatch):
    kafka = _settings(monkeypatch, tls_broker["bootstrap"], None).kafka()
    with pytest.raises(KafkaError):
        producer = make_producer(kafka, max_block_ms=5000)
        producer.send("never", b"x").get(timeout=5)
