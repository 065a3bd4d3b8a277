"""Timestep-forcing Pipeline Parallelism (TPP): a lane of denoise ranks and a decoder, blocks in flight.

In the reference shape, 4+1, rank ``i < 4`` runs denoising step ``i`` for every block, with its own KV
cache, and rank 4 runs the streaming VAE decode. Blocks flow ``0 -> 1 -> 2 -> 3 -> 4`` as point-to-point
messages (:mod:`pipeline_stages.transport`), so in steady state a finished block leaves the lane every
single-step time while each rank works on a different block. Other shapes (``2+1``, ``2``, ``1``, ...:
:class:`LaneShape`) give a rank several steps (one KV cache each) or put the decoder on the last denoise
rank; every shape gives the same blocks as the sequential runner.

The re-anchored sink latent travels on its own channel from the decode rank to every other denoise
rank as soon as block 0's final latent is there; a denoise rank only waits for it right before the
block that needs it (block 4), by which time it has long arrived, so the pipeline does not stall the
way the reference's broadcast at the clip boundary does.

- :mod:`~pipeline_stages.tpp.wire`: the messages into, through and out of a lane, and how each
  travels between ranks;
- :mod:`~pipeline_stages.tpp.shape`: which rank runs what;
- :mod:`~pipeline_stages.tpp.ranks`: one rank (:func:`run_rank`), what it reports to its supervisor;
- :mod:`~pipeline_stages.tpp.lane`: :class:`TPPLane`, the local lane (rank processes supervised from
  the caller, which runs the audio stage and packaging) that ``liveavatar generate --tpp`` and the
  tests use. The lane service (``services/lane``) runs the same :func:`run_rank` with Kafka-backed
  sources and outputs.

Names are imported lazily (the first use of ``pipeline_stages.tpp.X`` imports its module), so a process
that only needs :func:`~pipeline_stages.tpp.shape.parse_shape` (the local supervisor) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "LaneError": "lane", "TPPLane": "lane",
    "LaneOutput": "ranks", "LaneSource": "ranks", "RankFailed": "ranks", "RankProgress": "ranks",
    "RankReady": "ranks", "RankReport": "ranks", "RankSpec": "ranks", "Reporter": "ranks", "run_rank": "ranks",
    "LaneShape": "shape", "parse_shape": "shape",
    "FLAG_REPLAY": "wire", "AnchorReady": "wire", "Block": "wire", "BlockDone": "wire", "EndSession": "wire",
    "Heartbeat": "wire", "LaneBlock": "wire", "SessionEnded": "wire", "SessionStarted": "wire",
    "Shutdown": "wire", "StartSession": "wire", "from_wire": "wire", "to_wire": "wire",
}

__all__ = [
    "FLAG_REPLAY", "AnchorReady", "Block", "BlockDone", "EndSession", "Heartbeat", "LaneBlock", "LaneError",
    "LaneOutput", "LaneShape", "LaneSource", "RankFailed", "RankProgress", "RankReady", "RankReport", "RankSpec",
    "Reporter", "SessionEnded", "SessionStarted", "Shutdown", "StartSession", "TPPLane", "from_wire", "parse_shape",
    "run_rank", "to_wire",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from pipeline_stages.tpp.lane import LaneError, TPPLane
    from pipeline_stages.tpp.ranks import (
        LaneOutput,
        LaneSource,
        RankFailed,
        RankProgress,
        RankReady,
        RankReport,
        RankSpec,
        Reporter,
        run_rank,
    )
    from pipeline_stages.tpp.shape import LaneShape, parse_shape
    from pipeline_stages.tpp.wire import (
        FLAG_REPLAY,
        AnchorReady,
        Block,
        BlockDone,
        EndSession,
        Heartbeat,
        LaneBlock,
        SessionEnded,
        SessionStarted,
        Shutdown,
        StartSession,
        from_wire,
        to_wire,
    )
