"""One error shape for the whole API, and the handlers that make every failure use it.

``{"error": {"status": 404, "code": "not_found", "message": "..."}}``, with the HTTP status repeated
inside. Bad input is a 4xx, never a 500; a refused WebSocket handshake gets the same body with a real
HTTP status (or, where the server cannot send one, a close code of 4000 + status).
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.logging import get_logger
from services.session_api.schemas import ErrorOut

log = get_logger("session-api")

CODES = {400: "bad_request", 401: "unauthorized", 402: "quota_exhausted", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 409: "conflict", 410: "gone", 413: "too_large", 415: "unsupported_media_type",
         422: "invalid", 429: "too_many_requests", 500: "internal", 503: "unavailable"}

#: The error statuses the OpenAPI document lists for every operation.
DOCUMENTED = {k: {"model": ErrorOut} for k in (400, 401, 402, 404, 413, 415, 422, 429)}


def api_error(status: int, message: str, headers: dict | None = None) -> HTTPException:
    """The exception a handler raises; the handlers below turn it into the error shape."""
    return HTTPException(status_code=status, detail=message, headers=headers)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"status": status, "code": CODES.get(status, "error"), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe(exc: ValidationError | RequestValidationError, limit: int = 5) -> str:
    """``loc: msg; loc: msg`` for the first few problems of a validation error."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:limit])


async def ws_deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with a real HTTP status and the usual JSON error body."""
    try:
        await ws.send_denial_response(error_response(status, message))
    except RuntimeError:    # the server lacks the denial-response extension: close instead
        await ws.close(code=4000 + status, reason=message)


def install(app: FastAPI) -> None:
    """Register the handlers: HTTP errors, validation errors and anything unexpected, all in one shape."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError):
        return error_response(422, describe(exc) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        log.error("unhandled error", error=repr(exc))
        return error_response(500, "internal error")
