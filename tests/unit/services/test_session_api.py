"""The session API in-process, without a broker or a Redis server: its app state is built by the test.

Redis is an in-memory stand-in with the commands the API uses, the Kafka producer records what it is
given, and the media hub is fed media messages directly. Every Redis command and producer call records
whether it ran on the event loop; none may (they block). The checks cover the audio path's ordering and
flushing, the one media stream behind both media routes, the example files and the web page's defaults.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from services.common.examples import FACE_FOR_SPEECH, examples_dir
from services.common.messages import AudioIn, Media, Tensor, decode, encode
from services.common.redis_state import StateStore
from services.session_api.app import create_app
from services.session_api.bus import CHUNK_SAMPLES
from services.session_api.media_hub import MediaHub
from services.session_api.routes.site import STATIC, example_file
from services.session_api.settings import ApiSettings
from services.session_api.state import AppState
from services.session_api.tenants import create_tenant

pytestmark = pytest.mark.unit

ON_LOOP: list[str] = []          # blocking calls that ran on the event loop (must stay empty)


def _off_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    ON_LOOP.append(name)


class FakeRedis:
    """The Redis commands the API uses, in memory, thread-safe; each records where it ran."""

    def __init__(self):
        self.kv: dict[str, object] = {}
        self.ttl: dict[str, float] = {}          # key -> monotonic expiry (SET ... PX only)
        self.lock = threading.RLock()

    def __getattr__(self, name):
        raise AttributeError(f"FakeRedis has no {name!r}: the API uses a command the test does not know")

    def _b(self, v):
        return v if isinstance(v, bytes) else str(v).encode()

    def get(self, k):
        _off_loop("redis.get")
        expires = self.ttl.get(k)
        if expires is not None and expires <= time.monotonic():
            return None
        return self.kv.get(k)

    def set(self, k, v, ex=None, px=None, nx=False):
        _off_loop("redis.set")
        with self.lock:
            expires = self.ttl.get(k)
            if nx and k in self.kv and not (expires is not None and expires <= time.monotonic()):
                return None
            self.kv[k] = self._b(v)
            if px is not None:
                self.ttl[k] = time.monotonic() + px / 1000
            return True

    def delete(self, *keys):
        _off_loop("redis.delete")
        with self.lock:
            for k in keys:
                self.kv.pop(k, None)
                self.ttl.pop(k, None)

    def hsetnx(self, k, f, v):
        _off_loop("redis.hsetnx")
        with self.lock:
            h = self.kv.setdefault(k, {})
            if self._b(f) in h:
                return 0
            h[self._b(f)] = self._b(v)
            return 1

    def zadd(self, k, mapping):
        _off_loop("redis.zadd")
        with self.lock:
            z = self.kv.setdefault(k, {})
            for m, score in mapping.items():
                z[self._b(m)] = float(score)

    def zrem(self, k, *members):
        _off_loop("redis.zrem")
        with self.lock:
            for m in members:
                self.kv.get(k, {}).pop(self._b(m), None)

    def zrangebyscore(self, k, lo, hi, start=None, num=None, withscores=False):
        _off_loop("redis.zrangebyscore")
        lo, hi = float(lo), float(hi)
        with self.lock:
            rows = sorted((sc, m) for m, sc in self.kv.get(k, {}).items() if lo <= sc <= hi)
        rows = rows[start or 0:(start or 0) + num] if num is not None else rows
        return [(m, sc) for sc, m in rows] if withscores else [m for _, m in rows]

    def incrby(self, k, n):
        _off_loop("redis.incrby")
        with self.lock:
            self.kv[k] = self._b(int(self.kv.get(k, b"0")) + n)
            return int(self.kv[k])

    def incrbyfloat(self, k, n):
        _off_loop("redis.incrbyfloat")
        with self.lock:
            self.kv[k] = self._b(float(self.kv.get(k, b"0")) + n)
            return float(self.kv[k])

    def hset(self, k, key=None, value=None, mapping=None):
        _off_loop("redis.hset")
        with self.lock:
            h = self.kv.setdefault(k, {})
            items = dict(mapping or {})
            if key is not None:
                items[key] = value
            for f, v in items.items():
                h[self._b(f)] = self._b(v)

    def hget(self, k, f):
        _off_loop("redis.hget")
        return self.kv.get(k, {}).get(self._b(f))

    def hgetall(self, k):
        _off_loop("redis.hgetall")
        return dict(self.kv.get(k, {}))

    def hmget(self, k, *fields):
        _off_loop("redis.hmget")
        return [self.kv.get(k, {}).get(self._b(f)) for f in fields]

    def hincrby(self, k, f, n):
        _off_loop("redis.hincrby")
        with self.lock:
            h = self.kv.setdefault(k, {})
            h[self._b(f)] = self._b(int(h.get(self._b(f), b"0")) + n)
            return int(h[self._b(f)])

    def sadd(self, k, v):
        _off_loop("redis.sadd")
        self.kv.setdefault(k, set()).add(self._b(v))

    def smembers(self, k):
        _off_loop("redis.smembers")
        return set(self.kv.get(k, set()))

    def expire(self, k, s):
        _off_loop("redis.expire")

    def ping(self):
        _off_loop("redis.ping")
        return True

    def close(self):
        pass

    def register_script(self, _src):
        return None

    def exists(self, k):
        return int(k in self.kv)

    def transaction(self, func, *watches):
        redis = self

        class Tx:                     # one thread creates tenants here: no concurrent writer to watch for
            def multi(self):
                pass

            def __getattr__(self, name):
                return getattr(redis, name)

        func(Tx())

    def pipeline(self, transaction=True):
        redis, calls = self, []

        class Pipe:
            def __getattr__(self, name):
                return lambda *a, **kw: calls.append((name, a, kw))

            def execute(self):
                return [getattr(redis, n)(*a, **kw) for n, a, kw in calls]

        return Pipe()


class FakeProducer:
    """Records every message (decoded) and every flush, and where they ran."""

    def __init__(self):
        self.sent: list[AudioIn] = []
        self.flushes: list[int] = []        # len(sent) at each flush
        self.events: list[dict] = []        # records of the events topic (JSON), in order
        self.flushed_events = 0             # len(events) at the last flush

    def send(self, topic, key=None, value=None):
        _off_loop("producer.send")
        if topic.endswith("events"):
            rec = json.loads(value)
            assert key == rec["event"]["session_id"].encode()
            self.events.append(rec)
            return
        msg = decode(value)
        assert key == msg.header.session_id.encode()
        self.sent.append(msg.header)

    def flush(self):
        _off_loop("producer.flush")
        self.flushes.append(len(self.sent))
        self.flushed_events = len(self.events)

    def close(self):
        pass


class Harness:
    def __init__(self, **settings):
        self.settings = ApiSettings(**settings)
        self.store = StateStore(FakeRedis())
        self.producer = FakeProducer()
        self.hub = MediaHub("unused")
        self.hub.ready.set()                 # the reader thread is not started: the test feeds the hub
        self.state: AppState | None = None

    def connect(self, settings: ApiSettings) -> AppState:
        self.state = AppState(settings=settings, store=self.store, producer=self.producer, hub=self.hub,
                              executor=ThreadPoolExecutor(4))
        return self.state

    def media(self, sid: str, kind: str, block: int, data: bytes) -> None:
        header = Media(session_id=sid, tenant_id="t", seq=block, kind=kind)
        self.hub._add(encode(header, {"data": Tensor("uint8", (len(data),), data)} if data else None))


@pytest.fixture()
def api():
    ON_LOOP.clear()
    h = Harness(max_queued_audio_s=1000.0)
    with TestClient(create_app(h.settings, connect=h.connect)) as client:
        _, key = create_tenant(h.store, "unit", max_sessions=2)
        client.headers["Authorization"] = f"Bearer {key}"
        h.key = key
        yield h, client
    assert ON_LOOP == [], f"blocking calls on the event loop: {sorted(set(ON_LOOP))}"


def _face_png() -> bytes:
    return (examples_dir() / "faces" / "face_812.png").read_bytes()


def _create(client, options: dict | None = None) -> str:
    r = client.post("/v1/sessions", files={"image": ("f.png", _face_png(), "image/png")},
                    data={"options": json.dumps(options or {"idle": "pause"})})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_audio_is_sent_in_order_and_flushed_per_utterance_not_per_chunk(api):
    h, client = api
    sid = _create(client)
    assert [m.kind for m in h.producer.sent] == ["start"] and h.producer.flushes == [1]   # start: flushed
    frames, frame_samples = 25, 1600                               # 2.5 s in 100 ms pcm16 frames at 16 kHz
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(frames * frame_samples) * 3000).astype("<i2")
    with client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "pcm16", "sample_rate": 16000}))
        assert ws.receive_json() == {"type": "ready"}
        for i in range(frames):
            ws.send_bytes(pcm[i * frame_samples:(i + 1) * frame_samples].tobytes())
        ws.send_text(json.dumps({"type": "end"}))
        assert ws.receive_json() == {"type": "utterance_end"}
    sent = h.producer.sent
    kinds = [m.kind for m in sent]
    assert kinds == ["start"] + ["pcm"] * frames + ["end_utterance"]      # a 1600-sample frame is one chunk
    assert [m.seq for m in sent] == list(range(len(sent)))                 # consecutive, in send order
    assert h.producer.flushes == [1, len(sent)]      # once after start, once after the utterance's end
    assert h.store.cursor_int(sid, "accepted_samples") == frames * frame_samples


def test_a_resampled_socket_carries_several_utterances(api):
    """At 24 kHz the socket's resampler is flushed at each ``end`` and starts afresh for the next utterance."""
    h, client = api
    sid = _create(client)
    rng = np.random.default_rng(1)
    chunk = (rng.standard_normal(2400) * 3000).astype("<i2")        # 100 ms at 24 kHz
    with client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "pcm16", "sample_rate": 24000}))
        assert ws.receive_json() == {"type": "ready"}
        for _ in range(2):
            for _ in range(5):
                ws.send_bytes(chunk.tobytes())
            ws.send_text(json.dumps({"type": "end"}))
            assert ws.receive_json() == {"type": "utterance_end"}
    kinds = [m.kind for m in h.producer.sent]
    assert kinds.count("end_utterance") == 2
    # each utterance's 0.5 s at 24 kHz arrives as 0.5 s at 16 kHz (the flushed tail included)
    assert h.store.cursor_int(sid, "accepted_samples") == 2 * 8000


