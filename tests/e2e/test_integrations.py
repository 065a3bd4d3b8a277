"""The integrations end to end on the local stack: text in (``POST .../speak`` with espeak-ng) and the Pipecat
service (``liveavatar_client.pipecat.LiveAvatarVideoService``) in a real Pipecat pipeline."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import av
import numpy as np
import pytest
from liveavatar_client import LiveAvatar
from liveavatar_client.media import FragmentDecoder
from liveavatar_client.pipecat import LiveAvatarVideoService
from pipecat.frames.frames import OutputImageRawFrame

from models.inputs import load_audio
from tests.pipecat_harness import start

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK_S = 0.48
OUT_RATE = 32000
TEXT = "Hello! I am a live avatar, and this sentence was typed as text, then spoken by the local speech engine."


def envelope(x: np.ndarray, rate: int, hop_s: float = 0.04) -> np.ndarray:
    hop = int(rate * hop_s)
    n = len(x) // hop
    return np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (infra/bootstrap.sh)")
def test_speak_text_and_the_media_covers_the_speech(api_stack, make_tenant, examples):
    key = make_tenant("speak")
    with LiveAvatar(api_stack["base"], key, timeout=60) as la:
        session = la.create_session(examples / "faces" / "face_905.png", {"idle": "pause"})
        spoken = session.speak(TEXT, voice="en-us")
        seconds = spoken["accepted_seconds"]
        # independent: the same engine run here, decoded by the project's loader
        wav = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us"], input=TEXT.encode(), capture_output=True,
                             check=True).stdout
        ref = load_audio(wav, 600)
        assert spoken["backend"] == "espeak-ng" and spoken["characters"] == len(TEXT)
        assert abs(seconds - len(ref) / 16000) < 1e-3 and seconds > 4.0
        last = int(np.ceil(seconds / BLOCK_S - 1e-9)) - 1             # the last (zero-padded) block of the speech
        init, pieces = session.read_media(last, timeout_s=240)
        session.end()
    blocks = [p.block for p in pieces if p.type == "fragment"]
    assert blocks == list(range(last + 1))
    decoder = FragmentDecoder(init)
    frames, audio = [], []
    for p in pieces:
        v, a = decoder.decode(p.data)
        frames += v
        if a is not None:
            audio.append(a.samples)
    out = np.concatenate(audio)
    assert len(frames) * 0.04 >= seconds - 1e-6                        # video covers the whole speech
    assert len(out) / OUT_RATE >= seconds - 0.1                        # so does the audio (less the AAC tail)
    # the speech itself comes back: its loudness envelope follows espeak's, frame by frame
    ref32 = load_audio(wav, 600, sample_rate=OUT_RATE)
    n = min(len(envelope(out, OUT_RATE)), len(envelope(ref32, OUT_RATE)))
    assert np.corrcoef(envelope(out, OUT_RATE)[:n], envelope(ref32, OUT_RATE)[:n])[0, 1] > 0.9


def _speech(examples, seconds: float, rate: int = 24000) -> np.ndarray:
    with av.open(str(examples / "cyclops_baker.wav")) as c:
        assert c.streams.audio[0].rate == rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    n = int(seconds * rate)
    return (np.clip(np.tile(x, -(-n // len(x)))[:n], -1, 1) * 32767).astype(np.int16)


def loudness(frames) -> np.ndarray:
    return np.array([np.sqrt(np.mean((np.frombuffer(a.audio, "<i2") / 32767.0) ** 2)) for a, _ in frames])


async def wait_loud(run, start: int, n: int, timeout_s: float = 120) -> None:
    """Until ``n`` output audio frames after index ``start`` are speech (RMS > 0.01)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (loudness(run.audio()[start:]) > 0.01).sum() < n:
        assert loop.time() < deadline, (f"fewer than {n} loud audio frames after frame {start} in {timeout_s} s "
                                        f"({len(run.audio())} audio frames out in all)")
        await asyncio.sleep(0.1)


