"""The real session API app served by uvicorn in this process, on the stand-ins of test_session_api."""

from __future__ import annotations

import pytest

from services.session_api.app import create_app
from services.session_api.tenants import create_tenant
from tests.asgi_server import serve_in_thread
from tests.unit.services.test_session_api import Harness


@pytest.fixture()
def live():
    h = Harness(max_queued_audio_s=1000.0)
    with serve_in_thread(create_app(h.settings, connect=h.connect), ws="websockets-sansio") as port:
        _, h.key = create_tenant(h.store, "client", max_sessions=3)
        h.base = f"http://127.0.0.1:{port}"
        yield h
