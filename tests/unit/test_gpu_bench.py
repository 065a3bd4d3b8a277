"""bench/gpu_bench.py --tiny: the GPU benchmark's code path on the CPU (tiny config), end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_bench import LANE_SHAPES, lane_projection  # noqa: E402

pytestmark = pytest.mark.unit


def test_lane_projection_arithmetic():
    step, first, vae, hop = 0.25, 0.2, 0.06, 0.001
    t = lane_projection(step, first, vae, hop, step_flops=100e12, vae_flops=20e12, peak_flops=1000e12)
    assert list(t) == list(LANE_SHAPES)
    assert t["4+1"]["gpus"] == 5 and t["4+1"]["block_period_ms"] == pytest.approx(1e3 * (step + hop))
    assert t["1"]["block_period_ms"] == pytest.approx(1e3 * (4 * step + vae))          # one GPU does it all
    assert t["2"]["block_period_ms"] == pytest.approx(1e3 * (2 * step + vae + hop))    # decoder on the last GPU
    assert t["1+1"]["fps"] == pytest.approx(12 / (4 * step + hop), abs=0.01)
    assert t["4+1"]["ttff_ms"] == pytest.approx(1e3 * (4 * first + 4 * hop + vae), abs=0.1)
    assert t["1"]["mfu"] == pytest.approx((4 * 100e12 + 20e12) / ((4 * step + vae) * 1 * 1000e12), abs=1e-4)


@pytest.mark.slow
def test_tiny_mode_runs_the_whole_bench_and_records_failures(tmp_path):
    docs_json = ROOT / "docs" / "benchmarks-gpu.json"
    before = docs_json.stat().st_mtime_ns if docs_json.exists() else None
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "benchmarks-gpu.json").read_text())
    assert res["tiny"] and res["config"] == "tiny"
    dit = res["dit"]
    assert dit["bf16"]["step_ms_median"] > 0 and dit["bf16"]["output_finite"]
    # the CUDA-only variants fail on the CPU with the clear error, and the bench carries on
    assert "cuda_graphs=True needs the model on a CUDA device" in dit["bf16+graphs"]["error"]
    assert "linear_precision='fp8' is not available" in dit["fp8"]["error"]
    assert res["vae"]["block_ms_median"] > 0 and res["vae"]["frames_per_block"] == 12
    hop = res["handoff"]["gloo, CPU"]
    assert hop["ok"] and hop["one_way_ms_median"] > 0
    assert set(res["projection_measured"]["bf16"]) == set(LANE_SHAPES)
    one = res["projection_measured"]["bf16"]["1"]
    assert one["block_period_ms"] == pytest.approx(4 * dit["bf16"]["step_ms_median"] + res["vae"]["block_ms_median"],
                                                   rel=1e-3)
    md = (tmp_path / "gpu.md").read_text()
    assert "<!-- gpu-bench:begin -->" in md and "| bf16 |" in md
    # --tiny never writes the repository's docs
    assert (docs_json.stat().st_mtime_ns if docs_json.exists() else None) == before
    refused = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--out",
                              str(ROOT / "docs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "must not overwrite docs" in refused.stderr
