"""Text in: ``POST /v1/sessions/{id}/speak {"text": ...}`` speaks text through the TTS backend (``tts.py``).

The backend's audio is decoded and resampled to 16 kHz with the same loader as uploads
(:func:`models.inputs.load_audio`, numpy and PyAV, no torch) and goes on the bus as one utterance: the
same path, limits and queue rule (429) as ``POST .../audio``.
"""

from __future__ import annotations

import unicodedata

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from models.inputs import InputError, load_audio
from services.session_api import bus
from services.session_api.deps import StateDep, TenantDep, require_active, session_of
from services.session_api.errors import api_error
from services.session_api.tts import TTSBackend, TTSInputError, TTSUnavailable, make_backend

router = APIRouter(tags=["audio"])

HARD_MAX_CHARS = 20000      # above any configurable limit: checked before the settings' limit


class SpeakIn(BaseModel):
    """``{"text": "...", "voice": "en"}``: the text to speak (plain text) and, optionally, the backend's voice."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=HARD_MAX_CHARS, description="plain text; LIVEAVATAR_TTS_MAX_CHARS at most")
    voice: str | None = Field(None, max_length=40, description="a voice of the backend (espeak-ng: en, en-us, de, ...)")


class Spoken(BaseModel):
    accepted_seconds: float = Field(description="seconds of 16 kHz speech put on the bus")
    backend: str
    characters: int


def clean_text(text: str) -> str:
    """Control characters become spaces (newlines and tabs included), runs of spaces one; stripped."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return " ".join(text.split())


def backend_of(request: Request, st) -> TTSBackend:
    """``app.state.tts`` if the application set one, else the settings' backend (made once per app)."""
    backend = getattr(request.app.state, "tts", None)
    if backend is None:
        backend = request.app.state.tts = make_backend(st.settings.tts_backend)
    return backend


def _synthesize(backend: TTSBackend, text: str, voice: str | None, timeout_s: float, max_s: float):
    """Blocking: text -> 16 kHz float32 speech."""
    return load_audio(backend.synthesize(text, voice, timeout_s), max_s)


@router.post("/v1/sessions/{sid}/speak", status_code=202, response_model=Spoken,
             responses={503: {"description": "no text-to-speech backend here"}})
async def speak(sid: str, body: SpeakIn, request: Request, st: StateDep, tenant: TenantDep):
    s = st.settings
    text = clean_text(body.text)
    if not text:
        raise api_error(422, "text is empty")
    if len(text) > s.tts_max_chars:
        raise api_error(413, f"text of {len(text)} characters exceeds the limit of {s.tts_max_chars}")
    require_active(await session_of(st, sid, tenant))
    backend = backend_of(request, st)
    if not backend.available():
        raise api_error(503, f"text-to-speech backend {backend.name!r} is not available here")
    try:
        pcm = await st.io(_synthesize, backend, text, body.voice, s.tts_timeout_s, s.max_audio_seconds)
    except TTSInputError as exc:
        raise api_error(422, str(exc)) from exc
    except TTSUnavailable as exc:
        raise api_error(503, str(exc)) from exc
    except InputError as exc:          # the backend's audio did not decode, or is longer than uploads may be
        raise api_error(422, f"the text could not be spoken: {exc}") from exc
    await bus.push_pcm(st, sid, tenant.tenant_id, pcm)
    await bus.send_event(st, sid, tenant.tenant_id, "end_utterance")
    return Spoken(accepted_seconds=round(len(pcm) / bus.RATE, 3), backend=backend.name, characters=len(text))