def test_an_uploaded_utterance_is_chunked_in_order_then_ended_and_flushed_once(api, tmp_path):
    import wave

    h, client = api
    sid = _create(client)
    n = int(16000 * 1.3)
    x = (np.sin(np.arange(n) / 9.0) * 12000).astype("<i2")
    path = tmp_path / "u.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    r = client.post(f"/v1/sessions/{sid}/audio", files={"file": ("u.wav", path.read_bytes(), "audio/wav")})
    assert r.status_code == 202 and r.json() == {"accepted_seconds": 1.3}
    sent = h.producer.sent[1:]
    assert [m.kind for m in sent] == ["pcm"] * -(-n // CHUNK_SAMPLES) + ["end_utterance"]
    assert [m.seq for m in sent] == list(range(1, len(sent) + 1))
    assert h.producer.flushes == [1, len(h.producer.sent)]


def test_audio_faster_than_real_time_is_refused_with_429_and_nothing_is_sent(api):
    h, client = api
    sid = _create(client)
    h.state.settings = ApiSettings(max_queued_audio_s=1.0)
    before = len(h.producer.sent)
    with client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "f32", "sample_rate": 16000}))
        assert ws.receive_json()["type"] == "ready"
        ws.send_bytes(np.zeros(16000 * 5, "<f4").tobytes())       # 5 s at once: within the 1 s allowance, accepted
        ws.send_bytes(np.zeros(1600, "<f4").tobytes())            # now ~4 s ahead of real time: refused
        err = ws.receive_json()
    assert err["type"] == "error" and err["status"] == 429 and "ahead of real time" in err["message"]
    kinds = [m.kind for m in h.producer.sent[before:]]
    assert kinds[:25] == ["pcm"] * 25 and "pcm" not in kinds[25:]   # the 5 s went out (25 chunks), not the 0.1 s


