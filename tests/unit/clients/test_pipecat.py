"""``LiveAvatarVideoService`` in a real Pipecat pipeline against the real session API app (in-process: the
stand-in Redis and producer record what the API puts on the bus; the media hub is fed a real fMP4 stream
made by the project's packager from known frames and a known tone). TTS audio in -> PCM on the bus at
16 kHz and the end of the utterance; the stream out -> image frames (the stream's size, 25 fps, the colours
encoded) and the audio under each frame (the tone, at its time); an interruption interrupts the session."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from liveavatar_client import LiveAvatar
from liveavatar_client.pipecat import LiveAvatarVideoService

from pipeline_stages.package_stage import make_package_stage
from services.common.examples import examples_dir
from tests.pipecat_harness import start

pytestmark = pytest.mark.unit

W, H, BLOCKS, FRAMES = 64, 48, 3, 12
TONE_HZ = 440.0


def _stream():
    """init + one fragment per block + the end, from frames whose red level encodes the frame index."""
    stage = make_package_stage(W, H, 25, FRAMES, tiny=True)
    t = np.arange(BLOCKS * FRAMES * 640) / 16000
    tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    pieces = [("init", -1, stage.init_segment())]
    for b in range(BLOCKS):
        frames = np.zeros((FRAMES, H, W, 3), np.uint8)
        frames[..., 0] = (40 + 5 * (b * FRAMES + np.arange(FRAMES)))[:, None, None]
        frames[..., 1] = 90
        pieces.append(("fragment", b, stage.push_block(frames, tone[b * FRAMES * 640:(b + 1) * FRAMES * 640])))
    pieces.append(("end", -1, stage.close()))
    return pieces


def test_tts_in_video_and_audio_out_at_25_fps_and_interruptions(live):
    h = live
    with LiveAvatar(h.base, h.key) as la:
        session = la.create_session(examples_dir() / "faces" / "face_812.png", {"idle": "pause"})
    h.store.update_session(session.id, state="active", width=W, height=H)

    async def main():
        service = LiveAvatarVideoService(base_url=h.base, api_key=h.key, session_id=session.id, lead_s=1.0)
        run = await start(service, start_timeout_s=30)
        rate = 24000
        speech = (np.sin(np.arange(rate // 2) / 5.0) * 9000).astype(np.int16)        # 0.5 s of TTS audio
        for utterance in (speech, speech[: rate // 4]):                             # two utterances: 0.5 s, 0.25 s
            await run.tts(utterance, rate)
        for _ in range(200):                                                        # both reach the bus
            if [m.kind for m in h.producer.sent if m.session_id == session.id].count("end_utterance") == 2:
                break
            await asyncio.sleep(0.05)
        for kind, block, data in _stream():                                         # the avatar's stream comes back
            h.media(session.id, kind, block, data)
        images = await run.wait_images(BLOCKS * FRAMES, timeout_s=30)
        # a long utterance (4 s, sent at most 1 s ahead of real time), interrupted after 0.5 s
        accepted = h.store.cursor_int(session.id, "accepted_samples")
        await run.tts(np.tile(speech, 8), rate)
        await asyncio.sleep(0.5)
        await run.interrupt()
        for _ in range(100):
            if "interrupt" in [m.kind for m in h.producer.sent if m.session_id == session.id]:
                break
            await asyncio.sleep(0.05)
        at_interrupt = h.store.cursor_int(session.id, "accepted_samples") - accepted
        await asyncio.sleep(1.0)
        after = h.store.cursor_int(session.id, "accepted_samples") - accepted - at_interrupt
        audio = run.audio()
        await run.end()
        return service, images, audio, accepted, at_interrupt, after

    service, images, audio, accepted, at_interrupt, after = asyncio.run(main())

    # In: the TTS audio went to the session, resampled to 16 kHz by the API, then the end of the utterance.
    kinds = [m.kind for m in h.producer.sent if m.session_id == session.id]
    assert kinds[0] == "start" and kinds.count("end_utterance") == 2 and "pcm" in kinds
    assert accepted == 8000 + 4000
    # Out: one image per frame of the stream, its size, RGB, 25 fps content and pacing, the colours encoded.
    assert len(images) == BLOCKS * FRAMES and service.size == (W, H)
    assert {(f.size, f.format) for f, _ in images} == {((W, H), "RGB")}
    times = [f.metadata["liveavatar_time_s"] for f, _ in images]
    assert np.allclose(times, np.arange(len(images)) / 25, atol=1e-3)
    red = [np.frombuffer(f.image, np.uint8).reshape(H, W, 3)[..., 0].mean() for f, _ in images]
    assert np.allclose(red, 40 + 5 * np.arange(len(images)), atol=4), red
    pushed = np.diff([t for _, t in images])
    assert abs(np.median(pushed) - 0.04) < 0.01, pushed                       # one frame per 1/25 s
    assert 0.0395 < pushed.mean() < 0.08, pushed.mean()                       # never faster than 25 fps on average
    # Audio: 40 ms (1280 samples at 32 kHz) before each image, and it is the tone at the frame's time.
    assert len(audio) == len(images)
    assert {(a.sample_rate, a.num_channels, a.num_frames) for a, _ in audio} == {(32000, 1, 1280)}
    x = np.concatenate([np.frombuffer(a.audio, "<i2") for a, _ in audio]) / 32767
    t = np.arange(len(x)) / 32000
    ref = 0.5 * np.sin(2 * np.pi * TONE_HZ * t)
    mid = slice(3200, len(x) - 3200)
    assert np.corrcoef(x[mid], ref[mid])[0, 1] > 0.95                          # in sync with the frames
    shifted = 0.5 * np.sin(2 * np.pi * TONE_HZ * (t - 0.04 / 8))               # control: 5 ms off is not
    assert np.corrcoef(x[mid], shifted[mid])[0, 1] < 0.9
    # Interruption: the session was interrupted.
    assert service.interruptions == 1 and kinds.count("interrupt") == 1
    assert 16000 * 1.0 <= at_interrupt <= 16000 * 2.0, at_interrupt     # lead 1 s + 0.5 s of real time
    assert after == 0                                                  # nothing of the utterance after it
    assert kinds.count("end_utterance") == 2                           # and no end for the interrupted one
