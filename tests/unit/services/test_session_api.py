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
        self.lock = threading.Lock()

    def __getattr__(self, name):
        raise AttributeError(f"FakeRedis has no {name!r}: the API uses a command the test does not know")

    def _b(self, v):
        return v if isinstance(v, bytes) else str(v).encode()

    def get(self, k):
        _off_loop("redis.get")
        return self.kv.get(k)

    def set(self, k, v, ex=None):
        _off_loop("redis.set")
        self.kv[k] = self._b(v)

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

    def pipeline(self):
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

    def send(self, topic, key=None, value=None):
        _off_loop("producer.send")
        msg = decode(value)
        assert key == msg.header.session_id.encode()
        self.sent.append(msg.header)

    def flush(self):
        _off_loop("producer.flush")
        self.flushes.append(len(self.sent))

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


def test_too_much_queued_audio_is_refused_with_429_and_nothing_is_sent(api):
    h, client = api
    sid = _create(client)
    h.state.settings = ApiSettings(max_queued_audio_s=1.0)
    h.store.set_cursor(sid, accepted_samples=16000 * 3)            # 3 s accepted, nothing generated
    before = len(h.producer.sent)
    with client.websocket_connect(f"/v1/sessions/{sid}/audio?key={h.key}") as ws:
        ws.send_text(json.dumps({"format": "f32", "sample_rate": 16000}))
        assert ws.receive_json()["type"] == "ready"
        ws.send_bytes(np.zeros(1600, "<f4").tobytes())
        err = ws.receive_json()
    assert err["type"] == "error" and err["status"] == 429 and "queued" in err["message"]
    assert len(h.producer.sent) == before


def test_interrupt_and_delete_are_flushed_events_after_the_audio(api):
    h, client = api
    sid = _create(client)
    assert client.post(f"/v1/sessions/{sid}/interrupt").status_code == 202
    assert h.producer.sent[-1].kind == "interrupt" and h.producer.flushes[-1] == len(h.producer.sent)
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert h.producer.sent[-1].kind == "end" and h.producer.flushes[-1] == len(h.producer.sent)
    assert client.get(f"/v1/sessions/{sid}").json()["state"] == "ending"
    assert client.post(f"/v1/sessions/{sid}/interrupt").status_code == 409
    assert sid not in h.state.runtimes


def test_http_and_websocket_media_serve_the_same_tracked_stream(api):
    h, client = api
    sid = _create(client)
    rt = h.state.runtimes[sid]
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
