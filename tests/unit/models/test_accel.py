"""The denoising-step runner (models/accel.py) on CPU: eager runner == model, compiled runner ~= eager.

CUDA-graph capture and replay need a GPU: tests/gpu/test_cuda_paths.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.accel import AccelOptions, StepRunner, accelerate
from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.generator import LiveAvatarGenerator
from models.precision import relative_error

pytestmark = pytest.mark.unit

CFG = DiTConfig.tiny()
HW = (8, 8)
BLOCKS = 6
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(1, CFG.in_dim, 1, *HW, generator=g)
    motion = torch.randn(1, CFG.in_dim, CFG.motion_latent_frames, *HW, generator=g)
    text = torch.randn(1, 5, CFG.text_dim, generator=g)
    audio = [torch.randn(1, CFG.num_audio_layers, CFG.audio_dim, 4 * CFG.frames_per_block, generator=g)
             for _ in range(BLOCKS)]
    return ref, motion, text, audio


def _stream(dit, seed=0):
    ref, motion, text, audio = _inputs(seed)
    gen = LiveAvatarGenerator(dit)
    session = gen.start(ref, motion, text, seed=5)
    return [x for a in audio for x in gen.step_block(session, a).step_latents]


@pytest.fixture()
def dit():
    torch.manual_seed(0)
    return CausalWanS2V(CFG).eval()


def test_defaults_install_nothing(dit):
    report = accelerate(dit, AccelOptions())
    assert dit.core_runner is None and "fp8_converted" not in report


def test_eager_runner_equals_the_model_bit_for_bit(dit):
    """The runner's own block loop (opaque attention per layer) computes exactly what _core does."""
    reference = _stream(dit)
    dit.core_runner = StepRunner(dit, AccelOptions())
    out = _stream(dit)
    assert dit.core_runner.stats["eager"] == BLOCKS * 4
    assert all(torch.equal(a, b) for a, b in zip(out, reference))
    # and the runner really is on the path: a runner that changes its result changes the stream
    runner = StepRunner(dit, AccelOptions())
    dit.core_runner = lambda *args: runner(*args) * 1.01
    assert not torch.equal(_stream(dit)[-1], reference[-1])


@pytest.mark.slow
def test_compiled_blocks_match_eager_within_fp32_roundoff(dit):
    """torch.compile fuses and reorders float32 arithmetic; under the same error model as bf16
    (models/precision.py) with fp32's u = 2^-24 and one rounding per fused op, a block has about
    30 of them (norms, modulation, 8 projections, 2 attentions, FFN, residuals), so
    tol = 3 u / sqrt(3) sqrt(30 layers + 2) per step; the 24 steps of the stream are checked."""
    reference = _stream(dit)
    report = accelerate(dit, AccelOptions(compile=True))
    assert isinstance(dit.core_runner, StepRunner) and report["options"]["compile"]
    out = _stream(dit)
    tol = 3 * FP32_UNIT_ROUNDOFF / math.sqrt(3) * math.sqrt(30 * CFG.num_layers + 2)
    errs = [relative_error(a, b) for a, b in zip(out, reference)]
    assert max(errs) < tol, (max(errs), tol)
    # compiled code really ran (not a silent fallback to eager): dynamo captured graphs
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 2
