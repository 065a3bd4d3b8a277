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
from liveavatar_client import LiveAvatar, Session, errors
from liveavatar_client.errors import ApiError, NotFound
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK_S = 0.48
CODES = {400: "bad_request", 401: "unauthorized", 413: "too_large", 415: "unsupported_media_type", 422: "invalid"}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def la(api_stack, key) -> LiveAvatar:
    """The project's Python client (clients/python), as a product would use it."""
    return LiveAvatar(api_stack["base"], key, timeout=60)


def create(api_stack, key, image: bytes, options: dict | str | None = None, ctype=None) -> Session:
    """``POST /v1/sessions`` through the client; an error response raises its typed ``ApiError``."""
    return la(api_stack, key).create_session(image, options, filename="img", content_type=ctype)


def status_of(call) -> tuple[int, ApiError | None]:
    """(HTTP status, the typed error or None) of a client call that answers 2xx or raises."""
    try:
        call()
    except ApiError as exc:
        return exc.status, exc
    return 200, None


def wav_pcm16(path: Path) -> tuple[bytes, int]:
    """The example's float WAV as pcm16 bytes at its own rate (24 kHz) — the client does no resampling."""
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes(), rate


def stream_audio_ws(session: Session, pcm: bytes, rate: int, chunk_s=0.1, speed=1.0):
    report = session.stream_audio(pcm, rate, fmt="pcm16", chunk_s=chunk_s, speed=speed, end_timeout_s=30)
    assert report.errors == [], report.errors


def read_media_ws(session: Session, until_block=None, timeout_s=180, from_block=None):
    """(init bytes, [(block, bytes)]) read from the media WebSocket until ``until_block`` or the end (-1)."""
    init, pieces = session.read_media(until_block, timeout_s=timeout_s, from_block=from_block)
    return init, [(p.block if p.type == "fragment" else -1, p.data) for p in pieces]