async def wait_silent(run, start: int, n: int, timeout_s: float = 240) -> None:
    """Until the last ``n`` output audio frames (after index ``start``) are silent (RMS < 1e-3)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        env = loudness(run.audio()[start:])
        if len(env) >= n and env[-n:].max() < 1e-3:
            return
        assert loop.time() < deadline, (f"no {n} silent frames in a row after frame {start} in {timeout_s} s: "
                                        f"{len(env)} frames since, loud: {(env > 0.01).sum()}, "
                                        f"last {n} max RMS {env[-n:].max() if len(env) else None}")
        await asyncio.sleep(0.1)


def test_pipecat_service_in_a_pipeline_video_audio_and_interruption(api_stack, make_tenant, examples):
    key = make_tenant("pipecat")
    face = examples / "faces" / "face_812.png"

    async def main():
        service = LiveAvatarVideoService(base_url=api_stack["base"], api_key=key, image=face,
                                         options={"idle": "silence", "seed": 4, "idle_timeout_s": 600})
        run = await start(service, start_timeout_s=180)
        try:
            info = await service.session.refresh()
            # 1. A short utterance, all TTS frames at once (as fast TTS engines do): the service paces them.
            await run.tts(_speech(examples, 2.4), 24000)
            await wait_loud(run, 0, 30)                                  # >= 1.2 s of its speech came out
            # 2. A long utterance (8 s), interrupted once 1 s of its speech came out.
            await asyncio.sleep(3.0)                                     # the rest of the first utterance
            mark = len(run.audio())
            await run.tts(_speech(examples, 10.0)[24000 * 2:], 24000)
            await wait_loud(run, mark, 25)
            await run.interrupt()
            cut = len(run.audio())
            # what was generated before the interrupt still arrives (the stack runs behind real time
            # here); then the idle motion's silence: 2 s of it in a row
            await wait_silent(run, cut, 50)
            audio = run.audio()
            images = [f for f, _ in run.collector.of(OutputImageRawFrame)]
            push_times = [t for _, t in run.collector.of(OutputImageRawFrame)]
            await run.end()
        except BaseException:
            await run.abort()
            raise
        return service, info, images, push_times, audio, mark, cut

    service, info, images, push_times, audio, mark, cut = asyncio.run(main())
    with LiveAvatar(api_stack["base"], key) as la:
        assert la.get_session(service.session.id).state in ("ending", "ended")      # ended with the pipeline
    # Video: the session's size, RGB, 25 fps stream times, pushed one per 1/25 s while buffered.
    assert {(f.size, f.format) for f in images} == {((info.width, info.height), "RGB")}
    times = np.array([f.metadata["liveavatar_time_s"] for f in images])
    steps = np.diff(times)
    assert np.median(steps) == pytest.approx(0.04, abs=1e-3) and np.all(steps > 0)
    assert np.median(np.diff(push_times)) == pytest.approx(0.04, abs=0.01)
    # Audio: one 40 ms frame per image; the first utterance's speech is in it.
    assert len(audio) == len(images) and {(a.sample_rate, a.num_frames) for a, _ in audio} == {(OUT_RATE, 1280)}
    env = loudness(audio)
    assert (env[:mark] > 0.01).sum() >= 30                                       # >= 1.2 s of the 2.4 s of speech
    # Interruption: of the 8 s of speech, well under 5 s came out before the avatar fell silent (idle).
    assert (env[mark:] > 0.01).sum() < 0.6 * 25 * 8, (env[mark:] > 0.01).sum()
    assert env[-50:].max() < 1e-3
    assert service.interruptions == 1


def test_webrtc_viewer_gets_the_sessions_video_and_audio(api_stack, make_tenant, examples):
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    key = make_tenant("webrtc")
    with LiveAvatar(api_stack["base"], key, timeout=60) as la:
        session = la.create_session(examples / "faces" / "face_977.png", {"idle": "silence", "idle_timeout_s": 600})
        info = session.wait_until(("active",), timeout_s=180)

        async def main():
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            got: dict[str, list] = {"video": [], "audio": []}

            async def consume(track):
                while True:
                    try:
                        got[track.kind].append(await track.recv())
                    except MediaStreamError:
                        return

            pc.on("track", lambda track: asyncio.ensure_future(consume(track)))
            await pc.setLocalDescription(await pc.createOffer())
            answer = await asyncio.to_thread(session.client.request, "POST", f"/v1/sessions/{session.id}/webrtc",
                                             json={"type": "offer", "sdp": pc.localDescription.sdp})
            await pc.setRemoteDescription(RTCSessionDescription(**answer.json()))
            await asyncio.sleep(6.0)
            state = pc.connectionState
            await pc.close()
            return state, got

        state, got = asyncio.run(main())
        session.end()
    assert state == "connected"
    assert {(f.width, f.height) for f in got["video"]} == {(info.width, info.height)}
    assert len(got["video"]) >= 50                              # >= 2 s of 25 fps video in 6 s (idle motion)
    assert sum(f.samples for f in got["audio"]) / 48000 >= 2.0  # and its audio
