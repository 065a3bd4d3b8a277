"""A lane's shape: which rank runs which denoising steps, where the decoder sits, who talks to whom.

Every rank-to-role question of the lane (rank loops, the local supervisor, the lane service) is
answered here, so the rest of the lane never assumes that rank ``i`` is step ``i``.

A shape is written ``D+1`` or ``D``: ``D`` denoise ranks each run ``steps / D`` consecutive
denoising steps (each step with its own KV cache, so timestep forcing stays exact); ``+1`` puts the
streaming VAE decoder on a rank of its own, without it the decoder runs on the last denoise rank.
With the method's 4 steps::

    4+1   rank 0: step 0 -> 1: step 1 -> 2: step 2 -> 3: step 3 -> 4: decode        (the reference)
    4     rank 0: step 0 -> 1: step 1 -> 2: step 2 -> 3: step 3 + decode
    2+1   rank 0: steps 0,1 -> 1: steps 2,3 -> 2: decode
    2     rank 0: steps 0,1 -> 1: steps 2,3 + decode
    1+1   rank 0: steps 0..3 -> 1: decode
    1     rank 0: steps 0..3 + decode                                            (one process)

Blocks flow rank 0 -> 1 -> ... -> the last rank; the rank that decodes sends the re-anchor latent to
every other denoise rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SYNTAX = re.compile(r"^\s*([0-9]+)\s*(\+\s*1)?\s*$")


def parse_shape(text: str) -> tuple[int, bool]:
    """``"D+1"`` / ``"D"`` -> (D denoise ranks, decoder on a rank of its own); syntax only."""
    m = _SYNTAX.match(str(text))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"invalid lane shape {text!r}: write D+1 (the decoder on its own rank) or D (the decoder "
                         f"on the last denoise rank), D the number of denoise ranks, e.g. 4+1, 2+1, 2 or 1")
    return int(m.group(1)), m.group(2) is not None


@dataclass(frozen=True)
class LaneShape:
    """``denoisers`` denoise ranks of ``steps / denoisers`` steps each, then the decoder (own rank or not).

    ``LaneShape(steps=4)`` is the reference 4+1: one rank per step, the decoder on its own rank.
    """

    steps: int                       # denoising steps of one block (the scheduler's)
    denoisers: int | None = None     # denoise ranks (None: one per step)
    decoder_rank: bool = True        # the decoder on a rank of its own (the "+1")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"a lane needs at least one denoising step, got {self.steps}")
        if self.denoisers is None:
            object.__setattr__(self, "denoisers", self.steps)
        if self.denoisers < 1 or self.steps % self.denoisers:
            raise ValueError(f"invalid lane shape {self.name!r}: {self.denoisers} denoise ranks cannot share "
                             f"{self.steps} denoising steps evenly; valid shapes: {', '.join(self.valid(self.steps))}")

    # ---- names ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, steps: int) -> LaneShape:
        """The shape ``text`` (``"4+1"``, ``"2"``, ...) of a lane whose blocks take ``steps`` steps."""
        denoisers, own = parse_shape(text)
        return cls(steps=steps, denoisers=denoisers, decoder_rank=own)

    @staticmethod
    def valid(steps: int) -> list[str]:
        """Every shape a model of ``steps`` steps can run, most ranks first."""
        return [f"{d}{s}" for d in range(steps, 0, -1) if steps % d == 0 for s in ("+1", "")]

    @property
    def name(self) -> str:
        return f"{self.denoisers}{'+1' if self.decoder_rank else ''}"

    def __str__(self) -> str:
        return self.name

    # ---- ranks ---------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.denoisers + (1 if self.decoder_rank else 0)

    @property
    def steps_per_rank(self) -> int:
        return self.steps // self.denoisers

    @property
    def head(self) -> int:
        """The rank that takes the lane's input and draws each block's noise."""
        return 0

    @property
    def decode_rank(self) -> int:
        """The rank that runs the decoder (the last rank)."""
        return self.world_size - 1

    @property
    def denoise_ranks(self) -> range:
        return range(self.denoisers)

    def check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        return rank

    def is_decode(self, rank: int) -> bool:
        """True when ``rank`` runs the decoder (alone, or after its denoising steps)."""
        return self.check(rank) == self.decode_rank

    def steps_of(self, rank: int) -> tuple[int, ...]:
        """The denoising steps ``rank`` runs, in order (none on a decode-only rank)."""
        if self.check(rank) >= self.denoisers:
            return ()
        k = self.steps_per_rank
        return tuple(range(rank * k, (rank + 1) * k))

    def upstream(self, rank: int) -> int | None:
        """The rank ``rank`` receives the forward channel from (None for the head)."""
        return None if self.check(rank) == self.head else rank - 1

    def downstream(self, rank: int) -> int | None:
        """The rank ``rank`` sends the forward channel to (None for the decode rank)."""
        return None if self.is_decode(rank) else rank + 1

    def anchor_peers(self, rank: int) -> tuple[int, ...]:
        """The ranks the decode rank sends the re-anchor latent to (every denoise rank but itself)."""
        return tuple(r for r in self.denoise_ranks if r != rank) if self.is_decode(rank) else ()

    def stage_name(self, rank: int) -> str:
        """What the rank is called in logs, process names and errors: ``denoise-1``, ``denoise-2-3+decode``."""
        steps = self.steps_of(rank)
        if not steps:
            return "decode"
        name = f"denoise-{steps[0]}" + (f"-{steps[-1]}" if len(steps) > 1 else "")
        return name + ("+decode" if self.is_decode(rank) else "")
