"""Models benchmark: the tiny configuration end to end on this CPU, and the real-size FLOP budget.

Usage (from the repository root)::

    .venv/bin/python bench/models_bench.py                         # 2,010 blocks, ~10 min on 2 cores
    .venv/bin/python bench/models_bench.py --blocks 60 --out /tmp/b.json --doc none   # quick look
    .venv/bin/python bench/models_bench.py --gpu                   # + one real-size bf16 step on CUDA

What it measures
  1. The tiny configuration (``LiveAvatarConfig.tiny()``, 64x64, seeded random weights) through the
     real pipeline, ``pipeline_stages.sequential.SequentialRunner``: audio stage -> 4 denoising
     stages -> streaming VAE decode -> fMP4 packaging. Input: the example image
     ``examples/cyclops_baker.jpg`` and its speech ``cyclops_baker.wav`` looped to feed ``--blocks`` blocks,
     pushed one block (7,680 samples, 0.48 s) at a time, as a live feed would.
     Reported: session set-up time, first-block latency, steady FPS and real-time factor, per-block
     latency p50/p99 near block 10 (blocks 5..24) and near block 2,000 (blocks 1990..2009), peak and
     current RSS at both points, and the time per stage.
  2. The real-size (14B) configuration on the meta device (models/flops.py): FLOPs per denoising
     step and per block, first block and steady state, VAE decode, and the physical FPS bound on
     an H800/H100 SXM for 1 GPU and for TPP (4 DiT GPUs + 1 VAE GPU).
  3. With ``--gpu`` and CUDA present: the wall time of one real-size bf16 denoising step at 384x704
     in steady state (random weights; all 40 layers by default, or ``--gpu-layers N`` layers with a
     linear extrapolation to 40), the VAE decode of one block, and the MFU they imply.

Results go to a JSON file and into the marked section of docs/benchmarks-models.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.flops import DEVICE_SPECS, model_report, tflop  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402

EXAMPLES = examples_dir()
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"
EARLY_WINDOW = (5, 25)          # latency "at block 10": blocks 5..24
LATE_WINDOW = (1990, 2010)      # latency "at block 2,000": blocks 1990..2009


# ---------------------------------------------------------------------------------------------
# Machine and memory
# ---------------------------------------------------------------------------------------------

def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def memory_mib() -> dict[str, float]:
    """Current RSS and peak RSS (high-water mark) of this process, MiB (/proc, else getrusage)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out["rss_mib" if key == "VmRSS" else "peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    out.setdefault("peak_rss_mib", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "mean_ms": round(float(a.mean()), 1), "min_ms": round(float(a.min()), 1),
            "max_ms": round(float(a.max()), 1), "blocks": len(a)}


# ---------------------------------------------------------------------------------------------
# 1. The tiny pipeline on the CPU
# ---------------------------------------------------------------------------------------------

