"""Both ways of running a lane are one :class:`Runner`; the anchor is taken in one place.

That the two runners give the same blocks for one session is checked with real processes in
``tests/integration/stages/test_tpp.py`` (through this same protocol).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from models.config import ModelInputError
from models.generator import ANCHOR_BLOCK, anchor_from_block
from models.liveavatar import LiveAvatarConfig, build_models
from pipeline_stages.runner import Runner, SessionSpec, open_runner
from pipeline_stages.sequential import SequentialRunner, generate_blocks
from pipeline_stages.tpp import TPPLane

pytestmark = pytest.mark.unit

CFG = LiveAvatarConfig.tiny()
MEMBERS = sorted(name for name, v in vars(Runner).items()
                 if inspect.isfunction(v) and (not name.startswith("_") or name in ("__enter__", "__exit__")))


def test_the_protocol_is_what_callers_use():
    assert MEMBERS == ["__enter__", "__exit__", "close_session", "collect", "finish", "generate", "push_audio",
                       "start_session", "start_session_from_sink"]


@pytest.mark.parametrize("cls", [SequentialRunner, TPPLane])
def test_both_runners_satisfy_the_protocol(cls):
    for name in MEMBERS:
        want = list(inspect.signature(getattr(Runner, name)).parameters)
        got = list(inspect.signature(getattr(cls, name)).parameters)
        assert got == want, (cls.__name__, name, got, want)
    assert issubclass(cls, Runner)


@pytest.fixture(scope="module")
def session():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(80, 72, 3), dtype=np.uint8)
    pcm = (0.1 * rng.standard_normal(CFG.audio.block_samples * 2)).astype(np.float32)
    return SessionSpec(image, "", seed=3), pcm


def test_open_runner_builds_either_without_starting_anything(session):
    torch.set_num_threads(1)
    lane = open_runner(CFG, lane=True, seed=0, threads=1, package=False)
    assert isinstance(lane, TPPLane) and isinstance(lane, Runner) and lane.procs == []   # started by `with`
    spec, pcm = session
    with open_runner(CFG, lane=False, seed=0, package=False) as runner:
        assert isinstance(runner, SequentialRunner) and isinstance(runner, Runner)
        assert runner.start_session(spec) == b""
        got = list(runner.generate(pcm))
        assert runner.collect(block=True) == []         # push_audio already returned every block
        assert runner.close_session() == b""
    want = generate_blocks(build_models(CFG, seed=0), spec, pcm)
    assert [r.block_index for r in got] == [r.block_index for r in want] == [0, 1]
    for a, b in zip(got, want):
        assert torch.equal(a.latent, b.latent)


def test_the_anchor_is_block_zeros_first_latent_frame():
    x = torch.randn(1, 16, 3, 4, 4)
    assert ANCHOR_BLOCK == 0
    assert torch.equal(anchor_from_block(0, x), x[:, :, 0:1])
    assert all(anchor_from_block(b, x) is None for b in (1, 2, 4, 100))


def test_the_sequential_runner_anchors_every_stage_on_block_zero(session):
    torch.set_num_threads(1)
    spec, pcm = session
    runner = SequentialRunner(build_models(CFG, seed=0), package=False)
    runner.start_session(spec)
    [first] = runner.push_audio(pcm[:CFG.audio.block_samples])
    for stage in runner.denoise:
        assert torch.equal(stage.session.anchor_latent, first.latent[:, :, :1])
    with pytest.raises(ModelInputError):          # a whole block is not an anchor
        runner.denoise[0].set_anchor(first.latent)
