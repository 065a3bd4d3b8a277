"""The session API end to end on the local stack: real broker, Redis, services, lanes and HTTP/WebSockets."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK_S = 0.48


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def create(client, key, image: bytes, options: dict | str | None = None, ctype="image/jpeg"):
    opts = options if isinstance(options, str) else json.dumps(options or {})
    return client.post("/v1/sessions", headers=auth(key), files={"image": ("img", image, ctype)},
                       data={"options": opts})


def ws_url(api_stack, sid, what, key, query=""):
    return f"ws://127.0.0.1:{api_stack['port']}/v1/sessions/{sid}/{what}?key={key}{query}"


def wav_pcm16(path: Path) -> tuple[bytes, int]:
    """The example's float WAV as pcm16 bytes at its own rate (24 kHz) — the client does no resampling."""
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes(), rate


def stream_audio_ws(api_stack, sid, key, pcm: bytes, rate: int, chunk_s=0.1, pace=1.0):
    step = int(rate * chunk_s) * 2
    with connect(ws_url(api_stack, sid, "audio", key)) as ws:
        ws.send(json.dumps({"format": "pcm16", "sample_rate": rate, "channels": 1}))
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        t0 = time.monotonic()
        for i in range(0, len(pcm), step):
            ws.send(pcm[i:i + step])
            delay = t0 + (i // step + 1) * chunk_s * pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        ws.send(json.dumps({"type": "end"}))
        while True:
            m = json.loads(ws.recv(timeout=30))
            if m["type"] == "utterance_end":
                return
            assert m["type"] != "error", m


def read_media_ws(api_stack, sid, key, until_block=None, timeout_s=180, query=""):
    """(init bytes, [(block, bytes)]) read from the media WebSocket until ``until_block`` or the end."""
    init, frags = b"", []
    deadline = time.monotonic() + timeout_s
    with connect(ws_url(api_stack, sid, "media", key, query)) as ws:
        while time.monotonic() < deadline:
            head = json.loads(ws.recv(timeout=timeout_s))
            data = ws.recv(timeout=30) if head["bytes"] else b""
            if head["type"] == "init":
                init = data
            elif head["type"] == "fragment":
                frags.append((head["block"], data))
                if until_block is not None and head["block"] >= until_block:
                    return init, frags
            elif head["type"] == "end":
                frags.append((-1, data))
                return init, frags
    raise TimeoutError("media did not arrive in time")


def ffprobe(path: Path) -> dict:
    r = subprocess.run([shutil.which("ffprobe") or "ffprobe", "-v", "error", "-show_streams", "-show_format",
                        "-of", "json", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_full_flow_with_the_examples(api_stack, make_tenant, client, examples, tmp_path):
    key = make_tenant("flow")
    r = create(client, key, (examples / "kitchen_grandmother.jpg").read_bytes(), {"seed": 2, "idle": "pause"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    pcm, rate = wav_pcm16(examples / "kitchen_grandmother.wav")
    pcm = pcm[: rate * 2 * 4]                                         # 4 s of speech keeps CI short
    import threading

    sender = threading.Thread(target=stream_audio_ws, args=(api_stack, sid, key, pcm, rate), kwargs={"pace": 0.5})
    sender.start()
    init, frags = read_media_ws(api_stack, sid, key, until_block=8)
    sender.join()
    client.delete(f"/v1/sessions/{sid}", headers=auth(key))
    blocks = [b for b, _ in frags if b >= 0]
    assert blocks == list(range(len(blocks)))
    out = tmp_path / "flow.mp4"
    out.write_bytes(init + b"".join(d for _, d in frags))
    info = ffprobe(out)
    streams = {s["codec_type"]: s for s in info["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["video"]["avg_frame_rate"] == "25/1"
    assert streams["audio"]["codec_name"] == "aac"
    audio_s = len(pcm) / 2 / rate
    assert abs(float(info["format"]["duration"]) - audio_s) <= BLOCK_S + 0.05, (info["format"]["duration"], audio_s)
    usage = client.get("/v1/usage", headers=auth(key)).json()
    assert usage["seconds_generated_today"] >= 4.0


def test_tenants_are_isolated_and_keys_are_checked(make_tenant, client, examples):
    a, b = make_tenant("iso-a"), make_tenant("iso-b")
    sid = create(client, a, (examples / "cyclops_baker.jpg").read_bytes(), {"idle": "pause"}).json()["id"]
    assert client.get(f"/v1/sessions/{sid}", headers=auth(a)).status_code == 200
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/interrupt"), ("POST", "/keepalive")):
        r = client.request(method, f"/v1/sessions/{sid}{path}", headers=auth(b))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path, r.text)
    assert sid not in [s["id"] for s in client.get("/v1/sessions", headers=auth(b)).json()]
    assert client.get("/v1/sessions").status_code == 401
    assert client.get("/v1/sessions", headers=auth("la_" + "x" * 43)).status_code == 401
    assert client.get("/v1/sessions", headers={"Authorization": "Basic abc"}).status_code == 401
    with pytest.raises(InvalidStatus) as denied:                     # the WebSocket handshake is refused
        read_media_ws({"port": client.base_url.port}, sid, b, timeout_s=5)
    assert denied.value.response.status_code == 404
    client.delete(f"/v1/sessions/{sid}", headers=auth(a))


def test_quotas_429_with_retry_after_and_402(api_stack, make_tenant, client, examples):
    img = (examples / "cyclops_baker.jpg").read_bytes()
    key = make_tenant("quota", max_sessions=1)
    first = create(client, key, img, {"idle": "pause"})
    assert first.status_code == 201
    second = create(client, key, img, {"idle": "pause"})
    assert second.status_code == 429 and int(second.headers["Retry-After"]) > 0
    client.delete(f"/v1/sessions/{first.json()['id']}", headers=auth(key))
    assert create(client, key, img, {"idle": "pause"}).status_code == 201    # a slot is free again
    cheap = make_tenant("minutes", minutes_per_day=0.01)                     # 0.6 s of video a day
    sid = create(client, cheap, img, {"idle": "silence"}).json()["id"]       # idle motion uses the minutes
    deadline = time.monotonic() + 60
    while client.get("/v1/usage", headers=auth(cheap)).json()["seconds_generated_today"] < 0.6:
        assert time.monotonic() < deadline, "no usage was metered"
        time.sleep(0.5)
    client.delete(f"/v1/sessions/{sid}", headers=auth(cheap))
    r = create(client, cheap, img, {"idle": "pause"})
    assert r.status_code == 402 and r.json()["error"]["code"] == "quota_exhausted"


def test_interrupt_drops_queued_speech_and_the_avatar_goes_idle(api_stack, make_tenant, client, examples,
                                                                tmp_path):
    key = make_tenant("interrupt")
    sid = create(client, key, (examples / "music_producer.jpg").read_bytes(), {"idle": "pause"}).json()["id"]
    wav = (examples / "music_producer.wav").read_bytes()
    r = client.post(f"/v1/sessions/{sid}/audio", headers=auth(key), files={"file": ("s.wav", wav, "audio/wav")})
    assert r.status_code == 202, r.text
    time.sleep(1.0)
    assert client.post(f"/v1/sessions/{sid}/interrupt", headers=auth(key)).status_code == 202
    init, frags = read_media_ws(api_stack, sid, key, until_block=int(r.json()["accepted_seconds"] / BLOCK_S) - 1)
    client.delete(f"/v1/sessions/{sid}", headers=auth(key))
    out = tmp_path / "interrupt.mp4"
    out.write_bytes(init + b"".join(d for b, d in frags if b >= 0))
    with av.open(str(out)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    rate = 32000
    per_block = [np.sqrt(np.mean(audio[int(i * BLOCK_S * rate):int((i + 1) * BLOCK_S * rate)] ** 2))
                 for i in range(len(audio) // int(BLOCK_S * rate))]
    assert max(per_block[:2]) > 0.01                  # speech before the interrupt
    assert max(per_block[-5:]) < 1e-3                 # silence (idle) after it: the queued speech was dropped


def test_idle_timeout_and_maximum_duration_end_sessions(make_tenant, client, examples):
    key = make_tenant("lifetime")
    img = (examples / "cyclops_baker.jpg").read_bytes()
    idle = create(client, key, img, {"idle": "pause", "idle_timeout_s": 2}).json()["id"]
    capped = create(client, key, img, {"idle": "silence", "max_duration_s": 3, "idle_timeout_s": 600}).json()["id"]
    kept = create(client, key, img, {"idle": "pause", "idle_timeout_s": 5}).json()["id"]
    t0 = time.monotonic()
    states = {}
    while time.monotonic() - t0 < 9:
        client.post(f"/v1/sessions/{kept}/keepalive", headers=auth(key))          # keep-alive extends it
        time.sleep(0.5)
    for sid in (idle, capped, kept):
        states[sid] = client.get(f"/v1/sessions/{sid}", headers=auth(key)).json()["state"]
    assert states[idle] in ("ending", "ended") and states[capped] in ("ending", "ended")
    assert states[kept] not in ("ending", "ended")
    client.delete(f"/v1/sessions/{kept}", headers=auth(key))


def test_resume_after_a_dropped_media_connection(api_stack, make_tenant, client, examples):
    key = make_tenant("resume")
    sid = create(client, key, (examples / "cyclops_baker.jpg").read_bytes(), {"idle": "silence"}).json()["id"]
    init1, frags1 = read_media_ws(api_stack, sid, key, until_block=3)          # then the connection drops
    time.sleep(1.5)                                                            # the stream goes on meanwhile
    init2, frags2 = read_media_ws(api_stack, sid, key, until_block=frags1[-1][0] + 4)
    client.delete(f"/v1/sessions/{sid}", headers=auth(key))
    assert init1 and init2 == init1                                            # a fresh init segment
    got = [b for b, _ in frags1] + [b for b, _ in frags2]
    assert got == list(range(len(got))), got                                   # nothing skipped or repeated


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is tiny and invalid): size is checked first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def _image(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    color = {"RGBA": (200, 10, 10, 128), "CMYK": (0, 128, 255, 0), "RGB": (10, 200, 10)}[mode]
    Image.new(mode, (96, 64), color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("case,status", [
    ("ok_png_alpha", 201), ("ok_cmyk_jpeg", 201), ("zero_length", 400), ("unsupported_type", 415),
    ("huge_image", 413), ("truncated_jpeg", 400), ("bad_json", 400), ("wrong_json_types", 422),
    ("extra_fields", 422), ("missing_key", 401), ("bad_key", 401), ("corrupt_wav", 400),
    ("empty_audio_upload", 400), ("audio_wrong_type", 415),
])
def test_bad_input_gets_the_right_4xx_and_harms_no_other_session(case, status, make_tenant, client, examples):
    key = make_tenant("bad")
    jpg = (examples / "cyclops_baker.jpg").read_bytes()
    bystander = create(client, key, jpg, {"idle": "silence"}).json()["id"]
    before = client.get(f"/v1/sessions/{bystander}", headers=auth(key)).json()
    headers = auth(key)
    if case.startswith(("corrupt_wav", "empty_audio", "audio_wrong")):
        target = create(client, key, jpg, {"idle": "pause"}).json()["id"]
        payload = {"corrupt_wav": ("x.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage", "audio/wav"),
                   "empty_audio_upload": ("x.wav", b"", "audio/wav"),
                   "audio_wrong_type": ("x.txt", b"hello", "text/plain")}[case]
        r = client.post(f"/v1/sessions/{target}/audio", headers=headers, files={"file": payload})
        client.delete(f"/v1/sessions/{target}", headers=headers)
    else:
        image, ctype, opts = jpg, "image/jpeg", {"idle": "pause"}
        if case == "ok_png_alpha":
            image, ctype = _image("RGBA", "PNG"), "image/png"
        elif case == "ok_cmyk_jpeg":
            image = _image("CMYK", "JPEG")
        elif case == "zero_length":
            image = b""
        elif case == "unsupported_type":
            image, ctype = b"GIF89a" + b"\x00" * 64, "image/gif"
        elif case == "huge_image":
            image, ctype = _png_header(10_000, 10_000), "image/png"
        elif case == "truncated_jpeg":
            image = jpg[: len(jpg) // 3]
        elif case == "bad_json":
            opts = "{not json"
        elif case == "wrong_json_types":
            opts = {"seed": "abc", "idle_timeout_s": "soon"}
        elif case == "extra_fields":
            opts = {"seed": 1, "surprise": True}
        elif case == "missing_key":
            headers = {}
        elif case == "bad_key":
            headers = auth("la_wrong")
        r = client.post("/v1/sessions", headers=headers, files={"image": ("i", image, ctype)},
                        data={"options": opts if isinstance(opts, str) else json.dumps(opts)})
        if r.status_code == 201:
            client.delete(f"/v1/sessions/{r.json()['id']}", headers=auth(key))
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    if status >= 400:
        assert set(body) == {"error"} and body["error"]["status"] == status and body["error"]["message"]
    after = client.get(f"/v1/sessions/{bystander}", headers=auth(key)).json()
    assert after["state"] == before["state"] or after["state"] == "active"
    client.delete(f"/v1/sessions/{bystander}", headers=auth(key))
