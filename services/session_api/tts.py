"""Text-to-speech backends behind ``POST /v1/sessions/{id}/speak``: a small protocol and the local default.

A backend turns text into the bytes of an audio file (any container and rate :func:`models.inputs.load_audio`
reads); the route decodes it to 16 kHz and sends it like an uploaded utterance. Backends are blocking and
run on the API's I/O threads. Which one serves is ``LIVEAVATAR_TTS_BACKEND`` (:data:`BACKENDS`); a test or an
embedding application may put its own on ``app.state.tts``.

- ``espeak-ng`` (default): the ``espeak-ng`` program (``apt-get install espeak-ng``), text on stdin, WAV on
  stdout (22.05 kHz mono). Formant synthesis: robotic, but local, tiny and fast.
- ``none``: no backend; the route answers 503.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Protocol, runtime_checkable

VOICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-/]{0,39}$")


class TTSUnavailable(Exception):
    """The backend is not installed or not configured (503)."""


class TTSInputError(ValueError):
    """The backend refused this input, e.g. an unknown voice (422)."""


@runtime_checkable
class TTSBackend(Protocol):
    """What the speak route needs from a text-to-speech engine."""

    name: str

    def available(self) -> bool:
        """Whether :meth:`synthesize` can run here (cheap; checked on every request)."""

    def synthesize(self, text: str, voice: str | None, timeout_s: float) -> bytes:
        """The speech of ``text`` as the bytes of an audio file. Blocking. Raises :class:`TTSUnavailable`
        when the engine cannot run, :class:`TTSInputError` for input it refuses."""


class EspeakNG:
    """The ``espeak-ng`` program: text on stdin (never on the command line), WAV on stdout."""

    name = "espeak-ng"

    def __init__(self, binary: str = "espeak-ng", default_voice: str = "en"):
        self.binary, self.default_voice = binary, default_voice

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    def synthesize(self, text: str, voice: str | None, timeout_s: float) -> bytes:
        exe = shutil.which(self.binary)
        if exe is None:
            raise TTSUnavailable(f"{self.binary} is not installed")
        voice = voice or self.default_voice
        if not VOICE_RE.match(voice):
            raise TTSInputError(f"voice {voice!r} is not a voice name")
        try:
            r = subprocess.run([exe, "--stdout", "-v", voice], input=text.encode("utf-8"), capture_output=True,
                               timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TTSUnavailable(f"{self.binary} took longer than {timeout_s:g} s") from exc
        except OSError as exc:
            raise TTSUnavailable(f"{self.binary} could not run: {exc}") from exc
        err = r.stderr.decode("utf-8", "replace").strip()
        if "voice does not exist" in err or (r.returncode != 0 and voice != self.default_voice):
            raise TTSInputError(f"unknown or unusable voice {voice!r}: {err[:200]}")
        if r.returncode != 0 or len(r.stdout) <= 44:          # 44 bytes: a WAV header without samples
            raise TTSUnavailable(f"{self.binary} failed (exit {r.returncode}): {err[:200] or 'no audio'}")
        return r.stdout


class NoTTS:
    """No text-to-speech: the route answers 503."""

    name = "none"

    def available(self) -> bool:
        return False

    def synthesize(self, text: str, voice: str | None, timeout_s: float) -> bytes:
        raise TTSUnavailable("no text-to-speech backend is configured (LIVEAVATAR_TTS_BACKEND=none)")


BACKENDS: dict[str, type] = {"espeak-ng": EspeakNG, "none": NoTTS}


def make_backend(name: str) -> TTSBackend:
    """The backend called ``name``; an unknown name is a backend that is not available."""
    cls = BACKENDS.get(name)
    if cls is None:
        backend = NoTTS()
        backend.name = name
        return backend
    return cls()
