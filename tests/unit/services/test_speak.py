"""``POST /v1/sessions/{id}/speak`` in-process (the harness of test_session_api: stand-in Redis, recording
producer): the backend's audio goes on the bus as one utterance at 16 kHz, bad input is a clear 4xx, a
missing backend is a 503, and espeak-ng (when installed) really speaks."""

from __future__ import annotations

import io
import shutil
import wave

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.session_api.app import create_app
from services.session_api.bus import CHUNK_SAMPLES
from services.session_api.routes.speak import clean_text
from services.session_api.tenants import create_tenant
from services.session_api.tts import EspeakNG, NoTTS, TTSBackend, TTSInputError, make_backend
from tests.unit.services.test_session_api import ON_LOOP, Harness, _create

pytestmark = pytest.mark.unit


def _wav(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.astype("<i2").tobytes())
    return buf.getvalue()


class ToneTTS:
    """A backend whose 'speech' is a 300 Hz tone of 0.1 s per character, at 22.05 kHz; records its calls."""

    name = "tone"
    rate = 22050

    def __init__(self):
        self.calls: list[tuple[str, str | None]] = []

    def available(self) -> bool:
        return True

    def synthesize(self, text: str, voice: str | None, timeout_s: float) -> bytes:
        if voice == "klingon":
            raise TTSInputError("unknown voice 'klingon'")
        self.calls.append((text, voice))
        n = int(0.1 * len(text) * self.rate)
        return _wav(np.sin(2 * np.pi * 300 * np.arange(n) / self.rate) * 10000, self.rate)


@pytest.fixture()
def api_tts():
    ON_LOOP.clear()
    h = Harness(max_queued_audio_s=1000.0, tts_max_chars=50)
    app = create_app(h.settings, connect=h.connect)
    with TestClient(app) as client:
        _, key = create_tenant(h.store, "unit", max_sessions=2)
        client.headers["Authorization"] = f"Bearer {key}"
        h.key = key
        yield h, app, client
    assert ON_LOOP == [], f"blocking calls on the event loop: {sorted(set(ON_LOOP))}"


def test_spoken_text_goes_on_the_bus_as_one_utterance_at_16k(api_tts):
    h, app, client = api_tts
    app.state.tts = tts = ToneTTS()
    sid = _create(client)
    r = client.post(f"/v1/sessions/{sid}/speak", json={"text": "  hello\n\tworld ", "voice": "en-us"})
    assert r.status_code == 202, r.text
    assert tts.calls == [("hello world", "en-us")]                     # control characters cleaned
    seconds = 0.1 * len("hello world")
    assert r.json() == {"accepted_seconds": round(seconds, 3), "backend": "tone", "characters": 11}
    sent = h.producer.sent[1:]
    n = round(seconds * 16000)
    assert [m.kind for m in sent] == ["pcm"] * -(-n // CHUNK_SAMPLES) + ["end_utterance"]
    assert h.store.cursor_int(sid, "accepted_samples") == n
    assert h.producer.flushes[-1] == len(h.producer.sent)               # flushed after the utterance's end


@pytest.mark.parametrize("body,status", [
    ({"text": ""}, 422), ({"text": " \n\t "}, 422), ({"text": "x" * 51}, 413), ({"text": "x" * 20001}, 422),
    ({"text": "hi", "surprise": 1}, 422), ({"text": 5}, 422), ({}, 422), ({"text": "hi", "voice": "klingon"}, 422),
    ({"text": "hi", "voice": "v" * 41}, 422),
])
def test_bad_input_is_a_clear_4xx_and_nothing_is_sent(api_tts, body, status):
    h, app, client = api_tts
    app.state.tts = ToneTTS()
    sid = _create(client)
    before = len(h.producer.sent)
    r = client.post(f"/v1/sessions/{sid}/speak", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    assert len(h.producer.sent) == before


def test_no_backend_is_a_503_and_ended_or_unknown_sessions_are_409_and_404(api_tts):
    h, app, client = api_tts
    sid = _create(client)
    app.state.tts = NoTTS()
    r = client.post(f"/v1/sessions/{sid}/speak", json={"text": "hello"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    app.state.tts = ToneTTS()
    assert client.post("/v1/sessions/s_nope/speak", json={"text": "hello"}).status_code == 404
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.post(f"/v1/sessions/{sid}/speak", json={"text": "hello"}).status_code == 409
    assert client.post(f"/v1/sessions/{sid}/speak", json={"text": "hello"},
                       headers={"Authorization": "Bearer la_wrong"}).status_code == 401


def test_a_missing_program_or_unknown_backend_is_not_available():
    assert not EspeakNG(binary="no-such-espeak-binary").available()
    assert not make_backend("no-such-backend").available()
    assert isinstance(make_backend("espeak-ng"), TTSBackend) and isinstance(ToneTTS(), TTSBackend)


def test_clean_text_replaces_controls_and_lone_surrogates():
    assert clean_text("a\x00b\u200bc\ud800d\n e") == "a b c d e"      # Cc, Cf, Cs and a newline
    assert clean_text("  one\t\ttwo  ") == "one two"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_speaks_longer_text_longer_and_refuses_unknown_voices():
    from models.inputs import load_audio

    tts = EspeakNG()
    short = load_audio(tts.synthesize("Hello.", None, 30), 60)
    long = load_audio(tts.synthesize("Hello. This sentence is a good deal longer than the first one.", "en-us", 30), 60)
    assert 0.3 < len(short) / 16000 < 2.0 and len(long) > 3 * len(short)
    assert np.sqrt(np.mean(long ** 2)) > 0.02                              # speech, not silence
    with pytest.raises(TTSInputError):
        tts.synthesize("hi", "zzzz", 30)
    with pytest.raises(TTSInputError):
        tts.synthesize("hi", "--help", 30)                                 # not passed as an option
