"""Typed errors, one class per status of the API's error shape.

The API answers every failure with ``{"error": {"status": 404, "code": "not_found", "message": "..."}}``
(HTTP responses and refused WebSocket handshakes); the audio WebSocket reports problems as
``{"type": "error", "status": N, "message": ...}`` and closes with code 4000 + status. All of them
become an :class:`ApiError` subclass chosen by status.
"""

from __future__ import annotations

import json


class LiveAvatarError(Exception):
    """Base of every error this package raises."""


class ApiError(LiveAvatarError):
    """An error answered by the API.

    Attributes:
        status: the HTTP status (or the one inside a WebSocket error message / close code - 4000).
        code: the API's error code (``not_found``, ``too_many_requests``, ...).
        message: the API's message.
        retry_after: seconds from ``Retry-After``, when the API sent it.
    """

    status: int = 0
    code: str = "error"

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class BadRequest(ApiError):
    """400: the input could not be used (bad JSON, undecodable audio or image, empty upload)."""


class Unauthorized(ApiError):
    """401: missing or invalid API key."""


class QuotaExhausted(ApiError):
    """402: the tenant's minutes for today are used up."""


class Forbidden(ApiError):
    """403."""


class NotFound(ApiError):
    """404: no such session (or another tenant's)."""


class Conflict(ApiError):
    """409: the session has ended."""


class TooLarge(ApiError):
    """413: an upload or image over the limits."""


class UnsupportedMediaType(ApiError):
    """415: not an image or audio type the API reads."""


class Invalid(ApiError):
    """422: the request did not validate (unknown option keys, wrong types, text too long)."""


class TooManyRequests(ApiError):
    """429: too many active sessions, or too much audio queued; see ``retry_after``."""


class Unavailable(ApiError):
    """503: a dependency (Redis, the media topic, the TTS backend) is not available."""


class ServerError(ApiError):
    """Any other 5xx."""


BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 402: QuotaExhausted, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: TooLarge, 415: UnsupportedMediaType, 422: Invalid, 429: TooManyRequests, 503: Unavailable,
}


def error_for(status: int, code: str | None = None, message: str = "", retry_after: float | None = None) -> ApiError:
    """The typed error for a status (5xx without a class of its own: :class:`ServerError`)."""
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, code or cls.__name__, message, retry_after)


def _retry_after(headers) -> float | None:
    raw = headers.get("retry-after") if headers is not None else None
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def from_body(status: int, body: bytes | str, headers=None) -> ApiError:
    """Parse the API's error shape (falls back to the raw text for a body of another shape)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    code, message = None, text.strip()[:500] or f"HTTP {status}"
    try:
        err = json.loads(text)["error"]
        code, message = err.get("code"), err.get("message", message)
    except (ValueError, KeyError, TypeError):
        pass
    return error_for(status, code, message, _retry_after(headers))


def from_ws_close(code: int | None, reason: str = "") -> ApiError | None:
    """A WebSocket close code 4000 + status (4401, 4404, 4422, ...) -> its error; None for a normal close."""
    if code is None or not 4000 <= code < 5000:
        return None
    return error_for(code - 4000, None, reason or f"WebSocket closed with code {code}")


class ProtocolError(LiveAvatarError):
    """The server sent something this client does not understand (wrong message order or shape)."""