@pytest.fixture()
def served():
    """The app behind a real uvicorn server (TestClient cancels the app when its socket closes; uvicorn
    does not, and that is what a client that closes at once meets)."""

    import httpx

    from tests.asgi_server import serve_in_thread

    h = Harness(max_queued_audio_s=1000.0)
    with serve_in_thread(create_app(h.settings, connect=h.connect)) as port:
        _, h.key = create_tenant(h.store, "unit", max_sessions=2)
        base = f"127.0.0.1:{port}"
        with httpx.Client(base_url=f"http://{base}", headers={"Authorization": f"Bearer {h.key}"}) as client:
            yield h, client, base


@pytest.mark.parametrize("send_end", [True, False])
def test_an_utterance_is_ended_when_the_client_closes_right_after_its_audio(served, send_end):
    from websockets.sync.client import connect

    h, client, base = served
    sid = _create(client)
    pcm = (np.sin(np.arange(2400 * 7) / 5.0) * 9000).astype("<i2")       # 0.7 s at 24 kHz: resampled
    with connect(f"ws://{base}/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send(json.dumps({"format": "pcm16", "sample_rate": 24000}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "ready"}
        for i in range(7):
            ws.send(pcm[i * 2400:(i + 1) * 2400].tobytes())
        if send_end:
            ws.send(json.dumps({"type": "end"}))
        # closed at once: utterance_end is never read
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "end_utterance" not in [m.kind for m in h.producer.sent]:
        time.sleep(0.02)
    time.sleep(0.2)                                                       # nothing else may follow
    kinds = [m.kind for m in h.producer.sent]
    assert kinds[0] == "start" and kinds[-1] == "end_utterance" and kinds.count("end_utterance") == 1, kinds
    assert set(kinds[1:-1]) == {"pcm"}
    # every sample made it, the resampler's tail included: 0.7 s at 16 kHz
    assert abs(h.store.cursor_int(sid, "accepted_samples") - int(0.7 * 16000)) <= 2
    assert h.producer.flushes[-1] == len(h.producer.sent)          # flushed after the end of utterance


def test_a_pipeline_stall_does_not_refuse_real_time_audio_but_the_backlog_is_bounded(api):
    h, client = api
    sid = _create(client)
    h.state.settings = ApiSettings(max_queued_audio_s=1.0, max_backlog_audio_s=5.0)
    h.store.set_cursor(sid, accepted_samples=16000 * 4)            # 4 s accepted, nothing generated (a stall)
    with client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "f32", "sample_rate": 16000}))
        assert ws.receive_json()["type"] == "ready"
        ws.send_bytes(np.zeros(16000, "<f4").tobytes())           # on pace: accepted despite the 4 s backlog
        ws.send_bytes(np.zeros(16000, "<f4").tobytes())           # (5 s backlog, not above the limit yet)
        ws.send_text(json.dumps({"type": "end"}))
        assert ws.receive_json() == {"type": "utterance_end"}
        h.store.set_cursor(sid, pace_credit="1.0")                # the client kept real time meanwhile
        ws.send_bytes(np.zeros(1600, "<f4").tobytes())            # backlog 6 s > 5 s: refused
        err = ws.receive_json()
    assert err["type"] == "error" and err["status"] == 429 and "not yet generated" in err["message"]
    assert h.store.cursor_int(sid, "accepted_samples") == 16000 * 6


