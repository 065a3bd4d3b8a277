"""``POST /v1/sessions/{id}/webrtc`` against the real app (uvicorn in this process; the stand-ins of
test_session_api) with an aiortc client: one video and one audio track, the session's size, 25 fps, and
time-aligned: a white frame and a tone burst made at the same stream time arrive together."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from liveavatar_client import LiveAvatar

from pipeline_stages.package_stage import make_package_stage
from services.common.examples import examples_dir

pytestmark = pytest.mark.unit

W, H, BLOCKS, FRAMES = 64, 48, 8, 12
MARK = 50                                    # the white frame; the tone burst starts at its time, 2 s in


def _stream():
    stage = make_package_stage(W, H, 25, FRAMES, tiny=True)
    n = BLOCKS * FRAMES * 640
    audio = np.zeros(n, np.float32)
    start = MARK * 640                                                   # 640 samples per frame at 16 kHz
    audio[start:start + 3200] = 0.6 * np.sin(2 * np.pi * 1000 * np.arange(3200) / 16000)   # 0.2 s burst
    pieces = [("init", -1, stage.init_segment())]
    for b in range(BLOCKS):
        frames = np.full((FRAMES, H, W, 3), 30, np.uint8)
        for i in range(FRAMES):
            if b * FRAMES + i in range(MARK, MARK + 5):
                frames[i] = 235
        pieces.append(("fragment", b, stage.push_block(frames, audio[b * FRAMES * 640:(b + 1) * FRAMES * 640])))
    pieces.append(("end", -1, stage.close()))
    return pieces


def test_webrtc_answer_carries_aligned_video_and_audio(live):
    h = live
    with LiveAvatar(h.base, h.key) as la:
        session = la.create_session(examples_dir() / "faces" / "face_812.png", {"idle": "pause"})
    pieces = _stream()
    h.media(session.id, *pieces[0])                                      # the init segment is there already

    async def main():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        got: dict[str, list] = {"video": [], "audio": []}
        consumers = []

        async def consume(track):
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                got[track.kind].append((time.monotonic(), frame))

        pc.on("track", lambda track: consumers.append(asyncio.ensure_future(consume(track))))
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=h.base, headers={"Authorization": f"Bearer {h.key}"}) as http:
            bad = await http.post(f"/v1/sessions/{session.id}/webrtc", json={"type": "answer", "sdp": "x"})
            assert bad.status_code == 422
            junk = await http.post(f"/v1/sessions/{session.id}/webrtc", json={"type": "offer", "sdp": "v=0 junk"})
            assert junk.status_code == 400 and junk.json()["error"]["code"] == "bad_request"
            r = await http.post(f"/v1/sessions/{session.id}/webrtc",
                                json={"type": "offer", "sdp": pc.localDescription.sdp}, timeout=30)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["type"] == "answer" and answer["sdp"].count("m=video") == 1 and answer["sdp"].count("m=audio") == 1
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        for _ in range(200):
            if pc.connectionState == "connected":
                break
            await asyncio.sleep(0.05)
        assert pc.connectionState == "connected"

        def feed():                                                      # the session's blocks, at real time
            for kind, block, data in pieces[1:]:
                h.media(session.id, kind, block, data)
                time.sleep(0.48)
        feeder = threading.Thread(target=feed)
        feeder.start()
        await asyncio.to_thread(feeder.join)
        await asyncio.wait(consumers, timeout=10)
        await pc.close()
        return got

    got = asyncio.run(main())
    video, audio = got["video"], got["audio"]
    assert {(f.width, f.height) for _, f in video} == {(W, H)}
    assert len(video) >= 0.85 * BLOCKS * FRAMES                          # nearly every frame came through
    span = video[-1][0] - video[0][0]
    assert abs(len(video) / span - 25) < 3, (len(video), span)           # at 25 fps
    assert sum(f.samples for _, f in audio) / audio[0][1].sample_rate > 0.85 * BLOCKS * FRAMES / 25
    luma = [f.to_ndarray(format="gray").mean() for _, f in video]
    white = next(t for (t, _), y in zip(video, luma) if y > 128)
    rms = [np.sqrt(np.mean((f.to_ndarray().astype(np.float64) / 32768) ** 2)) for _, f in audio]
    loud = next(t for (t, _), e in zip(audio, rms) if e > 0.05)
    assert abs(white - loud) < 0.2, (white - loud)                       # the same stream time, together


def test_a_peer_that_connects_before_the_first_block_gets_it_whatever_other_clients_read():
    """A WebRTC peer made before the session's first block starts at block 0, even when a media WebSocket
    client reads block 0 first (the hub's default start is after the blocks delivered to any client)."""
    from services.session_api.media_hub import MediaStream
    from services.session_api.routes.webrtc import live_edge
    from tests.unit.services.test_session_api import Harness

    h = Harness()
    sid = "s_edge"
    edge = live_edge(h.hub, sid)                       # the peer's start, taken when it connects: no media yet
    assert edge == 0
    h.media(sid, "init", -1, b"init")
    h.media(sid, "fragment", 0, b"f0")
    h.media(sid, "fragment", 1, b"f1")

    async def read(from_block, n: int) -> list:
        got = []
        async with MediaStream(h.hub, sid, from_block) as stream:
            async for piece in stream:
                got.append((piece.kind, piece.block))
                if len(got) == n:
                    return got

    async def read_briefly(from_block, n: int) -> list:
        try:
            return await asyncio.wait_for(read(from_block, n), 1.0)
        except TimeoutError:
            return "timed out"

    first = [("init", -1), ("fragment", 0), ("fragment", 1)]
    assert asyncio.run(read_briefly(None, 3)) == first                # a media WebSocket client read them first
    assert asyncio.run(read_briefly(edge, 3)) == first                # the peer still gets block 0
    assert asyncio.run(read_briefly(None, 3)) == "timed out"          # (the hub's default would have skipped them)
    assert live_edge(h.hub, sid) == 1                                 # a later peer starts at the newest block
