"""Health, readiness, metrics, the web page and the example inputs it uses (none in the OpenAPI document)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.examples import examples_dir
from services.session_api.deps import StateDep
from services.session_api.errors import api_error, error_response
from services.session_api.metrics import SESSIONS

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static"
#: What /examples/ serves: reference photos, synthetic faces (faces/), speech.
EXAMPLE_SUFFIXES = (".jpg", ".png", ".wav")


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(st: StateDep):
    try:
        await st.io(st.store.r.ping)
    except Exception:  # noqa: BLE001 - any Redis failure means not ready
        return error_response(503, "redis unavailable")
    if not st.hub.ready.is_set():
        return error_response(503, "the media topic is not being read yet")
    return {"ready": True}


@router.get("/metrics")
async def metrics(st: StateDep):
    SESSIONS.labels("session-api").set(len(st.tickers))          # sessions whose timers run here
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/")
async def index():
    page = STATIC / "index.html"
    if not page.exists():
        raise api_error(404, "the web page is not built")
    return FileResponse(page)


def example_file(name: str, folder: Path | None = None) -> Path | None:
    """The example file ``name`` (e.g. ``cyclops_baker.wav``, ``faces/face_812.png``) inside the examples
    folder, or None: other suffixes, hidden files and anything that resolves outside the folder are refused."""
    root = (folder or examples_dir()).resolve()
    parts = name.split("/")
    if not name or len(name) > 200 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    path = (root / name).resolve()
    if path.suffix not in EXAMPLE_SUFFIXES or not path.is_relative_to(root) or not path.is_file():
        return None
    return path


@router.get("/examples/{name:path}")
async def example(name: str):
    path = example_file(name)
    if path is None:
        raise api_error(404, "no such example")
    return FileResponse(path)
