"""The CUDA paths: bf16 on the GPU vs float32 on the CPU, FP8 (`torch._scaled_mm`) vs bf16, CUDA-graph
replay vs eager, and an NCCL hand-off of a block between two processes.

Every test here is marked ``gpu`` and skipped without CUDA (FP8 also needs compute capability >= 8.9,
NCCL two GPUs). Run them with ``pytest -m gpu tests/gpu``. Tolerances come from the error model in
models/precision.py; the CPU versions of these checks are in tests/unit/models/test_precision.py.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch

from models.accel import AccelOptions, StepRunner, accelerate
from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.generator import LiveAvatarGenerator
from models.precision import (
    FP8Linear,
    bf16_tolerance,
    dit_bf16_roundings,
    fp8_unavailable_reason,
    relative_error,
)
from tests.unit.models.test_precision import stream_inputs, velocity_errors

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
needs_fp8 = pytest.mark.skipif(not CUDA or fp8_unavailable_reason("cuda") is not None,
                               reason=fp8_unavailable_reason("cuda") or "")

TINY = DiTConfig.tiny()
# head_dim 128 like the real model (the flash / efficient SDPA kernels), still small enough for fp32 on CPU
WIDE = DiTConfig.tiny(dim=512, num_heads=4, ffn_dim=1024, num_layers=4)
FP8_TOL_PER_ROUNDING = 3 * 2 ** -4 / math.sqrt(3)          # the bf16 model with e4m3's u = 2^-4


def _model(cfg: DiTConfig, seed: int = 0) -> CausalWanS2V:
    torch.manual_seed(seed)
    return CausalWanS2V(cfg).eval()


def _cuda_bf16(model: CausalWanS2V) -> CausalWanS2V:
    return copy.deepcopy(model).to("cuda").cast(torch.bfloat16)


@pytest.mark.parametrize("cfg,hw", [(TINY, (8, 8)), (WIDE, (16, 16))], ids=["tiny", "wide-hd128"])
def test_bf16_dit_stream_on_cuda_matches_cpu_fp32(cfg, hw):
    ref = _model(cfg)
    errs = velocity_errors(ref, {"cuda-bf16": _cuda_bf16(ref)}, hw=hw)["cuda-bf16"]
    tol = bf16_tolerance(dit_bf16_roundings(cfg.num_layers))
    assert max(errs) < tol, (max(errs), tol)
    assert min(errs) > 2 ** -8 / 10                      # it really ran in bf16


@needs_fp8
@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_matches_the_dequantise_and_multiply_reference(scaling, fast_accum):
    """Real-size linear shapes. Both sides use the same e4m3 operands and round the result to bf16
    once; float32 accumulation order differs. Tolerance: two bf16 roundings (fast accumulation,
    Hopper's reduced-precision FP8 accumulator, gets four)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for n_in, n_out in ((5120, 5120), (5120, 13824), (13824, 5120)):
        lin = torch.nn.Linear(n_in, n_out, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(3168, n_in, device="cuda", generator=g, dtype=torch.bfloat16)
        layer = FP8Linear.from_linear(lin, scaling, fast_accum=fast_accum)
        with torch.no_grad():
            got, want = layer(x), layer.reference_forward(x)
        assert got.dtype == torch.bfloat16
        assert relative_error(got, want) < bf16_tolerance(4 if fast_accum else 2), (n_in, n_out)
        # and FP8 against plain bf16: one e4m3 rounding of each operand (2 roundings at u = 2^-4)
        assert relative_error(got, lin(x)) < FP8_TOL_PER_ROUNDING * math.sqrt(2)


@needs_fp8
def test_fp8_dit_stream_stays_close_to_bf16():
    base = _cuda_bf16(_model(WIDE))
    fp8 = copy.deepcopy(base)
    report = accelerate(fp8, AccelOptions(linear_precision="fp8"))
    assert report["fp8_converted"] == 10 * WIDE.num_layers + 4 * len(WIDE.audio_inject_layers)
    errs = velocity_errors(base, {"fp8": fp8}, hw=(16, 16))["fp8"]
    # one FP8 linear's error bound (see tests/unit/models/test_precision.py::test_emulated_fp8_dit_stays_close_to_bf16)
    assert 1e-3 < max(errs) < FP8_TOL_PER_ROUNDING * math.sqrt(2), errs


def _generate(dit, blocks, seed=0, options=None):
    ref, motion, text, audio, _ = stream_inputs(dit.config, (8, 8), blocks)
    gen = LiveAvatarGenerator(dit)
    session = gen.start(ref.cuda(), motion.cuda(), text.cuda(), seed=seed)
    return [x.float().cpu() for a in audio for x in gen.step_block(session, a.cuda()).step_latents], session


@pytest.mark.parametrize("compile_blocks", [False, True], ids=["graphs", "graphs+compile"])
def test_cuda_graph_replay_equals_eager(compile_blocks):
    """9 blocks: 3 eager while the rings fill, then every ring phase captured once per step and
    replayed; a second session with new caches is captured again and the first one's graphs go."""
    blocks = 9
    eager = _cuda_bf16(_model(TINY))
    graphed = copy.deepcopy(eager)
    accelerate(graphed, AccelOptions(cuda_graphs=True, compile=compile_blocks))
    runner = graphed.core_runner
    assert isinstance(runner, StepRunner)
    want, _ = _generate(eager, blocks)
    got, session = _generate(graphed, blocks)
    steps, phases = 4, TINY.kv_cache_blocks
    assert runner.stats["captures"] == steps * phases
    assert runner.stats["replays"] == steps * (blocks - (phases - 1))
    assert runner.stats["eager"] == steps * (phases - 1)
    # same kernels on the same inputs; a stale input buffer or a wrong phase graph is far off
    tol = bf16_tolerance(1) if compile_blocks else 1e-6
    assert max(relative_error(a, b) for a, b in zip(got, want)) < tol
    # session switch: the old session's graphs are dropped once its caches are gone
    del session
    import gc
    gc.collect()
    got2, _ = _generate(graphed, blocks, seed=1)
    want2, _ = _generate(eager, blocks, seed=1)
    assert runner.num_graphs == steps * phases
    assert max(relative_error(a, b) for a, b in zip(got2, want2)) < tol


def _nccl_worker(rank: int, init: str, result_path: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(7)
    block = torch.randn(1, 16, 3, 48, 88, generator=g).to(torch.bfloat16)   # a reference-size block latent
    if rank == 0:
        dist.send(block.cuda(), dst=1)
    else:
        got = torch.empty_like(block, device="cuda")
        dist.recv(got, src=0)
        torch.cuda.synchronize()
        torch.save({"equal": bool(torch.equal(got.cpu(), block))}, result_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL needs two GPUs: it refuses two ranks on one GPU ('Duplicate GPU detected', "
                           "NCCL >= 2.5); bench/gpu_bench.py records that and times the hand-off other ways")
def test_nccl_send_recv_of_a_block_between_two_processes():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_nccl_worker, args=(init, result), nprocs=2, join=True)
        assert torch.load(result)["equal"]
