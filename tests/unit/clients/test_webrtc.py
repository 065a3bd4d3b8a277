"""``POST /v1/sessions/{id}/webrtc`` against the real app (uvicorn in this process; the stand-ins of
test_session_api) with an aiortc client: one video and one audio track, the session's size, 25 fps, and
time-aligned: a white frame and a tone burst made at the same stream time arrive together. The tracks' RTP
timestamps across a stall (the session behind real time) are checked on a fake clock."""

from __future__ import annotations

import asyncio
import threading
import time
from fractions import Fraction

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


# ---- RTP timestamps across a stall ---------------------------------------------------------------------

class _FakeTime:
    """Wall time that moves only when the clock sleeps or the test says so."""

    def __init__(self):
        self.t = 100.0

    def now(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s


@pytest.mark.parametrize("first", ["video", "audio"])
def test_a_stall_is_a_gap_in_both_rtp_timelines_and_keeps_them_aligned(first):
    """Blocks of 0.48 s (12 video frames, 24 audio frames of 20 ms); block 3 comes 2 s late (the session
    fell behind). The frames' RTP times (their pts, which aiortc's encoders turn into RTP timestamps) are
    their stream time until the stall and stream time + 2 s from block 3 on, on both tracks, whichever
    track releases block 3 first: a receiver sees a 2 s gap, not 2 s late packets, and A/V stay aligned."""
    import av
    from aiortc.codecs.opus import OpusEncoder
    from aiortc.codecs.vpx import Vp8Encoder

    from services.session_api.webrtc import AUDIO_FRAME, AUDIO_RATE, VIDEO_CLOCK, SessionTrack, SharedClock

    block_s, stall_block, stall_s = 0.48, 3, 2.0
    fake = _FakeTime()
    clock = SharedClock(now=fake.now, sleep=fake.sleep)
    tracks = {"video": SessionTrack("video", clock, 25, VIDEO_CLOCK),
              "audio": SessionTrack("audio", clock, AUDIO_RATE / AUDIO_FRAME, AUDIO_RATE)}

    def frame(kind):
        if kind == "video":
            return av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30, np.uint8), format="rgb24")
        f = av.AudioFrame.from_ndarray(np.zeros((1, AUDIO_FRAME), np.int16), format="s16", layout="mono")
        f.sample_rate = AUDIO_RATE
        return f

    order = {"video": 0 if first == "video" else 1, "audio": 1 if first == "video" else 0}
    items = [(b, b * block_s + i / 25, "video") for b in range(6) for i in range(12)]
    items += [(b, b * block_s + j * AUDIO_FRAME / AUDIO_RATE, "audio") for b in range(6) for j in range(24)]
    items.sort(key=lambda x: (x[1], order[x[2]]))

    async def run():
        got = {"video": [], "audio": []}
        t0 = fake.t
        for b, t, kind in items:
            arrives = t0 + b * block_s + (stall_s if b >= stall_block else 0.0)   # the block's fragment is here
            fake.t = max(fake.t, arrives)
            tracks[kind].offer((t, frame(kind)))
            out = await tracks[kind].recv()
            got[kind].append((t, out.pts, fake.t - t0))
        return got

    got = asyncio.run(run())
    for kind, rate, step in (("video", VIDEO_CLOCK, VIDEO_CLOCK // 25), ("audio", AUDIO_RATE, AUDIO_FRAME)):
        ts = [t for t, _, _ in got[kind]]
        pts = [p for _, p, _ in got[kind]]
        want = [round(t * rate) + (round(stall_s * rate) if t >= stall_block * block_s - 1e-9 else 0) for t in ts]
        assert pts == want, kind                                          # stream time, + the stall after it
        gaps = np.diff(pts)
        assert sorted(set(gaps.tolist())) == [step, step + round(stall_s * rate)], (kind, set(gaps.tolist()))
        for t, _, released in got[kind]:                                  # sent on time on the shifted clock
            assert abs(released - (t + (stall_s if t >= stall_block * block_s - 1e-9 else 0.0))) < 1e-6
    audio = {round(t * 50): p / AUDIO_RATE for t, p, _ in got["audio"]}
    for t, p, _ in got["video"]:                                          # aligned: the same RTP time
        assert abs(p / VIDEO_CLOCK - audio[round(t * 50)]) < 1 / 25 / 10, t

    # aiortc's encoders carry the pts into the RTP timestamps (Opus reports a gap one 20 ms packet late)
    def rtp_timestamps(encoder, kind: str, clock: int) -> list[int]:
        out = []
        for _, p, _ in got[kind]:
            f = frame(kind)
            f.pts, f.time_base = p, Fraction(1, clock)
            out.append(encoder.encode(f)[1])
        return out

    assert rtp_timestamps(Vp8Encoder(), "video", VIDEO_CLOCK) == [p for _, p, _ in got["video"]]
    rtp_a = rtp_timestamps(OpusEncoder(), "audio", AUDIO_RATE)
    jumps = [i for i, d in enumerate(np.diff(rtp_a)) if d != AUDIO_FRAME]
    assert len(jumps) == 1 and np.diff(rtp_a)[jumps[0]] == AUDIO_FRAME + round(stall_s * AUDIO_RATE)
    assert jumps[0] - stall_block * 24 in (-1, 0), jumps
