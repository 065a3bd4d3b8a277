"""A media client that goes away while its session makes no media is let go at once.

A session with ``idle: "pause"`` and no speech makes no media, so its media routes have nothing to send
for a long time. A client that left meanwhile (a WebSocket close frame, or its TCP connection dropped)
must still stop counting as a media client (the count keeps the session from idling out, and so keeps
its lane). The app runs behind a real uvicorn server (TestClient cannot drop a connection half way), on
the stand-ins of test_session_api, once as served and once with the HTTP scopes marked ASGI 2.4: from that
version on Starlette no longer watches a streaming response's client itself.
"""

from __future__ import annotations

import base64
import os
import socket
import time

import httpx
import pytest
from websockets.sync.client import connect

from services.session_api.app import create_app
from services.session_api.tenants import create_tenant
from tests.asgi_server import serve_in_thread
from tests.unit.services.test_session_api import Harness, _create

pytestmark = pytest.mark.unit


def _as_spec(app, spec: str | None):
    """The app, with the ASGI spec version of its HTTP scopes replaced (None: as the server says)."""
    if spec is None:
        return app

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": spec}}
        await app(scope, receive, send)
    return wrapped


@pytest.fixture(params=[None, "2.4"], ids=["served", "asgi-2.4"])
def server(request):
    h = Harness(max_queued_audio_s=1000.0)
    app = _as_spec(create_app(h.settings, connect=h.connect), request.param)
    with serve_in_thread(app) as port:
        _, h.key = create_tenant(h.store, "unit", max_sessions=2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {h.key}"}) as client:
            yield h, client, port


def _clients(h, sid: str) -> int:
    rt = h.state.runtimes.get(sid)
    return 0 if rt is None else rt.media_clients


def _wait_clients(h, sid: str, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _clients(h, sid) != n:
        assert time.monotonic() < deadline, f"media clients of {sid}: {_clients(h, sid)}, expected {n}"
        time.sleep(0.02)


def _raw(port: int, request: str) -> socket.socket:
    """A plain TCP connection that sent ``request`` and read the response head."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, f"connection closed before the response head: {head!r}"
        head += chunk
    assert head.split(b"\r\n", 1)[0].split()[1] in (b"101", b"200"), head
    return s


def _drop(s: socket.socket) -> None:
    """Close without a goodbye: no WebSocket close frame, the TCP connection reset."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


@pytest.mark.parametrize("how", ["ws-close-frame", "ws-tcp-drop", "http-tcp-drop"])
def test_a_media_client_that_leaves_a_paused_session_stops_counting(server, how):
    h, client, port = server
    sid = _create(client, {"idle": "pause"})
    h.media(sid, "init", -1, b"INIT")                        # then nothing: the session is paused
    if how == "ws-close-frame":
        with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/media?key={h.key}") as ws:
            assert '"init"' in ws.recv(timeout=10) and ws.recv(timeout=10) == b"INIT"
            _wait_clients(h, sid, 1)
            ws.send("anything")                              # a client message is read and dropped
        # (the close frame went out when the block ended)
    elif how == "ws-tcp-drop":
        key = base64.b64encode(os.urandom(16)).decode()
        s = _raw(port, f"GET /v1/sessions/{sid}/media?key={h.key} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        _wait_clients(h, sid, 1)
        _drop(s)
    else:
        s = _raw(port, f"GET /v1/sessions/{sid}/media.mp4 HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {h.key}\r\n\r\n")
        _wait_clients(h, sid, 1)
        _drop(s)
    _wait_clients(h, sid, 0)                                 # let go: the session can idle out again


def test_a_stream_that_ends_still_closes_the_websocket_and_serves_http_to_the_end(server):
    """The watch on the client does not cut a finished stream short (both routes deliver the end)."""
    h, client, port = server
    sid = _create(client, {"idle": "pause"})
    for kind, block, data in [("init", -1, b"INIT"), ("fragment", 0, b"F0"), ("end", -1, b"TAIL")]:
        h.media(sid, kind, block, data)
    with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/media?key={h.key}&from_block=0") as ws:
        got = [ws.recv(timeout=10) for _ in range(6)]
        assert got[1::2] == [b"INIT", b"F0", b"TAIL"]
        with pytest.raises(Exception, match="1000"):        # closed normally by the server
            ws.recv(timeout=10)
    r = client.get(f"/v1/sessions/{sid}/media.mp4", params={"from_block": 0}, timeout=10)
    assert r.status_code == 200 and r.content == b"INITF0TAIL"
    _wait_clients(h, sid, 0)
