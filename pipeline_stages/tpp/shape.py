"""A lane's shape: which rank runs which denoising steps, where the decoder sits, who talks to whom.

Every rank-to-role question of the lane (rank loops, the local supervisor, the lane service) is
answered here, so the rest of the lane never assumes that rank ``i`` is step ``i``.

The shape built today is the reference 4+1 (``steps`` denoise ranks, one step each, then the decoder
on its own rank)::

    rank      0          1          2          3          4
    runs      step 0 ->  step 1 ->  step 2 ->  step 3 ->  decode

Other shapes (D denoise ranks running ``steps / D`` steps each, the decoder on its own rank or on the
last denoise rank) would change only this class and the rank loop that runs a decoder beside steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaneShape:
    """``steps`` denoise ranks (rank ``i`` runs step ``i``), then the decode rank."""

    steps: int                 # denoising steps of one block (the scheduler's)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"a lane needs at least one denoising step, got {self.steps}")

    @property
    def world_size(self) -> int:
        return self.steps + 1

    @property
    def head(self) -> int:
        """The rank that takes the lane's input and draws each block's noise."""
        return 0

    @property
    def decode_rank(self) -> int:
        return self.steps

    @property
    def denoise_ranks(self) -> range:
        return range(self.steps)

    def check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        return rank

    def is_decode(self, rank: int) -> bool:
        return self.check(rank) == self.decode_rank

    def steps_of(self, rank: int) -> tuple[int, ...]:
        """The denoising steps ``rank`` runs, in order (none on a decode-only rank)."""
        return () if self.is_decode(rank) else (rank,)

    def upstream(self, rank: int) -> int | None:
        """The rank ``rank`` receives the forward channel from (None for the head)."""
        return None if self.check(rank) == self.head else rank - 1

    def downstream(self, rank: int) -> int | None:
        """The rank ``rank`` sends the forward channel to (None for the decode rank)."""
        return None if self.is_decode(rank) else rank + 1

    def stage_name(self, rank: int) -> str:
        """What the rank is called in logs, process names and errors."""
        return "decode" if self.is_decode(rank) else f"denoise-{rank}"
