"""Watch a session over WebRTC with aiortc: offer to receive one video and one audio track, POST the offer to
``/v1/sessions/{id}/webrtc``, and report what arrives.

    python clients/python/examples/webrtc_receive.py http://127.0.0.1:PORT la_... SESSION_ID [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


async def run(a) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))       # host candidates: the API must be reachable
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    counts = {"video": 0, "audio": 0}
    size = None

    async def consume(track):
        nonlocal size
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            counts[track.kind] += 1
            if track.kind == "video":
                size = (frame.width, frame.height)

    pc.on("track", lambda track: asyncio.ensure_future(consume(track)))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=a.base_url, headers={"Authorization": f"Bearer {a.api_key}"}) as http:
        r = await http.post(f"/v1/sessions/{a.session_id}/webrtc", timeout=30,
                            json={"type": "offer", "sdp": pc.localDescription.sdp})
        r.raise_for_status()
    await pc.setRemoteDescription(RTCSessionDescription(**r.json()))
    t0 = time.monotonic()
    await asyncio.sleep(a.seconds)
    print(f"{pc.connectionState}: {counts['video']} video frames {size}, {counts['audio']} audio frames (20 ms) "
          f"in {time.monotonic() - t0:.1f} s")
    await pc.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base_url", "api_key", "session_id"):
        p.add_argument(name)
    p.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
