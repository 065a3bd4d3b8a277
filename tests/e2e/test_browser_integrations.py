"""The web page's integration paths in headless Chromium: the WebRTC player and the speak box.

WebRTC (against the local stack): the page starts a session (``idle: "pause"``, the default synthetic face)
and its WebRTC player connects (``POST /v1/sessions/{id}/webrtc``) before any speech, so the peer starts at
block 0; then the page streams its example speech over the audio WebSocket at real time. What the browser
got is checked against the session's own fMP4 (read again from the media WebSocket, decoded by PyAV):

1. **Video decoded**: the receiver's ``getStats()`` counts every frame of the speech decoded, none lost, at
   the session's size, and the frames the ``<video>`` presents (``requestVideoFrameCallback``, drawn to a
   16x16 luma thumbnail) are the session's frames at their stream times (the n-th encoded frame to arrive is
   frame n; RTP time follows the server's send clock, so a stall is a gap in it): of the frame offsets
   -12..12, the thumbnails are closest to the reference at offset 0 (+-1).
2. **Audio received**: every 20 ms Opus packet arrived, the browser decoded the speech's duration of real
   (not concealed) audio, and its decoded energy (``totalAudioEnergy``) is at least half the reference's;
   the level each played packet carries (``getSynchronizationSources()``, the RTP audio-level header the
   server computes per packet) follows the reference's loudness at the packet's stream time (the n-th
   packet to arrive is 20 n ms; correlation of the dB envelopes >= 0.9, best at lag 0 +-1 packet).
3. **Aligned**: every encoded frame of both tracks is timestamped as it reaches the browser (an
   ``RTCRtpScriptTransform`` on each receiver, set before the offer). Both tracks' stream times start at
   0 (checked by 1 and 2), so for each video frame at stream time s the audio packet holding s
   arrived ``skew`` later: the median skew is within +-100 ms and 3 in 4 frames are within +-150 ms. A
   server that sent the tracks off each other's clock, or one track's timeline shifted, fails. The outliers
   are the last ~40 ms of each block's audio, which the AAC encoder delivers with the next block.

Why arrival and not playout: the browser's own lip sync (inbound-rtp ``estimatedPlayoutTimestamp``, audio
minus video) is recorded in ``test-artifacts/webrtc-timing.json`` but not asserted: it depends on how the
browser's jitter buffers react to the stack's timing. When the stack makes blocks slower than real time, the
server's shared clock waits for each late block and both tracks stall together, with the stall as a gap in
both RTP timelines (before that change, contiguous timestamps made Chrome's audio jitter buffer grow to
about 1.4 s; docs/integrations.md).

Speak box (against the local stack, needs espeak-ng): the text spoken comes back as the page's result line
with the seconds the same engine makes here, and the video covers them; a refused voice shows a 422 with
its hint. The 503 display (no text-to-speech backend) is checked against the session API app in this
process with ``LIVEAVATAR_TTS_BACKEND=none``.

The tests are skipped only when ``/usr/bin/chromium`` is missing (or espeak-ng, for the speak test).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import time

import av
import httpx
import numpy as np
import pytest
from liveavatar_client import LiveAvatar
from websockets.sync.client import connect

from models.inputs import load_audio
from tests.asgi_server import serve_in_thread
from tests.chromium import ARTIFACTS, CHROMIUM, Cdp, chromium, page_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="/usr/bin/chromium is not installed (apt-get install chromium)")

BLOCK_S, FRAME_S, FRAMES_PER_BLOCK, PACKET_S = 0.48, 0.04, 12, 0.02
SPEECH = "cyclops_baker"                 # the page's default speech, with its default face (face_812)

# Installed in the page before it connects: a worker that timestamps every encoded frame of each receiver
# (RTCRtpScriptTransform, set by the page's connectRtc({prepare}) before the offer), then the presented
# video frames (rVFC: RTP time, size, 16x16 luma) and the audio receiver's synchronization sources.
RECORDER = r"""(() => {
  const rec = { arrivals: [], frames: [], levels: [], playout: [] };
  const src = `onrtctransform = (e) => { const kind = e.transformer.options.kind;
    e.transformer.readable.pipeThrough(new TransformStream({ transform(frame, out) {
      self.postMessage([kind, performance.timeOrigin + performance.now(), frame.getMetadata().rtpTimestamp]);
      out.enqueue(frame); } })).pipeTo(e.transformer.writable); };`;
  rec.worker = new Worker(URL.createObjectURL(new Blob([src], { type: "application/javascript" })));
  rec.worker.onmessage = (e) => rec.arrivals.push(e.data);
  window.__rec = rec;
  const prepare = (pc) => {
    for (const t of pc.getTransceivers()) {
      t.receiver.transform = new RTCRtpScriptTransform(rec.worker, { kind: t.receiver.track.kind });
    }
  };
  return window.liveAvatar.connectRtc({ prepare }).then(() => {
    const pc = window.liveAvatar.rtc.pc;
    const v = document.getElementById("rtc-video");
    const c = document.createElement("canvas"); c.width = 16; c.height = 16;
    const g = c.getContext("2d", { willReadFrequently: true });
    const onFrame = (now, md) => {
      g.drawImage(v, 0, 0, 16, 16);
      const d = g.getImageData(0, 0, 16, 16).data, luma = [];
      for (let i = 0; i < d.length; i += 4) luma.push(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]);
      rec.frames.push({ rtp: md.rtpTimestamp, w: md.width, h: md.height, luma });
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
    const audio = pc.getReceivers().find((r) => r.track.kind === "audio");
    rec.timer = setInterval(() => {
      for (const s of audio.getSynchronizationSources()) rec.levels.push([s.rtpTimestamp, s.audioLevel]);
    }, 5);
    rec.statsTimer = setInterval(async () => {
      const s = {};
      (await pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp") s[r.kind] = r.estimatedPlayoutTimestamp; });
      if (s.audio && s.video) rec.playout.push([performance.now(), s.audio - s.video]);
    }, 500);
    return pc.connectionState;
  });
})()"""

STATS = """(async () => {
  const out = { codecs: {} };
  (await window.liveAvatar.rtc.pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp") out[r.kind] = r;
    else if (r.type === "codec") out.codecs[r.id] = r.mimeType;
  });
  return out;
})()"""


def _reference(api_stack, sid: str, key: str, last_block: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """The session's own media, blocks 0..last_block, decoded by PyAV: the video frames' 16x16 luma
    thumbnails (block means, as an independent downscale) and the mono audio with its rate."""
    with LiveAvatar(api_stack["base"], key, timeout=60) as la:               # the project's own client
        init, pieces = la.session(sid).read_media(last_block, timeout_s=180, from_block=0)
    data = init + b"".join(p.data for p in pieces)
    with av.open(io.BytesIO(data)) as c:
        thumbs = []
        for f in c.decode(video=0):
            rgb = f.to_ndarray(format="rgb24").astype(np.float64)
            y = rgb @ np.array([0.299, 0.587, 0.114])
            h, w = y.shape
            thumbs.append(y.reshape(16, h // 16, 16, w // 16).mean(axis=(1, 3)))
    with av.open(io.BytesIO(data)) as c:
        rate = c.streams.audio[0].rate
        frames = list(c.decode(audio=0))
        assert abs(float(frames[0].time)) < 1e-3, "the reference audio starts at stream time 0"
        pcm = np.concatenate([f.to_ndarray().astype(np.float64).reshape(len(f.layout.channels), -1).mean(axis=0)
                              for f in frames])
    return thumbs, pcm, rate


def _stream_times(rtps: list[int], step_s: float) -> dict[int, float]:
    """Stream time of each RTP timestamp of one track, from the list of every encoded frame that arrived.

    The server stamps RTP time from its send clock, so a stall of the lane is a gap in both RTP timelines
    (the jitter buffer does not grow with it); the media's own time is the frame count: the n-th frame
    (or 20 ms audio packet) to arrive is stream time n * ``step_s``. Arrivals must be in RTP order."""
    unwrapped = np.cumsum([0] + [(b - a) % 2**32 for a, b in zip(rtps, rtps[1:], strict=False)])
    assert np.all(np.diff(unwrapped) > 0), "encoded frames arrived out of RTP order"
    return {rtp: i * step_s for i, rtp in enumerate(rtps)}


@needs_chromium
def test_the_pages_webrtc_player_decodes_the_sessions_video_and_audio_aligned(api_stack, make_tenant, examples,
                                                                             tmp_path):
    key = make_tenant("browser-webrtc")
    with av.open(str(examples / f"{SPEECH}.wav")) as c:
        speech_s = float(c.duration / 1e6)
    blocks = math.ceil(speech_s / BLOCK_S - 1e-9)                   # the last one zero-padded
    ARTIFACTS.mkdir(exist_ok=True)
    http = httpx.Client(base_url=api_stack["base"], timeout=30, headers={"Authorization": f"Bearer {key}"})
    sid = None
    try:
        with chromium(tmp_path / "profile", ARTIFACTS / "chromium-webrtc.log") as port, \
                connect(page_target(port), max_size=None, open_timeout=30) as ws:
            cdp = Cdp(ws)
            cdp.call("Page.enable")
            cdp.call("Runtime.enable")
            cdp.call("Page.navigate", url=f"{api_stack['base']}/?key={key}")
            cdp.wait_for("document.readyState === 'complete' && !!window.liveAvatar", 30, "the page to load")

            # 1. The page's session (default face and speech, no idle video), active before the player connects.
            assert cdp.js("document.getElementById('speech').value") == SPEECH
            cdp.js("document.getElementById('idle').value = 'pause'; document.getElementById('start').click()")
            sid = cdp.wait_for("window.liveAvatar.state.sid", 30, "the session to be created")
            deadline = time.monotonic() + 180
            while (info := http.get(f"/v1/sessions/{sid}").json())["state"] != "active":
                assert time.monotonic() < deadline, f"the session did not become active: {info}"
                time.sleep(0.5)
            # the integration examples carry this API's address and the session, never the key
            shown = cdp.js("[...document.querySelectorAll('code[data-example]')].map((c) => c.textContent)")
            assert len(shown) == 4 and all(f"API={api_stack['base']}\n" in t and f"SID={sid}\n" in t for t in shown)
            assert not [t for t in shown if key in t]

            # 2. The page's WebRTC player connects, with the recorder, before any speech: it starts at block 0.
            assert cdp.js("document.getElementById('rtc-connect').textContent") == "Connect WebRTC"
            assert cdp.js(RECORDER, await_promise=True) in ("new", "connecting", "connected")
            cdp.wait_for("window.liveAvatar.rtc.pc && window.liveAvatar.rtc.pc.connectionState === 'connected'",
                         30, "the WebRTC connection")
            assert cdp.js("document.getElementById('rtc-connect').textContent") == "Disconnect"

            # 3. Speech in through the page (real time over the audio WebSocket); wait for every frame of it.
            cdp.js("document.getElementById('play-example').click()")
            want = blocks * FRAMES_PER_BLOCK
            cdp.wait_for(f"""(() => {{ const s = window.liveAvatar.rtc.stats;
                return s && s.video && s.video.framesDecoded >= {want}; }})()""", 240,
                         f"the browser to decode the {want} frames of {speech_s:.1f} s of speech over WebRTC")
            time.sleep(1.5)                                     # the last audio packets and frames played out
            stats = cdp.js(STATS, await_promise=True)
            rec = cdp.js("""(() => { const r = window.__rec; clearInterval(r.timer); clearInterval(r.statsTimer);
                return { arrivals: r.arrivals, frames: r.frames, levels: r.levels, playout: r.playout }; })()""")
            page_video = cdp.js("document.getElementById('r-video').textContent")
            errors = [m for m in cdp.console if m.startswith("EXCEPTION") or "error:" in m]
        info = http.get(f"/v1/sessions/{sid}").json()
        thumbs, pcm, rate = _reference(api_stack, sid, key, blocks - 1)
    finally:
        if sid is not None:
            http.delete(f"/v1/sessions/{sid}")
        http.close()
    assert not errors, errors

    # 1. Video decoded: all of it, at the session's size; the page shows the same.
    v, a = stats["video"], stats["audio"]
    size = (info["width"], info["height"])
    assert (v["frameWidth"], v["frameHeight"]) == size and f"{size[0]}x{size[1]}" in page_video, (v, page_video)
    assert stats["codecs"][v["codecId"]] in ("video/VP8", "video/H264"), stats["codecs"]
    assert v["framesReceived"] >= want and v["framesDecoded"] >= want and v["packetsLost"] == 0, v
    assert {(f["w"], f["h"]) for f in rec["frames"]} == {size}
    arrivals = {"video": [], "audio": []}
    for kind, t_ms, rtp in rec["arrivals"]:
        arrivals[kind].append((t_ms / 1000, rtp))
    v_time = _stream_times([rtp for _, rtp in arrivals["video"]], FRAME_S)
    a_time = _stream_times([rtp for _, rtp in arrivals["audio"]], PACKET_S)
    assert len(v_time) >= want, (len(v_time), want)
    # the presented frames are the session's frames at their RTP times (block means vs the browser's
    # bilinear downscale and VP8's losses differ, so the check is which offset fits best, not equality)
    shown = [(round(v_time[f["rtp"]] / FRAME_S), np.asarray(f["luma"]).reshape(16, 16)) for f in rec["frames"]]
    assert len(shown) >= 0.5 * want, len(shown)
    err = {k: np.mean([np.abs(y - thumbs[i + k]).mean() for i, y in shown if 0 <= i + k < len(thumbs)])
           for k in range(-12, 13)}
    best = min(err, key=err.get)
    assert abs(best) <= 1, {k: round(e, 2) for k, e in err.items()}

    # 2. Audio received: every packet, the speech's duration decoded for real, its energy, its loudness.
    assert a["packetsLost"] == 0 and a["packetsReceived"] >= 0.98 * blocks * BLOCK_S / PACKET_S, a
    out_rate = a["totalSamplesReceived"] / a["totalSamplesDuration"]
    decoded_s = (a["totalSamplesReceived"] - a["concealedSamples"]) / out_rate
    assert decoded_s >= 0.95 * speech_s, (decoded_s, a)
    hop = int(rate * PACKET_S)
    n = len(pcm) // hop
    ref_rms = np.sqrt(np.mean(pcm[: n * hop].reshape(n, hop) ** 2, axis=1))        # packet i: [0.02 i, 0.02 (i+1))
    assert a["totalAudioEnergy"] >= 0.5 * float(np.sum(ref_rms ** 2) * PACKET_S), (a["totalAudioEnergy"], ref_rms)
    level = {round(a_time[rtp] / PACKET_S): lv for rtp, lv in rec["levels"] if rtp in a_time}
    idx = np.array(sorted(i for i in level if i < n))
    got_db = 20 * np.log10(np.maximum([level[i] for i in idx], 1e-5))
    ref_db = 20 * np.log10(np.maximum(ref_rms, 1e-5))
    assert len(idx) >= 0.8 * n, (len(idx), n)
    corr = {lag: np.corrcoef(got_db[ok], ref_db[idx[ok] + lag])[0, 1]
            for lag in range(-10, 11) for ok in [(idx + lag >= 0) & (idx + lag < n)]}
    lag = max(corr, key=corr.get)
    assert abs(lag) <= 1 and corr[lag] >= 0.9, {k: round(c, 3) for k, c in corr.items()}

    # 3. Aligned: the audio of each video frame's stream time arrived with it.
    vt = np.array([(t, v_time[rtp]) for t, rtp in arrivals["video"]])
    at = np.array([(t, a_time[rtp]) for t, rtp in arrivals["audio"]])
    assert np.all(np.diff(at[:, 1]) > 0) and np.all(np.diff(vt[:, 1]) > 0)
    holder = np.searchsorted(at[:, 1], vt[:, 1] + 1e-6) - 1                 # the packet holding each frame's time
    skew = at[holder, 0] - vt[:, 0]
    timing = {"skew_ms": np.percentile(skew * 1000, [10, 25, 50, 75, 90, 100]).round(1).tolist(),
              "playout_audio_minus_video_ms": rec["playout"],
              "frames": len(vt), "audio_packets": len(at), "video_offset_best": best, "audio_lag_best": lag}
    (ARTIFACTS / "webrtc-timing.json").write_text(json.dumps(timing, indent=1))
    assert abs(np.median(skew)) <= 0.100, timing["skew_ms"]
    assert np.mean(np.abs(skew) <= 0.150) >= 0.75, timing["skew_ms"]


# ---- the speak box ------------------------------------------------------------------------------------


def _open_page(cdp: Cdp, base: str, key: str) -> None:
    cdp.call("Page.enable")
    cdp.call("Runtime.enable")
    cdp.call("Page.navigate", url=f"{base}/?key={key}")
    cdp.wait_for("document.readyState === 'complete' && !!window.liveAvatar", 30, "the page to load")


def _speak(cdp: Cdp, text: str, voice: str = "") -> dict:
    """Type ``text`` (and a voice) into the speak box, press Speak; the result line once it is there."""
    cdp.js(f"""(() => {{ document.getElementById('speak-text').value = {json.dumps(text)};
        document.getElementById('speak-voice').value = {json.dumps(voice)};
        document.getElementById('speak-result').textContent = '';
        document.getElementById('speak').click(); }})()""")
    return cdp.wait_for("""(() => { const r = document.getElementById('speak-result');
        return r.textContent && r.textContent !== 'speaking...' && {text: r.textContent, cls: r.className}; })()""",
                        60, "the speak result")


@needs_chromium
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (infra/bootstrap.sh)")
def test_the_speak_box_speaks_text_and_shows_refusals(api_stack, make_tenant, tmp_path):
    key = make_tenant("browser-speak")
    text = "Hello! I was typed into the web page."
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium(tmp_path / "profile", ARTIFACTS / "chromium-speak.log") as port, \
            connect(page_target(port), max_size=None, open_timeout=30) as ws:
        cdp = Cdp(ws)
        _open_page(cdp, api_stack["base"], key)
        assert cdp.js("document.getElementById('speak').disabled")             # no session yet
        cdp.js("""(() => { const a = document.getElementById('avatar'); a.value = 'face_905';
                   a.dispatchEvent(new Event('change')); document.getElementById('idle').value = 'pause';
                   document.getElementById('start').click(); })()""")
        cdp.wait_for("window.liveAvatar.state.sid && !document.getElementById('speak').disabled", 30, "the session")
        # A refused voice: the error line with its status and hint; nothing was queued.
        bad = _speak(cdp, text, voice="zzzz")
        assert bad["cls"] == "result error" and "(422)" in bad["text"] and "refused" in bad["text"], bad
        assert cdp.js("window.liveAvatar.state.audioStart") is None
        # The text: espeak-ng's speech, as long as the same engine makes it here, then its video.
        ok = _speak(cdp, text, voice="en-us")
        wav = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us"], input=text.encode(), capture_output=True,
                             check=True).stdout
        seconds = len(load_audio(wav, 600)) / 16000
        assert ok["cls"] == "result" and ok["text"].startswith(f"espeak-ng spoke {len(text)} characters: "), ok
        shown = float(ok["text"].split(": ")[1].split(" s ")[0])
        assert abs(shown - seconds) <= 0.006, (shown, seconds)
        last = math.ceil(seconds / BLOCK_S - 1e-9) - 1
        cdp.wait_for(f"window.liveAvatar.state.lastBlock >= {last}", 180, f"block {last} of the spoken text")
        cdp.wait_for("window.liveAvatar.state.firstFrameShown !== null", 30, "the speech's first frame shown")
        cdp.js("document.getElementById('end').click()")
        cdp.wait_for("document.getElementById('status').textContent === 'session ended'", 30, "the session to end")
        errors = [m for m in cdp.console if m.startswith("EXCEPTION")]
    assert not errors, errors


@pytest.fixture()
def api_without_tts():
    """The session API app in this process (the stand-ins of the unit tests) with no text-to-speech backend."""
    from services.session_api.app import create_app
    from services.session_api.tenants import create_tenant
    from tests.unit.services.test_session_api import Harness

    h = Harness(max_queued_audio_s=60.0, tts_backend="none")
    with serve_in_thread(create_app(h.settings, connect=h.connect), ws="websockets-sansio") as port:
        _, key = create_tenant(h.store, "page", max_sessions=2)
        yield f"http://127.0.0.1:{port}", key


@needs_chromium
def test_the_speak_box_says_why_when_the_api_has_no_speech_engine(api_without_tts, tmp_path):
    base, key = api_without_tts
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium(tmp_path / "profile", ARTIFACTS / "chromium-speak-503.log") as port, \
            connect(page_target(port), max_size=None, open_timeout=30) as ws:
        cdp = Cdp(ws)
        _open_page(cdp, base, key)
        cdp.js("document.getElementById('idle').value = 'pause'; document.getElementById('start').click()")
        cdp.wait_for("window.liveAvatar.state.sid && !document.getElementById('speak').disabled", 30, "the session")
        res = _speak(cdp, "Hello.")
        assert res["cls"] == "result error", res
        assert "text-to-speech backend 'none' is not available here (503)" in res["text"], res
        assert "install espeak-ng" in res["text"], res
        assert "(503)" in cdp.js("document.getElementById('status').textContent")    # and the page's status line
