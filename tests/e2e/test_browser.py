"""The session API's web page in a real browser: headless Chromium driven over the DevTools protocol.

The page is loaded from the live stack (`liveavatar up` with the session API) with ``?key=...``; the test
clicks the page's own buttons: start a session with the page's default avatar (a synthetic face the bundled
tiny model knows) or an example photo, then send speech by each of the
page's three paths (example speech fetched, decoded and resampled to 16 kHz by WebAudio and streamed over
the audio WebSocket at real time; the microphone, Chromium's fake capture device, through an AudioWorklet;
a WAV file upload). It checks that the video, fed through Media Source Extensions from the media
WebSocket, plays: ``currentTime`` advances, frames are presented, and the frame the browser draws has the
colour of the frames PyAV decodes from the same session. The session uses ``idle: "pause"``, so any video
at all proves that the browser's audio reached the lane. Screenshots go to ``test-artifacts/``.

Chromium is driven with a few lines of DevTools protocol over the ``websockets`` package (``tests/chromium.py``:
no driver, no Playwright). The test is skipped only when ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import base64
import io

import av
import httpx
import numpy as np
import pytest
from liveavatar_client import LiveAvatar
from PIL import Image
from websockets.sync.client import connect

from tests.chromium import ARTIFACTS, CHROMIUM, Cdp, chromium, page_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _decoded_frames(api_stack, sid: str, key: str, until_block: int) -> list[np.ndarray]:
    """The session's video from block 0 to ``until_block`` (read again from the media WebSocket's buffer),
    decoded by PyAV: RGB frames [H, W, 3]."""
    with LiveAvatar(api_stack["base"], key, timeout=60) as la:               # the project's own client
        init, pieces = la.session(sid).read_media(until_block, timeout_s=180, from_block=0)
    data = init + b"".join(p.data for p in pieces)
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


AUDIO_SOURCES = {
    # source: (avatar (None: the page's default, a synthetic face), how the page sends speech)
    "example_speech": (None, "fetch + WebAudio decode/resample to 16 kHz, audio WebSocket, real time"),
    "microphone": ("cyclops_baker", "getUserMedia (Chromium's fake device) + AudioWorklet, audio WebSocket"),
    "upload": ("music_producer", "a WAV file chosen in the file input, POST /v1/sessions/{id}/audio"),
}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("source", list(AUDIO_SOURCES))
def test_the_web_page_plays_a_live_session_in_chromium(source, api_stack, make_tenant, examples, tmp_path):
    key = make_tenant(f"browser-{source.replace('_', '-')}")
    avatar, how = AUDIO_SOURCES[source]
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium(tmp_path / "profile", ARTIFACTS / f"chromium-{source}.log") as port:
        with connect(page_target(port), max_size=None, open_timeout=30) as ws:
            cdp = Cdp(ws)
            # 1. Load the page with the key in the address; the key field is filled from it.
            cdp.call("Page.enable")
            cdp.call("Runtime.enable")
            cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
            cdp.call("Page.navigate", url=f"{api_stack['base']}/?key={key}")
            cdp.wait_for("document.readyState === 'complete' && !!window.liveAvatar", 30, "the page to load")
            assert cdp.js("document.getElementById('key').value") == key

            # 2. Keep the default avatar (a synthetic face the tiny model knows, with its example speech) or
            #    choose an example photo; no idle motion (video only from the speech); start the session.
            default = cdp.js("""(() => { const o = document.getElementById('avatar').selectedOptions[0];
                                return {image: o.dataset.image, speech: document.getElementById('speech').value}; })()""")
            assert default["image"].startswith("faces/face_") and default["speech"], default
            if avatar is not None:
                cdp.js(f"""(() => {{ const a = document.getElementById('avatar'); a.value = '{avatar}';
                           a.dispatchEvent(new Event('change')); }})()""")
                assert cdp.js("document.getElementById('model-note').classList.contains('warn')")
                assert cdp.js("document.getElementById('speech').value") == avatar      # follows the photo
            cdp.js("""(() => { document.getElementById('idle').value = 'pause';
                       document.getElementById('start').click(); })()""")
            sid = cdp.wait_for("window.liveAvatar.state.sid", 30, "the session to be created")
            with httpx.Client(base_url=api_stack["base"], timeout=30,
                              headers={"Authorization": f"Bearer {key}"}) as client:
                assert client.get(f"/v1/sessions/{sid}").status_code == 200

                # 3. Send speech through the page's own controls.
                cdp.wait_for("!document.getElementById('play-example').disabled", 10, "the speech buttons")
                if source == "example_speech":
                    assert cdp.js("document.getElementById('speech').value") == default["speech"]
                    cdp.js("document.getElementById('play-example').click()")
                elif source == "microphone":
                    cdp.js("document.getElementById('record').click()")
                else:
                    doc = cdp.call("DOM.getDocument")["root"]["nodeId"]
                    node = cdp.call("DOM.querySelector", nodeId=doc, selector="#audio-file")["nodeId"]
                    cdp.call("DOM.setFileInputFiles", nodeId=node, files=[str(examples / f"{avatar}.wav")])
                    cdp.js("document.getElementById('upload-audio').click()")
                cdp.wait_for("window.liveAvatar.state.audioStart !== null", 30, "the first audio to be sent")

                # 4. The video plays: the init segment gave a codec string MSE accepts, currentTime advances.
                cdp.wait_for("document.getElementById('video').currentTime > 1.0", 150,
                             f"the video to play 1 s of speech sent by {how}")
                codec = cdp.js("window.liveAvatar.state.codec")
                assert codec.startswith('video/mp4; codecs="avc1.') and "mp4a.40.2" in codec, codec
                t1 = cdp.js("document.getElementById('video').currentTime")
                cdp.wait_for(f"document.getElementById('video').currentTime > {t1} + 0.5", 20,
                             f"the video to advance from {t1:.2f} s")

                # 5. Frames were presented (requestVideoFrameCallback) and latency was measured.
                stats = cdp.wait_for("""(() => { const s = window.liveAvatar.state;
                    return s.firstFrameShown !== null && s.presented >= 12 && {blocks: s.blocks,
                        presented: s.presented, fragMs: s.firstFragAfterAudio, frameMs: s.firstFrameShown}; })()""",
                                     60, "a block's worth of frames of the speech to be shown")
                assert stats["blocks"] >= 2, stats
                assert 0 < stats["fragMs"] <= stats["frameMs"], stats

                # 6. The browser shows the stream's pixels: its drawn frame has the colour of the frames PyAV
                #    decodes from the same session's fragments around the same media time (the mean colour
                #    is compared: exact pixels differ by the encoder's rounding), and is opaque, not blank.
                shown = cdp.js("""(() => { const v = document.getElementById('video');
                    const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
                    const g = c.getContext('2d'); g.drawImage(v, 0, 0);
                    const d = g.getImageData(0, 0, c.width, c.height).data; const m = [0, 0, 0]; let a = 255;
                    for (let i = 0; i < d.length; i += 4) { m[0] += d[i]; m[1] += d[i + 1]; m[2] += d[i + 2];
                      a = Math.min(a, d[i + 3]); }
                    const n = d.length / 4;
                    return {w: c.width, h: c.height, mean: m.map((x) => x / n), alpha: a, t: v.currentTime,
                            block: window.liveAvatar.state.lastBlock}; })()""")
                frames = _decoded_frames(api_stack, sid, key, until_block=shown["block"])
                at = min(len(frames) - 1, int(shown["t"] * 25))                     # the frame on screen
                near = frames[max(0, at - 3): at + 4]
                server_mean = np.mean([f.reshape(-1, 3).mean(axis=0) for f in near], axis=0)
                assert (shown["w"], shown["h"]) == frames[0].shape[1::-1], (shown, frames[0].shape)
                assert shown["alpha"] == 255
                assert np.abs(np.asarray(shown["mean"]) - server_mean).max() < 6.0, (shown["mean"], server_mean)

                # 7. Screenshot artifact: a valid PNG of the page.
                shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
                out = ARTIFACTS / f"browser-{source}.png"
                out.write_bytes(shot)
                assert shot[:8] == b"\x89PNG\r\n\x1a\n"
                with Image.open(io.BytesIO(shot)) as img:
                    img.verify()
                with Image.open(out) as img:
                    assert img.format == "PNG" and img.size[0] >= 640 and img.size[1] >= 400

                # 8. End through the page (which stops the recording): the session leaves the active states.
                cdp.js("document.getElementById('end').click()")
                cdp.wait_for("document.getElementById('status').textContent === 'session ended'", 30,
                             "the session to end")
                assert client.get(f"/v1/sessions/{sid}").json()["state"] in ("ending", "ended")
            errors = [m for m in cdp.console if m.startswith("EXCEPTION") or "error:" in m]
            assert not errors, errors
