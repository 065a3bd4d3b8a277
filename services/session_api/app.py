"""The REST session API: tenants' sessions, live audio in, live fMP4 video out, and a small web page.

Everything a session does goes through the bus: the API never imports torch. It records sessions and
images in Redis, puts the session's input events on ``audio`` (start, PCM, end of utterance,
interrupt, end), and serves the session's ``media`` to clients (WebSocket or a streaming HTTP GET).

The pieces: ``settings`` (typed settings), ``schemas`` (request and response models), ``errors`` (one
error shape), ``state`` (the typed app state and the I/O threads), ``bus`` (what goes on ``audio``, in
order), ``media_hub`` (what comes back from ``media``), ``deps`` (auth), ``routes/`` (one module per
area). This module only builds the app: :func:`create_app` and its lifespan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from services.common.logging import get_logger
from services.session_api import bus, errors
from services.session_api.metrics import LATENCY, REQUESTS
from services.session_api.routes import ROUTERS
from services.session_api.settings import ApiSettings
from services.session_api.state import AppState

__all__ = ["ApiSettings", "create_app"]

log = get_logger("session-api")
HUB_READY_TIMEOUT_S = 30


def create_app(settings: ApiSettings | None = None,
               connect: Callable[[ApiSettings], AppState] = AppState.connect) -> FastAPI:
    """The API. Nothing connects until the lifespan starts; ``connect`` opens the app state (tests may
    pass their own)."""
    s = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = await asyncio.to_thread(connect, s)
        app.state.la = st
        if not await st.io(st.hub.ready.wait, HUB_READY_TIMEOUT_S):
            log.warning("the media topic is not being read yet; /readyz says so until it is")
        bus.start_background(st)           # timer-lease takeover, media presence, event-loop lag probe
        log.info("session API ready", replica=st.replica)
        try:
            yield
        finally:
            await st.close()

    app = FastAPI(title="LiveAvatar session API", version="1.0.0", lifespan=lifespan, responses=errors.DOCUMENTED)
    errors.install(app)

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        path = getattr(request.scope.get("route"), "path", "unmatched")
        REQUESTS.labels(path, str(response.status_code)).inc()
        LATENCY.labels(path).observe(time.perf_counter() - t0)
        return response

    for router in ROUTERS:
        app.include_router(router)
    return app
