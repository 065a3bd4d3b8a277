"""The example inputs bundled in the repository's ``examples/`` folder.

Two kinds of input live there:

* ``<name>.jpg`` + ``<name>.wav``: reference photos and real speech from the public Live Avatar
  repository (see ``examples/NOTICE.md``). The photos need the real 14B weights; the bundled tiny
  model was trained on synthetic 64x64 faces and cannot animate them.
* ``faces/face_<identity>.png``: held-out synthetic faces rendered by ``models.training.synthetic``,
  the inputs the bundled tiny model actually works on.

Each example speech is paired with one synthetic face (:data:`FACE_FOR_SPEECH`), which is what
``make demo`` and the README commands use. This module imports no torch, so the session API may use it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that points at another examples folder (same layout).
ENV_VAR = "LIVEAVATAR_EXAMPLES_DIR"

#: The example names: each has ``<name>.jpg`` (reference photo) and ``<name>.wav`` (speech).
EXAMPLE_NAMES: tuple[str, ...] = ("cyclops_baker", "kitchen_grandmother", "music_producer")

#: Held-out synthetic identities (training used identities 0..799) with a committed face PNG.
FACE_IDENTITIES: tuple[int, ...] = (812, 905, 977)

#: Which synthetic face speaks which example speech.
FACE_FOR_SPEECH: dict[str, int] = dict(zip(EXAMPLE_NAMES, FACE_IDENTITIES))


def examples_dir() -> Path:
    """The examples folder: ``$LIVEAVATAR_EXAMPLES_DIR`` if set, else ``<repository root>/examples``."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2] / "examples"


def photo_path(name: str, folder: Path | None = None) -> Path:
    """The reference photo of example ``name`` (for the real weights; not the tiny model's domain)."""
    return (folder or examples_dir()) / f"{name}.jpg"


def speech_path(name: str, folder: Path | None = None) -> Path:
    """The speech (WAV, mono, 24 kHz float) of example ``name``."""
    return (folder or examples_dir()) / f"{name}.wav"


def face_path(identity: int, folder: Path | None = None) -> Path:
    """The committed synthetic face PNG of a held-out identity."""
    return (folder or examples_dir()) / "faces" / f"face_{identity}.png"


def face_for(name: str, folder: Path | None = None) -> Path:
    """The synthetic face that speaks example ``name`` in the demo."""
    return face_path(FACE_FOR_SPEECH[name], folder)


def output_stem(name: str) -> str:
    """How the demo names what it made from example ``name``: ``face_812-speaks-cyclops_baker``.

    The video shows the synthetic face speaking the example speech, not the example photo.
    """
    return f"face_{FACE_FOR_SPEECH[name]}-speaks-{name}"
