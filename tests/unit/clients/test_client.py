"""The Python client package (clients/python, ``liveavatar_client``): no torch, typed errors, audio encoding,
and the sync and asyncio clients against the real session API app served by uvicorn in this process (its
Redis, producer and media hub are the stand-ins of tests/unit/services/test_session_api.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from liveavatar_client import AsyncLiveAvatar, LiveAvatar, errors
from liveavatar_client.types import audio_bytes

from services.common.examples import examples_dir

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
CLIENT = ROOT / "clients" / "python"


# ---- the package itself --------------------------------------------------------------------------------

def test_importing_the_client_imports_neither_torch_nor_numpy():
    code = ("import sys, liveavatar_client, liveavatar_client.aio, liveavatar_client.sync, liveavatar_client.errors; "
            "print(sorted(m for m in ('torch', 'numpy', 'models', 'services') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=CLIENT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    # negative control: the same check sees a module that does import numpy
    r = subprocess.run([sys.executable, "-c", "import sys, liveavatar_client.media; print('numpy' in sys.modules)"],
                       capture_output=True, text=True, timeout=60, cwd=CLIENT)
    assert r.stdout.strip() == "True", r.stderr


def test_the_package_declares_no_torch_anywhere():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "liveavatar-client"
    declared = list(project["dependencies"]) + [d for ds in project["optional-dependencies"].values() for d in ds]
    assert declared and not [d for d in declared if d.lower().startswith("torch")]
    assert "pipecat-ai" in " ".join(project["optional-dependencies"]["pipecat"])
    installed = metadata.requires("liveavatar-client") or []                 # the installed distribution agrees
    assert installed and not [d for d in installed if d.lower().startswith("torch")]
    assert metadata.distribution("liveavatar-client").read_text("top_level.txt") in (None, "liveavatar_client\n")


@pytest.mark.parametrize("status,cls", [(400, errors.BadRequest), (401, errors.Unauthorized),
                                        (402, errors.QuotaExhausted), (404, errors.NotFound), (409, errors.Conflict),
                                        (413, errors.TooLarge), (415, errors.UnsupportedMediaType),
                                        (422, errors.Invalid), (429, errors.TooManyRequests),
                                        (503, errors.Unavailable), (502, errors.ServerError), (418, errors.ApiError)])
def test_the_error_shape_maps_to_one_class_per_status(status, cls):
    body = json.dumps({"error": {"status": status, "code": "the_code", "message": "the message"}})
    err = errors.from_body(status, body.encode(), {"retry-after": "7"})
    assert type(err) is cls and err.status == status and err.code == "the_code" and err.message == "the message"
    assert err.retry_after == 7.0 and isinstance(err, errors.ApiError)


def test_other_bodies_and_websocket_close_codes():
    err = errors.from_body(502, b"<html>bad gateway</html>")
    assert isinstance(err, errors.ServerError) and "bad gateway" in err.message and err.retry_after is None
    assert isinstance(errors.from_ws_close(4404, "gone"), errors.NotFound)
    assert isinstance(errors.from_ws_close(4422), errors.Invalid)
    assert errors.from_ws_close(1000) is None and errors.from_ws_close(None) is None


def test_audio_is_encoded_for_the_websocket_without_changing_samples():
    x16 = np.array([0, 1, -1, 32767, -32768], np.int16)
    assert audio_bytes(x16) == ("pcm16", 1, x16.astype("<i2").tobytes())
    xf = np.array([0.0, 0.5, -2.0], np.float64)
    fmt, ch, data = audio_bytes(xf)
    assert (fmt, ch) == ("f32", 1) and np.array_equal(np.frombuffer(data, "<f4"), [0.0, 0.5, -1.0])
    fmt, _, data = audio_bytes(xf, "pcm16")
    assert fmt == "pcm16" and list(np.frombuffer(data, "<i2")) == [0, 16384, -32767]
    fmt, _, data = audio_bytes(np.array([0, 128, 255], np.uint8))               # unsigned: centred on 128
    assert fmt == "f32" and np.allclose(np.frombuffer(data, "<f4"), [-1.0, 0.0, 127 / 128])
    stereo = np.zeros((10, 2), np.int16)
    assert audio_bytes(stereo)[:2] == ("pcm16", 2)
    assert audio_bytes(b"\x01\x02", "f32") == ("f32", 1, b"\x01\x02")
    with pytest.raises(ValueError):
        audio_bytes(np.zeros((2, 2, 2)))


# ---- against the real app, served by uvicorn ------------------------------------------------------------

FACE = examples_dir() / "faces" / "face_812.png"


def _pcm_sent(h, sid) -> list:
    return [m for m in h.producer.sent if m.session_id == sid and m.kind == "pcm"]


def test_sync_client_creates_streams_reads_media_and_ends(live):
    h = live
    with LiveAvatar(h.base, h.key) as la:
        s = la.create_session(FACE, {"idle": "pause", "seed": 3})
        assert s.info.state in ("preparing", "waiting", "active") and s.info.options["seed"] == 3
        assert [i.id for i in la.list_sessions()] == [s.id]
        rate, n = 24000, 24000 * 3 // 4                                      # 0.75 s at 24 kHz, int16
        x = (np.sin(np.arange(n) / 7.0) * 8000).astype(np.int16)
        t0 = time.monotonic()
        report = s.stream_audio(x, rate, speed=None)                          # as fast as the socket takes it
        assert time.monotonic() - t0 < 5 and report.chunks == 8 and report.refused_chunks == 0
        assert abs(report.seconds - 0.75) < 1e-9
        kinds = [m.kind for m in h.producer.sent if m.session_id == s.id]
        assert kinds[-1] == "end_utterance" and "pcm" in kinds
        assert h.store.cursor_int(s.id, "accepted_samples") == n * 16000 // rate     # resampled to 16 kHz by the API

        for kind, block, data in [("init", -1, b"INIT"), ("fragment", 0, b"F0"), ("fragment", 1, b"F1"),
                                  ("end", -1, b"TAIL")]:
            h.media(s.id, kind, block, data)
        init, pieces = s.read_media(timeout_s=10, from_block=0)
        assert init == b"INIT" and [(p.type, p.block, p.data) for p in pieces] == [
            ("fragment", 0, b"F0"), ("fragment", 1, b"F1"), ("end", -1, b"TAIL")]

        s.interrupt()
        s.keepalive()
        assert [m.kind for m in h.producer.sent if m.session_id == s.id][-1] == "interrupt"
        s.end()
        with pytest.raises(errors.Conflict):
            s.interrupt()
        with pytest.raises(errors.NotFound):
            la.get_session("s_nope")
        with pytest.raises(errors.Invalid) as bad:
            la.create_session(FACE, {"surprise": 1})
        assert bad.value.status == 422 and "surprise" in bad.value.message
        with pytest.raises(errors.UnsupportedMediaType):
            la.create_session(b"GIF89a" + b"\0" * 64)
    with LiveAvatar(h.base, "la_wrong") as intruder:
        with pytest.raises(errors.Unauthorized):
            intruder.list_sessions()
        with pytest.raises(errors.Unauthorized):                              # a refused WebSocket handshake
            intruder.session(s.id).read_media(timeout_s=5)


def test_sync_stream_paces_at_real_time_and_counts_refused_chunks(live):
    h = live
    with LiveAvatar(h.base, h.key) as la:
        s = la.create_session(FACE.read_bytes(), {"idle": "pause"})
        t0 = time.monotonic()
        report = s.stream_audio(np.zeros(8000, np.float32), 16000, chunk_s=0.1)      # 0.5 s, real time
        took = time.monotonic() - t0
        assert 0.38 <= took < 3.0, took                                       # 5 chunks: the last leaves at 0.4 s
        sent = [t for _, t in report.sent_at]
        assert np.allclose(np.diff(sent), 0.1, atol=0.05)
        h.store.set_cursor(s.id, accepted_samples=16000 * 2000)               # far too much queued
        report = s.stream_audio(np.zeros(3200, np.float32), 16000, speed=None)
        assert report.refused_chunks == 2 and report.errors == []


def test_async_client_streams_and_reads_media(live):
    h = live

    async def main():
        async with AsyncLiveAvatar(h.base, h.key) as la:
            s = await la.create_session(FACE, {"idle": "pause"})
            report = await s.stream_audio(np.zeros(4800, np.float32), 48000, speed=None)
            assert report.chunks == 1 and abs(report.seconds - 0.1) < 1e-9
            for kind, block, data in [("init", -1, b"I"), ("fragment", 0, b"A"), ("end", -1, b"Z")]:
                h.media(s.id, kind, block, data)
            got = []
            async with s.media(from_block=0, timeout_s=10) as media:
                async for piece in media:
                    got.append((piece.type, piece.block, piece.data))
            assert got == [("init", -1, b"I"), ("fragment", 0, b"A"), ("end", -1, b"Z")]
            await s.interrupt()
            await s.end()
            with pytest.raises(errors.Conflict):
                await s.keepalive()
            with pytest.raises(errors.NotFound):
                async with la.session("s_nope").audio(16000):
                    pass
            return s.id

    sid = asyncio.run(main())
    assert h.store.cursor_int(sid, "accepted_samples") == 1600


@pytest.mark.parametrize("script", ["stream_wav.py", "speak.py", "pipecat_wav.py", "webrtc_receive.py"])
def test_the_example_scripts_start(script):
    """docs/integrations.md's runnable examples import and parse their arguments (they run against a stack)."""
    r = subprocess.run([sys.executable, str(CLIENT / "examples" / script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
