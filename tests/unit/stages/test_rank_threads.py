"""Each lane rank's CPU thread count: the decode rank may get its own (the VAE decode costs far more
than a denoising step on CPU); unset, every rank uses ``threads``."""

from __future__ import annotations

import pytest

from models.liveavatar import LiveAvatarConfig
from pipeline_stages.tpp import LaneShape, RankSpec

pytestmark = pytest.mark.unit


def _spec(rank: int, **kw) -> RankSpec:
    return RankSpec(rank=rank, shape=LaneShape(steps=4), config=LiveAvatarConfig.tiny(), init_method="file:///x", **kw)


def test_decode_threads_apply_to_the_decode_rank_only():
    threads = [_spec(r, threads=1, decode_threads=2).torch_threads for r in range(5)]
    assert threads == [1, 1, 1, 1, 2]
    assert _spec(4, threads=1, decode_threads=2).is_decode


def test_without_decode_threads_every_rank_uses_threads():
    assert [_spec(r, threads=3).torch_threads for r in range(5)] == [3] * 5


def test_the_lane_service_reads_decode_threads_from_the_environment(monkeypatch):
    from services.lane.worker import LaneSettings

    monkeypatch.setenv("LIVEAVATAR_DECODE_THREADS", "2")
    assert LaneSettings().decode_threads == 2
    monkeypatch.delenv("LIVEAVATAR_DECODE_THREADS")
    assert LaneSettings().decode_threads is None
