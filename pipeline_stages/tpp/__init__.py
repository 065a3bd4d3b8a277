"""Timestep-forcing Pipeline Parallelism (TPP): one lane = 4 denoise ranks + 1 decode rank.

Rank ``i < steps`` runs denoising step ``i`` for every block, with its own KV cache; rank ``steps``
runs the streaming VAE decode (:class:`LaneShape` says which rank does what). Blocks flow
``0 -> 1 -> 2 -> 3 -> 4`` as point-to-point messages (:mod:`pipeline_stages.transport`), so in steady
state a finished block leaves the lane every single-step time while each rank works on a different
block.

The re-anchored sink latent travels on its own channel from the decode rank to every denoise rank as
soon as block 0 is decoded-ready; a denoise rank only waits for it right before the block that needs
it (block 4), by which time it has long arrived, so the pipeline does not stall the way the
reference's broadcast at the clip boundary does.

- :mod:`~pipeline_stages.tpp.wire`: the messages into, through and out of a lane, and how each
  travels between ranks;
- :mod:`~pipeline_stages.tpp.shape`: which rank runs what;
- :mod:`~pipeline_stages.tpp.ranks`: one rank (:func:`run_rank`), what it reports to its supervisor;
- :mod:`~pipeline_stages.tpp.lane`: :class:`TPPLane`, the local lane (rank processes supervised from
  the caller, which runs the audio stage and packaging) that ``liveavatar generate --tpp`` and the
  tests use. The lane service (``services/lane``) runs the same :func:`run_rank` with Kafka-backed
  sources and outputs.
"""

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
from pipeline_stages.tpp.shape import LaneShape
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

__all__ = [
    "FLAG_REPLAY", "AnchorReady", "Block", "BlockDone", "EndSession", "Heartbeat", "LaneBlock", "LaneError",
    "LaneOutput", "LaneShape", "LaneSource", "RankFailed", "RankProgress", "RankReady", "RankReport", "RankSpec",
    "Reporter", "SessionEnded", "SessionStarted", "Shutdown", "StartSession", "TPPLane", "from_wire", "run_rank",
    "to_wire",
]
