"""Make a new session speak a text (the API's text-to-speech backend) and save the video as an MP4.

    python clients/python/examples/speak.py http://127.0.0.1:PORT la_... \
        examples/faces/face_905.png "Hello, I am a live avatar." out/speak.mp4
"""

from __future__ import annotations

import argparse
import math

from liveavatar_client import BLOCK_S, LiveAvatar


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base_url", "api_key", "image", "text", "out"):
        p.add_argument(name)
    p.add_argument("--voice", default=None, help="a voice of the backend (espeak-ng: en, en-us, de, fr, ...)")
    a = p.parse_args()
    with LiveAvatar(a.base_url, a.api_key) as la:
        session = la.create_session(a.image, {"idle": "pause"})
        spoken = session.speak(a.text, voice=a.voice)
        print(f"session {session.id}: {spoken['accepted_seconds']} s of speech from {spoken['backend']}")
        init, pieces = session.read_media(math.ceil(spoken["accepted_seconds"] / BLOCK_S) - 1, timeout_s=600)
        session.end()
    with open(a.out, "wb") as f:
        f.write(init + b"".join(p.data for p in pieces))
    print(f"wrote {len(pieces)} fragments to {a.out}")


if __name__ == "__main__":
    main()