def ffprobe(path: Path) -> dict:
    r = subprocess.run([shutil.which("ffprobe") or "ffprobe", "-v", "error", "-show_streams", "-show_format",
                        "-of", "json", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_full_flow_with_the_examples(api_stack, make_tenant, client, examples, tmp_path):
    key = make_tenant("flow")
    session = create(api_stack, key, (examples / "kitchen_grandmother.jpg").read_bytes(), {"seed": 2, "idle": "pause"})
    pcm, rate = wav_pcm16(examples / "kitchen_grandmother.wav")
    pcm = pcm[: rate * 2 * 4]                                         # 4 s of speech keeps CI short
    import threading

    sender = threading.Thread(target=stream_audio_ws, args=(session, pcm, rate), kwargs={"speed": 2.0})
    sender.start()
    init, frags = read_media_ws(session, until_block=8)
    sender.join()
    session.end()
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


def test_tenants_are_isolated_and_keys_are_checked(api_stack, make_tenant, client, examples):
    a, b = make_tenant("iso-a"), make_tenant("iso-b")
    sid = create(api_stack, a, (examples / "cyclops_baker.jpg").read_bytes(), {"idle": "pause"}).id
    assert client.get(f"/v1/sessions/{sid}", headers=auth(a)).status_code == 200
    other = la(api_stack, b).session(sid)                            # tenant b's handle on a's session
    for name, call in (("GET", other.refresh), ("DELETE", other.end), ("interrupt", other.interrupt),
                       ("keepalive", other.keepalive)):
        status, err = status_of(call)
        assert status == 404 and err.code == "not_found", (name, status, err)
    assert sid not in [s.id for s in la(api_stack, b).list_sessions()]
    assert client.get("/v1/sessions").status_code == 401
    assert client.get("/v1/sessions", headers=auth("la_" + "x" * 43)).status_code == 401
    assert client.get("/v1/sessions", headers={"Authorization": "Basic abc"}).status_code == 401
    with pytest.raises(NotFound):                                     # the WebSocket handshake is refused
        read_media_ws(other, timeout_s=5)
    la(api_stack, a).session(sid).end()


def test_quotas_429_with_retry_after_and_402(api_stack, make_tenant, client, examples):
    img = (examples / "cyclops_baker.jpg").read_bytes()
    key = make_tenant("quota", max_sessions=1)
    first = create(api_stack, key, img, {"idle": "pause"})
    status, err = status_of(lambda: create(api_stack, key, img, {"idle": "pause"}))
    assert status == 429 and err.retry_after > 0
    first.end()
    create(api_stack, key, img, {"idle": "pause"})                   # a slot is free again
    cheap = make_tenant("minutes", minutes_per_day=0.01)              # 0.6 s of video a day
    metered = create(api_stack, cheap, img, {"idle": "silence"})      # idle motion uses the minutes
    deadline = time.monotonic() + 60
    while la(api_stack, cheap).usage()["seconds_generated_today"] < 0.6:
        assert time.monotonic() < deadline, "no usage was metered"
        time.sleep(0.5)
    metered.end()
    status, err = status_of(lambda: create(api_stack, cheap, img, {"idle": "pause"}))
    assert status == 402 and err.code == "quota_exhausted"


def test_interrupt_drops_queued_speech_and_the_avatar_goes_idle(api_stack, make_tenant, client, examples,
                                                                tmp_path):
    key = make_tenant("interrupt")
    session = create(api_stack, key, (examples / "music_producer.jpg").read_bytes(), {"idle": "pause"})
    accepted = session.send_audio_file(examples / "music_producer.wav", content_type="audio/wav")
    time.sleep(1.0)
    session.interrupt()
    init, frags = read_media_ws(session, until_block=int(accepted / BLOCK_S) - 1)
    session.end()
    out = tmp_path / "interrupt.mp4"
    out.write_bytes(init + b"".join(d for b, d in frags if b >= 0))
    with av.open(str(out)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    rate = 32000
    per_block = [np.sqrt(np.mean(audio[int(i * BLOCK_S * rate):int((i + 1) * BLOCK_S * rate)] ** 2))
                 for i in range(len(audio) // int(BLOCK_S * rate))]
    assert max(per_block[:2]) > 0.01                  # speech before the interrupt
    assert max(per_block[-5:]) < 1e-3                 # silence (idle) after it: the queued speech was dropped


def test_idle_timeout_and_maximum_duration_end_sessions(api_stack, make_tenant, client, examples):
    key = make_tenant("lifetime")
    img = (examples / "cyclops_baker.jpg").read_bytes()
    idle = create(api_stack, key, img, {"idle": "pause", "idle_timeout_s": 2})
    capped = create(api_stack, key, img, {"idle": "silence", "max_duration_s": 3, "idle_timeout_s": 600})
    kept = create(api_stack, key, img, {"idle": "pause", "idle_timeout_s": 5})
    t0 = time.monotonic()
    while time.monotonic() - t0 < 9:
        kept.keepalive()                                                        # keep-alive extends it
        time.sleep(0.5)
    states = {s.id: s.refresh().state for s in (idle, capped, kept)}
    assert states[idle.id] in ("ending", "ended") and states[capped.id] in ("ending", "ended")
    assert states[kept.id] not in ("ending", "ended")
    kept.end()


def test_resume_after_a_dropped_media_connection(api_stack, make_tenant, client, examples):
    key = make_tenant("resume")
    session = create(api_stack, key, (examples / "cyclops_baker.jpg").read_bytes(), {"idle": "silence"})
    init1, frags1 = read_media_ws(session, until_block=3)                      # then the connection drops
    time.sleep(1.5)                                                            # the stream goes on meanwhile
    init2, frags2 = read_media_ws(session, until_block=frags1[-1][0] + 4)
    session.end()
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
def test_bad_input_gets_the_right_4xx_and_harms_no_other_session(case, status, api_stack, make_tenant, client,
                                                                 examples):
    key = make_tenant("bad")
    jpg = (examples / "cyclops_baker.jpg").read_bytes()
    bystander = create(api_stack, key, jpg, {"idle": "silence"})
    before = bystander.refresh()
    if case.startswith(("corrupt_wav", "empty_audio", "audio_wrong")):
        target = create(api_stack, key, jpg, {"idle": "pause"})
        name, data, ctype = {"corrupt_wav": ("x.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage", "audio/wav"),
                             "empty_audio_upload": ("x.wav", b"", "audio/wav"),
                             "audio_wrong_type": ("x.txt", b"hello", "text/plain")}[case]
        got, err = status_of(lambda: target.send_audio_file(data, filename=name, content_type=ctype))
        target.end()
    else:
        image, ctype, opts, api_key = jpg, "image/jpeg", {"idle": "pause"}, key
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
            api_key = ""
        elif case == "bad_key":
            api_key = "la_wrong"
        created: list[Session] = []
        if case == "missing_key":                      # the client always sends a key: a raw request has none
            r = client.post("/v1/sessions", files={"image": ("i", image, ctype)}, data={"options": json.dumps(opts)})
            got, err = r.status_code, errors.from_body(r.status_code, r.content, r.headers)
        else:
            got, err = status_of(lambda: created.append(create(api_stack, api_key, image, opts, ctype)))
            got = 201 if created else got
        for s in created:
            s.end()
    assert got == status, (case, got, err)
    if status >= 400:                                  # the error shape: its own status, code and a message
        assert err.status == status and err.code == CODES[status] and err.message
    after = bystander.refresh()
    assert after.state == before.state or after.state == "active"
    bystander.end()