def test_interrupt_and_delete_are_flushed_events_after_the_audio(api):
    h, client = api
    sid = _create(client)
    assert client.post(f"/v1/sessions/{sid}/interrupt").status_code == 202
    assert h.producer.sent[-1].kind == "interrupt" and h.producer.flushes[-1] == len(h.producer.sent)
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert h.producer.sent[-1].kind == "end" and h.producer.flushes[-1] == len(h.producer.sent)
    assert client.get(f"/v1/sessions/{sid}").json()["state"] == "ending"
    assert client.post(f"/v1/sessions/{sid}/interrupt").status_code == 409
    assert h.store.r.hget(f"la:timer:{sid}", "end_reason") == b"deleted"
    h.store.update_session(sid, state="active")                 # a second delete (any replica) sends no 2nd end
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert [m.kind for m in h.producer.sent].count("end") == 1


def test_an_open_audio_socket_is_refused_with_409_once_its_session_is_ending(api):
    """A client that keeps streaming after its session was deleted (by itself, another client or a timer)
    is told so and disconnected; nothing of it goes on the bus after the end."""
    h, client = api
    sid = _create(client)
    chunk = (np.random.default_rng(1).standard_normal(1600) * 3000).astype("<i2").tobytes()
    with client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "pcm16", "sample_rate": 16000}))
        assert ws.receive_json() == {"type": "ready"}
        ws.send_bytes(chunk)
        ws.send_text(json.dumps({"type": "end"}))
        assert ws.receive_json() == {"type": "utterance_end"}
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
        ws.send_bytes(chunk)
        ws.send_text(json.dumps({"type": "end"}))       # an answer either way: the refusal, or utterance_end
        err = ws.receive_json()
        assert err["type"] == "error" and err["status"] == 409 and "ending" in err["message"], err
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4409
    with pytest.raises(WebSocketDenialResponse) as denied:                          # a new socket: refused
        client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}").__enter__()
    assert denied.value.status_code == 409
    kinds = [m.kind for m in h.producer.sent]
    assert kinds == ["start", "pcm", "end_utterance", "end"]


