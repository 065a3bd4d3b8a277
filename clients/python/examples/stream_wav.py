"""Stream a WAV file into a new session at real time and save the avatar's video as an MP4.

    python clients/python/examples/stream_wav.py http://127.0.0.1:PORT la_... \
        examples/faces/face_812.png examples/cyclops_baker.wav out/avatar.mp4 [--seconds 6]
"""

from __future__ import annotations

import argparse
import math
import threading

import av
import numpy as np
from liveavatar_client import BLOCK_S, LiveAvatar


def read_wav(path: str, seconds: float | None) -> tuple[np.ndarray, int]:
    """Mono float32 samples at the file's own rate (the API resamples)."""
    with av.open(path) as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().mean(axis=0) if f.format.is_planar else f.to_ndarray().reshape(-1)
                            for f in c.decode(audio=0)]).astype(np.float32)
    return (x[: int(seconds * rate)] if seconds else x), rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base_url", "api_key", "image", "wav", "out"):
        p.add_argument(name)
    p.add_argument("--seconds", type=float, default=None, help="only the first N seconds of the WAV")
    a = p.parse_args()
    samples, rate = read_wav(a.wav, a.seconds)
    with LiveAvatar(a.base_url, a.api_key) as la:
        session = la.create_session(a.image, {"idle": "pause"})      # no video without speech
        print("session", session.id)
        last_block = math.ceil(len(samples) / rate / BLOCK_S) - 1
        result = {}
        reader = threading.Thread(target=lambda: result.update(media=session.read_media(last_block, timeout_s=600)))
        reader.start()
        report = session.stream_audio(samples, rate)                    # real time, then the end of the utterance
        reader.join()
        session.end()
    init, pieces = result["media"]
    with open(a.out, "wb") as f:
        f.write(init + b"".join(p.data for p in pieces))
    print(f"sent {report.seconds:.2f} s of audio ({report.refused_chunks} chunks refused); "
          f"wrote {len(pieces)} fragments to {a.out}")


if __name__ == "__main__":
    main()
