"""Checkpoints that ship inside the repository (issue 8).

- ``liveavatar-tiny/``: the trained tiny model (synthetic talking-avatar domain, 64x64), in the format
  the real checkpoints use (``config.json`` + sharded safetensors for the DiT, ``liveavatar.json`` and
  one safetensors file per other network). ``liveavatar train --install`` rebuilds it from scratch.
  It is the default model of ``make demo``, ``liveavatar up`` and the end-to-end tests.
- ``quality-probes/``: the mouth/pose probe and the identity encoder of the quality harness
  (``liveavatar eval``), trained on the synthetic ground truth.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = Path(__file__).resolve().parent
SHIPPED_CHECKPOINT = CHECKPOINTS_DIR / "liveavatar-tiny"
#: The model spec that means "the shipped checkpoint" wherever a config spec is accepted.
SHIPPED_SPEC = "tiny-trained"