def test_http_and_websocket_media_serve_the_same_tracked_stream(api):
    h, client = api
    sid = _create(client)
    rt = h.state.runtime(sid)
    pieces = [("init", -1, b"INIT"), ("fragment", 0, b"F0"), ("fragment", 1, b"F1"), ("fragment", 1, b"DUP"),
              ("fragment", 2, b"F2"), ("end", -1, b"TAIL")]
    for kind, block, data in pieces:
        h.media(sid, kind, block, data)
    seen_clients = []
    with client.websocket_connect(f"/v1/sessions/{sid}/media?key={h.key}&from_block=0") as ws:
        got = []
        while True:
            head = ws.receive_json()
            if head["type"] != "end":                # after the end the server may already have let go
                seen_clients.append(rt.media_clients)
            got.append((head["type"], head["block"], ws.receive_bytes() if head["bytes"] else b""))
            if head["type"] == "end":
                break
    expected = [("init", -1, b"INIT"), ("fragment", 0, b"F0"), ("fragment", 1, b"F1"), ("fragment", 2, b"F2"),
                ("end", -1, b"TAIL")]
    assert got == expected
    assert set(seen_clients) == {1}                                      # counted while open
    r = client.get(f"/v1/sessions/{sid}/media.mp4", params={"from_block": 0})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.content == b"".join(d for _, _, d in expected)              # the same pieces, back to back
    assert rt.media_clients == 0                                          # released by both routes
    resumed = client.get(f"/v1/sessions/{sid}/media.mp4")                 # resume: after the last delivered
    assert resumed.content == b"INIT" + b"TAIL"


def test_a_connected_media_client_keeps_a_session_from_idling_out(api):
    h, client = api
    sid = _create(client, {"idle": "pause", "idle_timeout_s": 0.3})
    other = _create(client, {"idle": "pause", "idle_timeout_s": 0.3})
    h.media(sid, "init", -1, b"INIT")                                     # no end: the stream stays open
    with client.websocket_connect(f"/v1/sessions/{sid}/media?key={h.key}") as ws:
        assert ws.receive_json()["type"] == "init"
        ws.receive_bytes()
        deadline = time.monotonic() + 5
        while client.get(f"/v1/sessions/{other}").json()["state"] != "ending":
            assert time.monotonic() < deadline, "the session without a media client did not time out"
            time.sleep(0.05)
        assert client.get(f"/v1/sessions/{sid}").json()["state"] == "preparing"
    assert [m.kind for m in h.producer.sent if m.session_id == other][-1] == "end"
    assert [m.kind for m in h.producer.sent if m.session_id == sid] == ["start"]