class StageTimer:
    """Wraps the runner's stage methods (on these instances only) and sums their wall time."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, obj, method: str, name: str) -> None:
        fn = getattr(obj, method)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t

        setattr(obj, method, timed)

    def reset(self) -> None:
        self.total.clear()


def run_tiny_pipeline(blocks: int, threads: int, seed: int = 0, progress: bool = True) -> dict[str, object]:
    from models.inputs import load_audio, load_image
    from models.liveavatar import LiveAvatarConfig, build_models
    from pipeline_stages.sequential import SequentialRunner, SessionSpec

    torch.set_num_threads(threads)
    config = LiveAvatarConfig.tiny()
    image = load_image(str(EXAMPLES / "cyclops_baker.jpg"), 40_000_000)
    pcm = load_audio(str(EXAMPLES / "cyclops_baker.wav"), 3600.0)
    n = config.audio.block_samples
    frames_per_block = config.audio.block_frames

    t0 = time.perf_counter()
    models = build_models(config, seed=seed)
    t_build = time.perf_counter() - t0
    runner = SequentialRunner(models, package=True)
    timer = StageTimer()
    timer.wrap(runner.audio, "push", "audio")
    for stage in runner.denoise:
        timer.wrap(stage, "run", stage.name)
    timer.wrap(runner.decode, "run", "decode")
    t0 = time.perf_counter()
    runner.start_session(SessionSpec(image_rgb=image, seed=seed))
    t_setup = time.perf_counter() - t0
    timer.wrap(runner.package, "push_block", "package")
    mem_start = memory_mib()

    late = (max(0, blocks - (LATE_WINDOW[1] - LATE_WINDOW[0])), blocks) if blocks < LATE_WINDOW[1] else LATE_WINDOW
    latencies: list[float] = []
    cpu_times: list[float] = []
    loads: list[float] = []
    mem_early = mem_late = None
    stage_steady: dict[str, float] = {}
    bytes_out = 0
    t_loop = time.perf_counter()
    t_steady = None
    for b in range(blocks):  # the stages run under torch.no_grad themselves, as in `liveavatar generate`
        if b == EARLY_WINDOW[0]:
            timer.reset()
            t_steady = time.perf_counter()
        start = (b * n) % len(pcm)                     # the speech, looped
        chunk = np.take(pcm, np.arange(start, start + n), mode="wrap")
        t, c = time.perf_counter(), time.process_time()
        out = runner.push_audio(chunk)
        latencies.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        loads.append(os.getloadavg()[0])                # one sample per block
        if len(out) != 1 or out[0].block_index != b or out[0].frames.shape[0] != frames_per_block:
            raise RuntimeError(f"block {b}: expected one block of {frames_per_block} frames, got {len(out)}")
        bytes_out += len(out[0].fragment)
        if b + 1 == EARLY_WINDOW[1]:
            mem_early = memory_mib()
        if b + 1 == late[1]:
            mem_late = memory_mib()
        if progress and (b + 1) % 100 == 0:
            print(f"  block {b + 1}/{blocks}  {np.mean(latencies[-100:]) * 1e3:.0f} ms/block  "
                  f"rss {memory_mib().get('rss_mib')} MiB", file=sys.stderr, flush=True)
    t_end = time.perf_counter()
    steady_blocks = blocks - EARLY_WINDOW[0]
    if t_steady is not None and steady_blocks > 0:
        stage_steady = {k: round(v / steady_blocks * 1e3, 2) for k, v in timer.total.items()}
    steady_s = (t_end - t_steady) if t_steady is not None else (t_end - t_loop)
    steady_frames = steady_blocks * frames_per_block if t_steady is not None else blocks * frames_per_block
    all_frames = blocks * frames_per_block
    tiny_hw = (64 // config.vae.stride[1], 64 // config.vae.stride[2])
    flops = model_report(config.dit, config.vae, tiny_hw, steps=config.scheduler.num_inference_steps)
    step_flops = flops["step_steady_state"]["total"]
    denoise_ms = [v for k, v in stage_steady.items() if k.startswith("denoise")]
    return {
        "config": "tiny", "resolution": [64, 64], "threads": threads, "blocks": blocks, "seed": seed,
        "audio_seconds_input": round(len(pcm) / config.audio.sample_rate, 2),
        "video_seconds": round(all_frames / config.fps, 2),
        "build_s": round(t_build, 2), "session_setup_s": round(t_setup, 2),
        "first_block_ms": round(latencies[0] * 1e3, 1),
        "steady_fps": round(steady_frames / steady_s, 2),
        "steady_real_time_factor": round(steady_frames / config.fps / steady_s, 3),
        "overall_fps_incl_setup": round(all_frames / (t_end - t_loop + t_setup), 2),
        "latency_early": {"window": list(EARLY_WINDOW), **percentiles(latencies[EARLY_WINDOW[0]:EARLY_WINDOW[1]]),
                          "load_median": round(float(np.median(loads[EARLY_WINDOW[0]:EARLY_WINDOW[1]])), 2)},
        "latency_late": {"window": list(late), **percentiles(latencies[late[0]:late[1]]),
                         "load_median": round(float(np.median(loads[late[0]:late[1]])), 2)},
        "cpu_time_early": percentiles(cpu_times[EARLY_WINDOW[0]:EARLY_WINDOW[1]]),
        "cpu_time_late": percentiles(cpu_times[late[0]:late[1]]),
        "steady_cpu_ms_per_block": round(float(np.mean(cpu_times[EARLY_WINDOW[0]:])) * 1e3, 1),
        "load_average_1min": {"min": round(min(loads), 2), "median": round(float(np.median(loads)), 2),
                              "max": round(max(loads), 2)},
        "memory_after_setup": mem_start, "memory_early": mem_early, "memory_late": mem_late,
        "stage_ms_per_block": stage_steady,
        "mp4_bytes_per_block": round(bytes_out / blocks),
        "dit_step_mflop": round(step_flops / 1e6, 2),
        "vae_block_mflop": round(flops["vae_decode_block"]["total"] / 1e6, 1),
        "dit_achieved_gflops": round(step_flops / (np.mean(denoise_ms) / 1e3) / 1e9, 2) if denoise_ms else None,
        "load_trend": [round(float(np.median(loads[i:i + 100])), 1) for i in range(0, blocks, 100)],
        "latency_trend_ms": [round(float(np.mean(latencies[i:i + 100])) * 1e3, 1) for i in range(0, blocks, 100)],
    }


# ---------------------------------------------------------------------------------------------
# 3. One real-size step on a GPU
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def time_dit_step(dit_config, latent_hw: tuple[int, int], layers: int, device: torch.device,
                  dtype: torch.dtype, iters: int = 5, warmup: int = 2) -> float:
    """Seconds per steady-state denoising step of a DiT cut to ``layers`` layers (random weights)."""
    from models.dit import CausalWanS2V
    from models.kv_cache import KVCache, SinkCache

    cfg = dataclasses.replace(dit_config, num_layers=layers,
                              audio_inject_layers=tuple(i for i in dit_config.audio_inject_layers if i < layers))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)              # build straight in the target dtype (no fp32 copy)
    try:
        model = CausalWanS2V(cfg, dtype=dtype, device=device).eval()
    finally:
        torch.set_default_dtype(previous)
    h, w = latent_hw
    fpb = cfg.frames_per_block
    with torch.inference_mode():
        sink = SinkCache.allocate(cfg, 1, latent_hw, device=device, dtype=dtype)
        kv = KVCache.allocate(cfg, 1, latent_hw, device=device, dtype=dtype)
        text = model.embed_text(torch.randn(1, cfg.text_len, cfg.text_dim, device=device))
        model.prefill_sink(torch.randn(1, cfg.in_dim, 1, h, w, device=device),
                           torch.randn(1, cfg.in_dim, cfg.motion_latent_frames, h, w, device=device), text, sink)
        x = torch.randn(1, cfg.in_dim, fpb, h, w, device=device, dtype=dtype)
        audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, cfg.vae_temporal_stride * fpb,
                            device=device, dtype=dtype)
        start = [cfg.kv_cache_frames]
        kv.start_frame, kv.end_frame = fpb, cfg.kv_cache_frames      # a full ring: steady state

        def step():
            f0 = start[0]
            model.forward_block(x, 1000.0, audio, text, kv, sink, f0, model.sink_ref_time(f0, cfg.sink_lead_min))
            start[0] += fpb

        return _time(step, device, iters, warmup)    # the model is freed when this frame ends


def time_vae_block(vae_config, latent_hw: tuple[int, int], device: torch.device, dtype: torch.dtype,
                   block_latents: int = 3, iters: int = 5, warmup: int = 2) -> float:
    from models.vae import WanVAE

    vae = WanVAE(vae_config).to(device=device, dtype=dtype).eval()
    h, w = latent_hw
    with torch.inference_mode():
        state = vae.init_decode_state()
        vae.decode_step(torch.randn(1, vae_config.z_dim, 7, h, w, device=device), state)
        z = torch.randn(1, vae_config.z_dim, block_latents, h, w, device=device)
        return _time(lambda: vae.decode_step(z, state), device, iters, warmup)


def run_gpu(report: dict[str, object], layers: int, device_name: str = "cuda", config_name: str = "reference",
            iters: int = 5) -> dict[str, object]:
    """Real-size (or ``config_name``) bf16 step and VAE block timing; MFU against the report's FLOPs."""
    from models.liveavatar import LiveAvatarConfig

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA device"}
    config = LiveAvatarConfig.load(config_name)
    dtype = torch.bfloat16
    latent_hw = tuple(report["latent_hw"])
    full = config.dit.num_layers
    def free() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if layers >= full:
        t_step = time_dit_step(config.dit, latent_hw, full, device, dtype, iters)
        free()
        how = f"all {full} layers"
        per_layer = None
    else:   # t(L) = a + b L through two depths, extrapolated to the full depth
        lo = max(1, layers // 2)
        t_lo = time_dit_step(config.dit, latent_hw, lo, device, dtype, iters)
        free()
        t_hi = time_dit_step(config.dit, latent_hw, layers, device, dtype, iters)
        free()
        per_layer = (t_hi - t_lo) / (layers - lo)
        t_step = t_hi + per_layer * (full - layers)
        how = f"{lo} and {layers} layers measured, linear extrapolation to {full}"
        if per_layer <= 0:   # timing noise larger than a layer: fall back to proportional scaling
            per_layer, t_step = t_hi / layers, t_hi * full / layers
            how = f"{layers} layers measured, scaled by {full}/{layers} (two-depth fit was noisy)"
    t_vae = time_vae_block(config.vae, latent_hw, device, dtype, config.dit.frames_per_block, iters)
    step_flops = report["step_steady_state"]["total"]
    vae_flops = report["vae_decode_block"]["total"]
    peak = float(DEVICE_SPECS["h100-sxm"]["bf16_tflops"]) * 1e12
    frames = config.dit.frames_per_block * config.dit.vae_temporal_stride
    return {
        "measured": True, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": "bfloat16", "method": how, "iters": iters, "latent_hw": list(latent_hw),
        "step_ms": round(t_step * 1e3, 2), "per_layer_ms": round(per_layer * 1e3, 3) if per_layer else None,
        "vae_block_ms": round(t_vae * 1e3, 2),
        "step_mfu_bf16": round(step_flops / t_step / peak, 4), "vae_mfu_bf16": round(vae_flops / t_vae / peak, 4),
        "tpp_fps": round(frames / max(t_step, t_vae), 2),
        "single_gpu_fps": round(frames / (4 * t_step + t_vae), 2),
        "note": "random weights, eager PyTorch (no torch.compile, SDPA attention, fp64 RoPE as in models/rope.py)",
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def reference_summary() -> dict[str, object]:
    from models.config import DiTConfig
    from models.vae import VAEConfig

    return model_report(DiTConfig(), VAEConfig(), (48, 88), device="h800-sxm")


def markdown(res: dict[str, object], command: str) -> str:
    m, t, r = res["machine"], res["tiny"], res["reference"]
    b = r["physical_bound"]
    gpu = res.get("gpu") or {"measured": False}
    late_label = "block 2,000" if t["latency_late"]["window"][0] >= 1990 else f"block {t['latency_late']['window'][0]}+"

    def lat(x):
        return (f"p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, min {x['min_ms']} ms "
                f"(blocks {x['window'][0]}..{x['window'][1] - 1}; 1-min load average {x['load_median']})")

    def mem(x):
        return f"{x['peak_rss_mib']} MiB peak, {x['rss_mib']} MiB current" if x else "n/a"

    stages = ", ".join(f"{k} {v}" for k, v in t["stage_ms_per_block"].items())
    lines = [
        DOC_BEGIN,
        f"_Generated by `bench/models_bench.py` on {res['date']}. Rerun:_",
        "",
        "```bash",
        command,
        "```",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} CPU cores, {m['memory_gib']} GiB RAM, no GPU"
        f"{' (CUDA: ' + str(m['cuda']) + ')' if m['cuda'] else ''}; Python {m['python']}, torch {m['torch']}, "
        f"{t['threads']} torch threads.",
        "",
        "### Tiny configuration through the real pipeline (CPU)",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| configuration | `LiveAvatarConfig.tiny()`, {t['resolution'][0]}x{t['resolution'][1]}, seeded random weights |",
        f"| input | `cyclops_baker.jpg` + `cyclops_baker.wav` ({t['audio_seconds_input']} s, looped), "
        f"pushed 0.48 s at a time |",
        f"| blocks generated | {t['blocks']} ({t['video_seconds']} s of video) |",
        f"| session set-up (sink encode + prefill of 4 stages + packager) | {t['session_setup_s']} s |",
        f"| first block latency | {t['first_block_ms']} ms |",
        f"| steady throughput (blocks {EARLY_WINDOW[0]}..{t['blocks'] - 1}) | **{t['steady_fps']} FPS**, "
        f"real-time factor **{t['steady_real_time_factor']}** (>1 = faster than real time) |",
        f"| per-block latency near block 10 | {lat(t['latency_early'])} |",
        f"| per-block latency near {late_label} | {lat(t['latency_late'])} |",
        f"| process CPU time per block (all threads), near block 10 / near {late_label} | "
        f"p50 {t['cpu_time_early']['p50_ms']} / {t['cpu_time_late']['p50_ms']} ms "
        f"(steady mean {t['steady_cpu_ms_per_block']} ms) |",
        f"| machine load during the run (1-min load average, 2 cores, shared with other jobs) | "
        f"min {t['load_average_1min']['min']}, median {t['load_average_1min']['median']}, "
        f"max {t['load_average_1min']['max']} |",
        f"| memory after set-up | {mem(t['memory_after_setup'])} |",
        f"| memory at block {EARLY_WINDOW[1]} | {mem(t['memory_early'])} |",
        f"| memory at block {t['latency_late']['window'][1]} | {mem(t['memory_late'])} |",
        f"| time per stage, ms per block (steady) | {stages} |",
        f"| tiny FLOPs: DiT step / VAE block decode | {t['dit_step_mflop']} MFLOP / {t['vae_block_mflop']} MFLOP "
        f"(DiT achieves {t['dit_achieved_gflops']} GFLOP/s here: tiny matmuls are overhead-bound) |",
        f"| mean latency per 100 blocks, ms | {', '.join(map(str, t['latency_trend_ms']))} |",
        f"| median 1-min load average per 100 blocks | {', '.join(map(str, t['load_trend']))} |",
        "",
        "### Real-size configuration (14B, 384x704): FLOPs and the physical bound",
        "",
        "Counted on the meta device with `torch.utils.flop_counter` (FLOPs = 2 x MACs) and equal to the closed "
        f"form (max relative difference {r['analytic_relative_error']}). Bound on an "
        f"{b['device_spec']['name']} ({b['device_spec']['bf16_tflops']:.0f} TFLOPS dense BF16, "
        f"{b['device_spec']['fp8_tflops']:.0f} FP8, {b['device_spec']['hbm_tb_s']} TB/s).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| DiT parameters / state-dict keys | {r['dit_parameters']:,} / {r['dit_state_dict_keys']} |",
        f"| tokens per block / sink tokens / attention keys (first, steady) | {r['tokens_per_block']} / "
        f"{r['sink_tokens']} / {r['keys_first_block']}, {r['keys_steady_state']} |",
        f"| FLOPs per denoising step, steady state | **{tflop(r['step_steady_state']['total'], 1)} TFLOP** "
        f"(linear {tflop(r['step_steady_state']['linear'], 1)}, attention {tflop(r['step_steady_state']['attention'], 1)}, "
        f"conv {tflop(r['step_steady_state']['conv'], 3)}) |",
        f"| FLOPs per denoising step, first block | {tflop(r['step_first_block']['total'], 1)} TFLOP "
        f"(attention {tflop(r['step_first_block']['attention'], 1)}) |",
        f"| FLOPs per block (4 steps), steady / first | {tflop(r['block_steady_state']['total'], 1)} / "
        f"{tflop(r['block_first']['total'], 1)} TFLOP |",
        f"| sink prefill (once per session and at re-anchoring, per stage) | {tflop(r['sink_prefill']['total'], 1)} TFLOP |",
        f"| VAE decode per block (3 latents -> 12 frames) | {tflop(r['vae_decode_block']['total'], 1)} TFLOP |",
        f"| step time at 100% peak, BF16 / FP8 linears | {b['step_ms_bf16']:.0f} ms / {b['step_ms_fp8_linear']:.0f} ms "
        f"(memory floor {b['step_memory_ms']:.1f} ms: compute-bound) |",
        f"| 1 GPU (4 steps + VAE per block), FPS bound BF16 / FP8 | {b['single_gpu']['fps_bf16']:.1f} / "
        f"{b['single_gpu']['fps_fp8_linear']:.1f} FPS (real time needs 25) |",
        f"| TPP (4 DiT GPUs + 1 VAE GPU), FPS bound BF16 / FP8 | {b['tpp']['fps_bf16']:.1f} / "
        f"{b['tpp']['fps_fp8_linear']:.1f} FPS |",
        f"| MFU implied by the claimed {b['claimed']['fps']:.0f} FPS (TPP, 5 x H800) | "
        f"{100 * b['claimed']['mfu_bf16']:.1f}% of BF16 peak, {100 * b['claimed']['mfu_fp8_linear']:.1f}% of the FP8-linear "
        f"peak ({b['claimed']['step_ms']:.0f} ms per step) |",
        f"| first-frame floor (4 first-block steps + VAE at peak) | {b['first_frame_floor_ms_bf16']:.0f} ms |",
    ]
    if gpu.get("measured"):
        lines.append(f"| real-size denoising step on a GPU (bf16, 384x704, steady) | **{gpu['step_ms']} ms** on "
                     f"{gpu['device']} ({gpu['method']}), {100 * gpu['step_mfu_bf16']:.1f}% MFU; VAE block "
                     f"{gpu['vae_block_ms']} ms; TPP {gpu['tpp_fps']} FPS, 1 GPU {gpu['single_gpu_fps']} FPS |")
    else:
        lines.append("| real-size denoising step on a GPU | not measured: no GPU in this session "
                     "(run with `--gpu` on a CUDA machine) |")
    lines += ["", DOC_END]
    return "\n".join(lines)


def write_doc(path: Path, section: str) -> None:
    if path.exists():
        text = path.read_text()
        if DOC_BEGIN in text and DOC_END in text:
            head, rest = text.split(DOC_BEGIN, 1)
            tail = rest.split(DOC_END, 1)[1]
            path.write_text(head + section + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Models benchmark\n\n" + section + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2010, help="blocks to generate (default 2010: latency near block 2,000)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default="docs/benchmarks-models.json", help="JSON results file")
    p.add_argument("--doc", default="docs/benchmarks-models.md", help="markdown file to update ('none' to skip)")
    p.add_argument("--gpu", action="store_true", help="also time one real-size bf16 step on CUDA")
    p.add_argument("--gpu-layers", type=int, default=40, help="layers to build on the GPU (< 40: extrapolate)")
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)   # e.g. 'cpu' to dry-run the path
    p.add_argument("--gpu-config", default="reference", help=argparse.SUPPRESS)
    p.add_argument("--gpu-iters", type=int, default=5, help="timed iterations per GPU measurement")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.blocks < EARLY_WINDOW[1]:
        p.error(f"--blocks must be >= {EARLY_WINDOW[1]}")
    torch.set_num_threads(args.threads)

    command = "cd /work/main && .venv/bin/python bench/models_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": command.strip(), "machine": machine()}
    if not args.quiet:
        print("reference FLOPs (meta device) ...", file=sys.stderr, flush=True)
    res["reference"] = reference_summary()
    if args.gpu:
        res["gpu"] = run_gpu(res["reference"], args.gpu_layers, args.gpu_device, args.gpu_config,
                             iters=args.gpu_iters)
    else:
        res["gpu"] = {"measured": False, "reason": "not requested (--gpu)" if torch.cuda.is_available()
                      else "no GPU in this session"}
    if not args.quiet:
        print(f"tiny pipeline, {args.blocks} blocks ...", file=sys.stderr, flush=True)
    res["tiny"] = run_tiny_pipeline(args.blocks, args.threads, progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    if args.doc != "none":
        write_doc(Path(args.doc), markdown(res, res["command"]))
    print(json.dumps({k: res["tiny"][k] for k in ("steady_fps", "steady_real_time_factor", "latency_early",
                                                  "latency_late", "memory_early", "memory_late")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