def test_errors_have_one_shape_and_the_right_status(api):
    h, client = api
    cases = [("GET", "/v1/sessions/s_nope", 404), ("GET", "/no/such/route", 404), ("PUT", "/v1/sessions", 405),
             ("POST", "/v1/sessions/" + "x" * 80 + "/interrupt", 404)]
    for method, path, status in cases:
        r = client.request(method, path)
        assert r.status_code == status and r.json()["error"]["status"] == status and r.json()["error"]["message"]
    r = client.post("/v1/sessions", files={"image": ("f.png", _face_png(), "image/png")},
                    data={"options": json.dumps({"idle": "pause", "nope": 1})})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid" and "nope" in r.json()["error"]["message"]
    r = client.get("/v1/usage", headers={"Authorization": "Bearer la_" + "0" * 43})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    with client.websocket_connect(f"/v1/sessions/{_create(client)}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "pcm16", "sample_rate": 16000, "bits": 24}))
        err = ws.receive_json()
    assert err["status"] == 422 and "bits" in err["message"]


def test_settings_defaults_fill_options_left_out(api):
    h, client = api
    h.state.settings = ApiSettings(default_idle_timeout_s=42.0)
    sid = _create(client, {"idle": "pause"})
    assert client.get(f"/v1/sessions/{sid}").json()["options"]["idle_timeout_s"] == 42.0
    sid = _create(client, {"idle": "pause", "idle_timeout_s": 7})
    assert client.get(f"/v1/sessions/{sid}").json()["options"]["idle_timeout_s"] == 7.0


def test_readyz_fails_until_the_media_topic_is_read(api):
    h, client = api
    assert client.get("/readyz").json() == {"ready": True}
    h.hub.ready.clear()
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


# ---- the example files and the web page ----------------------------------------------------------------


def test_examples_are_served_from_the_repository_folder_and_nothing_else(tmp_path):
    client = TestClient(create_app(ApiSettings()))                       # no lifespan: no state needed
    folder = examples_dir()
    for name in ("faces/face_812.png", "cyclops_baker.jpg", "music_producer.wav"):
        r = client.get(f"/examples/{name}")
        assert r.status_code == 200 and r.content == (folder / name).read_bytes(), name
    for name in ("NOTICE.md", "../pyproject.toml", "faces/../../pyproject.toml", "%2e%2e/pyproject.toml",
                 "faces/face_000.png", ".hidden.png", "faces//face_812.png"):
        r = client.get(f"/examples/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", name
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "link.png").symlink_to(outside)
    assert example_file("link.png", tmp_path / "ex") is None            # a link out of the folder
    assert example_file("../secret.png", tmp_path / "ex") is None


class _Options(HTMLParser):
    """The <option>s of the page's avatar and speech selects, with their attributes."""

    def __init__(self):
        super().__init__()
        self.select, self.options = None, {"avatar": [], "speech": []}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "select":
            self.select = a.get("id")
        elif tag == "option" and self.select in self.options:
            self.options[self.select].append(a)

    def handle_endtag(self, tag):
        if tag == "select":
            self.select = None


def test_the_page_defaults_to_a_synthetic_face_and_its_speech_and_warns_about_photos():
    html = (STATIC / "index.html").read_text()
    parser = _Options()
    parser.feed(html)
    avatars, speeches = parser.options["avatar"], parser.options["speech"]
    default = next(a for a in avatars if "selected" in a)
    assert fnmatch.fnmatch(default["data-image"], "faces/face_*.png"), default
    for a in avatars:
        if a["value"] == "upload":
            continue
        assert example_file(a["data-image"]) is not None, a                       # every choice is served
        assert example_file(f"{a['data-speech']}.wav") is not None, a
        if a["data-image"].startswith("faces/"):                                  # the demo's pairing
            ident = int(re.search(r"face_(\d+)", a["data-image"]).group(1))
            assert FACE_FOR_SPEECH[a["data-speech"]] == ident, a
        else:
            assert a["data-kind"] == "photo" and a["data-speech"] == a["value"], a
    assert {a["data-speech"] for a in avatars if "data-speech" in a} <= {s["value"] for s in speeches}
    default_speech = [s for s in speeches if "selected" in s]
    assert [s["value"] for s in default_speech] == [default["data-speech"]]
    note = re.search(r'<[^>]+id="model-note"[^>]*>(.*?)</', html, re.S).group(1)
    assert "synthetic 64x64 faces" in note and "blur" in note and "14B" in note


# ---- lifecycle events, timers in Redis, usage ------------------------------------------------------------


def _wait(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_timer_owner_publishes_ready_then_ended_with_reason_duration_and_blocks(api):
    h, client = api
    sid = _create(client, {"idle": "pause", "idle_timeout_s": 0.4})
    assert h.store.r.get(f"la:timerlease:{sid}") == h.state.replica.encode()     # leased to this replica
    h.store.update_session(sid, state="active", lane="lane-0", width=64, height=64)
    _wait(lambda: h.producer.events, what="session.ready")
    ready = h.producer.events[0]
    assert ready["tenant_id"] == "unit" and ready["event"]["type"] == "session.ready"
    assert ready["event"]["data"] == {"lane": "lane-0", "width": 64, "height": 64}
    assert h.producer.flushed_events >= 1                                          # flushed, not just handed over
    _wait(lambda: client.get(f"/v1/sessions/{sid}").json()["state"] == "ending", what="the idle timeout")
    h.store.set_cursor(sid, lane_block=9)                                         # the lane made 10 blocks
    created = h.store.get_session(sid).created
    h.store.update_session(sid, state="ended")
    _wait(lambda: len(h.producer.events) == 2, what="session.ended")
    ended = h.producer.events[1]["event"]
    assert ended["type"] == "session.ended" and ended["session_id"] == sid
    assert ended["data"]["reason"] == "idle_timeout" and ended["data"]["blocks"] == 10
    assert ended["data"]["generated_s"] == pytest.approx(10 * 7680 / 16000)
    assert 0.4 < ended["data"]["duration_s"] <= time.time() - created + 0.01
    assert ended["id"] != ready["event"]["id"] and ended["id"].startswith("evt_")
    _wait(lambda: sid not in h.state.tickers, what="the ticker to stop")
    assert h.store.r.get(f"la:timerlease:{sid}") is None                          # lease given back
    assert sid.encode() not in h.store.r.kv.get("la:timersessions", {})            # and forgotten
    time.sleep(0.3)
    assert len(h.producer.events) == 2                                              # each event once


def test_a_failed_session_gets_session_failed_then_session_ended(api):
    h, client = api
    sid = _create(client)
    h.store.update_session(sid, state="failed", error="the image has no face")
    _wait(lambda: len(h.producer.events) == 2, what="failed + ended")
    (failed, ended) = (r["event"] for r in h.producer.events)
    assert failed["type"] == "session.failed" and failed["data"] == {"error": "the image has no face"}
    assert ended["type"] == "session.ended" and ended["data"]["reason"] == "failed" and ended["data"]["blocks"] == 0


def test_activity_is_kept_in_redis_so_any_replica_can_time_the_session(api):
    h, client = api
    sid = _create(client, {"idle": "pause", "idle_timeout_s": 600})
    t0 = float(h.store.r.hget(f"la:timer:{sid}", "last_activity"))
    time.sleep(0.02)
    assert client.post(f"/v1/sessions/{sid}/keepalive").status_code == 200
    assert float(h.store.r.hget(f"la:timer:{sid}", "last_activity")) > t0
    h.store.r.hset(f"la:timer:{sid}", "last_activity", time.time() - 601)   # as if idle for 601 s (seen anywhere)
    _wait(lambda: client.get(f"/v1/sessions/{sid}").json()["state"] == "ending", what="the idle timeout")
    assert h.store.r.hget(f"la:timer:{sid}", "end_reason") == b"idle_timeout"


def test_usage_reports_the_seconds_and_blocks_the_lanes_counted(api):
    h, client = api
    for seconds in (0.48, 0.48, 0.48):                 # what a lane's decoder records per block
        h.store.add_usage("unit", seconds)
    h.store.add_usage("someone-else", 0.48)
    u = client.get("/v1/usage").json()
    assert u["tenant"] == "unit" and u["day"] == time.strftime("%Y%m%d", time.gmtime())
    assert u["blocks_generated_today"] == 3 and u["seconds_generated_today"] == pytest.approx(3 * 0.48)


def test_media_of_an_ended_session_is_410_gone_unless_still_buffered(api):
    from starlette.testclient import WebSocketDenialResponse

    h, client = api
    sid = _create(client)
    h.store.update_session(sid, state="ended")
    r = client.get(f"/v1/sessions/{sid}/media.mp4")
    assert r.status_code == 410
    assert r.json()["error"]["status"] == 410 and r.json()["error"]["code"] == "gone"
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect(f"/v1/sessions/{sid}/media?key={h.key}"):
            pass
    assert denied.value.status_code == 410 and denied.value.json()["error"]["status"] == 410
    # a session that ended a moment ago whose media is still buffered: served, resume works
    h.media(sid, "init", -1, b"INIT")
    h.media(sid, "fragment", 0, b"F0")
    h.media(sid, "fragment", 1, b"F1")
    h.media(sid, "end", -1, b"TAIL")
    h.media(sid, "end", -1, b"")                        # a replayed end (restarted lane) keeps the tail
    r = client.get(f"/v1/sessions/{sid}/media.mp4", params={"from_block": 1})
    assert r.status_code == 200 and r.content == b"INIT" + b"F1" + b"TAIL"
