"""GPU benchmark: one real-size denoising step (bf16 / FP8, with and without torch.compile and CUDA
graphs), the VAE decode of one block, the hand-off of a block between two processes, and the
projected lane FPS, time to first frame and MFU for every lane shape.

Usage (from the repository root)::

    python bench/gpu_bench.py --out docs          # one GPU (H200): writes docs/benchmarks-gpu.json and
                                                  # the measured section of docs/gpu.md; a few minutes
    python bench/gpu_bench.py --tiny              # the same code path on the CPU, tiny config, < 1 min;
                                                  # writes to a temporary directory (never to docs/)

What it measures (random weights built directly on the device in bf16; nothing is downloaded)
  1. The DiT step: the reference configuration (40 layers, 384x704 -> latent 48x88, 3 latent frames per
     block) in steady state: the KV ring holds 12 latent frames (L = 15,312 keys with the sink). One
     model, variants run in this order: bf16 eager, bf16 + CUDA graphs, fp8, fp8 + graphs, then the
     torch.compile variants (compile time is recorded apart). Each variant: warm-up steps (all four ring
     phases, so every graph is captured), then ``--iters`` timed steps (median and mean reported).
  2. The VAE: the streaming decode of one block (3 latents -> 12 frames) after the 7-latent warm-up
     chunk, bf16, reference size.
  3. The hand-off: a block latent [1,16,3,48,88] plus its audio features [1,25,1024,12] (bf16, 1 MB)
     between two processes, ping-pong: first NCCL (two GPUs if present, else both ranks on one GPU,
     which NCCL refuses: the error is recorded), then gloo with the tensors staged through host memory.
  4. The projection (models/flops.py FLOPs, measured step and VAE times): lane shapes 4+1, 4, 2+1, 2,
     1+1, 1 (D denoise GPUs each running 4/D steps; "+1" = the decoder on its own GPU, else on the
     last denoise GPU): FPS, time to first frame and MFU.

A part that fails (compile errors, out of memory, NCCL refusing) is recorded in the JSON with its error
and the bench carries on. The JSON is rewritten after every part, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.flops import DEVICE_SPECS, count_dit_flops_meta, count_vae_decode_flops_meta  # noqa: E402

DOC_BEGIN, DOC_END = "<!-- gpu-bench:begin -->", "<!-- gpu-bench:end -->"
JSON_NAME, DOC_NAME = "benchmarks-gpu.json", "gpu.md"
LANE_SHAPES = ("4+1", "4", "2+1", "2", "1+1", "1")
VARIANTS = ("bf16", "bf16+graphs", "fp8", "fp8+graphs", "bf16+compile", "bf16+compile+graphs",
            "fp8+compile", "fp8+compile+graphs")
PEAK_DEVICE = "h200-sxm"          # peaks used for MFU (models/flops.py DEVICE_SPECS)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": "".join(traceback.format_exception(exc))[-3000:]}


def machine(device: torch.device) -> dict[str, object]:
    out: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(),
                              "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   gpu_count=torch.cuda.device_count())
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:   # noqa: BLE001 - informational only
            out["nccl"] = f"unknown ({exc})"
    else:
        out["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return out


def parse_variant(name: str) -> dict[str, object]:
    parts = name.split("+")
    if parts[0] not in ("bf16", "fp8") or not set(parts[1:]) <= {"compile", "graphs"}:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return {"linear_precision": parts[0], "compile": "compile" in parts, "cuda_graphs": "graphs" in parts}


# ---------------------------------------------------------------------------------------------
# 1. The DiT step
# ---------------------------------------------------------------------------------------------

class StepBench:
    """One model on the device, a steady-state KV ring and sink; times forward_block + Euler update."""

    def __init__(self, config, latent_hw, device: torch.device, dtype: torch.dtype, seed: int = 0):
        from models.dit import CausalWanS2V
        from models.kv_cache import KVCache, SinkCache

        torch.manual_seed(seed)
        t0 = time.perf_counter()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)             # build straight in the target dtype (no fp32 copy)
        try:
            model = CausalWanS2V(config, dtype=dtype, device=device)
        finally:
            torch.set_default_dtype(previous)
        self.model = model.cast(dtype).eval()      # FP32_MODULES back to fp32, as the loader does
        _sync(device)
        self.build_s = time.perf_counter() - t0
        self.config, self.hw, self.device, self.dtype = config, tuple(latent_hw), device, dtype
        cfg, (h, w) = config, latent_hw
        fpb = cfg.frames_per_block
        g = torch.Generator().manual_seed(seed + 1)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device)

        with torch.inference_mode():
            self.sink = SinkCache.allocate(cfg, 1, self.hw, device=device, dtype=dtype)
            self.kv = KVCache.allocate(cfg, 1, self.hw, device=device, dtype=dtype)
            self.text = self.model.embed_text(rand(1, cfg.text_len, cfg.text_dim))
            self.model.prefill_sink(rand(1, cfg.in_dim, 1, h, w), rand(1, cfg.in_dim, cfg.motion_latent_frames, h, w),
                                    self.text, self.sink)
            self.x = rand(1, cfg.in_dim, fpb, h, w).to(dtype)
            self.audio = rand(1, cfg.num_audio_layers, cfg.audio_dim, cfg.vae_temporal_stride * fpb).to(dtype)
        # steady state: the ring already holds kv_cache_frames - fpb earlier frames
        self.kv.start_frame, self.kv.end_frame = fpb, cfg.kv_cache_frames
        self.frame = cfg.kv_cache_frames

    def step(self) -> torch.Tensor:
        m, cfg = self.model, self.config
        f0 = self.frame
        v = m.forward_block(self.x, 1000.0, self.audio, self.text, self.kv, self.sink, f0,
                            m.sink_ref_time(f0, cfg.sink_lead_min))
        self.frame += cfg.frames_per_block
        return v

    def time_steps(self, warmup: int, iters: int) -> dict[str, object]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(warmup):
                v = self.step()
            _sync(self.device)
            warm_s = time.perf_counter() - t0
            finite = bool(torch.isfinite(v).all())
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                self.step()
                _sync(self.device)
                times.append(time.perf_counter() - t)
        return {"warmup_steps": warmup, "warmup_s": round(warm_s, 3), "iters": iters,
                "step_ms_median": round(1e3 * statistics.median(times), 3),
                "step_ms_mean": round(1e3 * statistics.fmean(times), 3),
                "step_ms_min": round(1e3 * min(times), 3), "output_finite": finite}


def run_dit_variants(bench: StepBench, variants: list[str], warmup: int, iters: int, budget_s: float,
                     t_start: float, save) -> dict[str, dict]:
    """Run the variants in the order given; the FP8 conversion is in place, so every bf16 variant
    must come before the first fp8 one (the caller orders them)."""
    from models.accel import AccelOptions, accelerate

    out: dict[str, dict] = {}
    fp8_done = False
    for name in variants:
        opts = parse_variant(name)
        if time.perf_counter() - t_start > budget_s:
            out[name] = {"skipped": f"time budget of {budget_s:.0f} s used up"}
            save(out)
            continue
        res: dict[str, object] = {"options": opts}
        try:
            if opts["linear_precision"] == "fp8" and not fp8_done:
                t = time.perf_counter()
                report = accelerate(bench.model, AccelOptions(linear_precision="fp8"))
                _sync(bench.device)
                res["fp8_convert_s"] = round(time.perf_counter() - t, 3)
                res["fp8_converted_linears"] = report["fp8_converted"]
                fp8_done = True
            elif opts["linear_precision"] == "bf16" and fp8_done:
                raise RuntimeError("bf16 variants must run before the in-place FP8 conversion")
            # the precision is already applied; install only the step runner for this variant
            runner_opts = AccelOptions(compile=bool(opts["compile"]), cuda_graphs=bool(opts["cuda_graphs"]))
            accelerate_runner(bench.model, runner_opts)
            if opts["compile"]:                      # first steps compile; time them apart
                t = time.perf_counter()
                with torch.inference_mode():
                    bench.step()
                _sync(bench.device)
                res["compile_first_step_s"] = round(time.perf_counter() - t, 3)
            res.update(bench.time_steps(warmup, iters))
            runner = bench.model.core_runner
            if runner is not None:
                res["runner_stats"] = dict(runner.stats)
        except Exception as exc:   # noqa: BLE001 - record and continue
            res.update(_error(exc))
        finally:
            bench.model.core_runner = None
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
                res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(bench.device) / 2**30, 2)
        out[name] = res
        save(out)
    return out


def accelerate_runner(model, options) -> None:
    """Install the step runner only (precision untouched)."""
    from models.accel import accelerate

    accelerate(model, options)


# ---------------------------------------------------------------------------------------------
# 2. The VAE decode of one block
# ---------------------------------------------------------------------------------------------

def time_vae(vae_config, latent_hw, device: torch.device, dtype: torch.dtype, block_latents: int,
             warmup: int, iters: int) -> dict[str, object]:
    from models.vae import WanVAE

    torch.manual_seed(0)
    with torch.device(device):
        vae = WanVAE(vae_config)
    vae = vae.to(dtype).eval()
    h, w = latent_hw
    g = torch.Generator().manual_seed(2)
    times = []
    with torch.inference_mode():
        state = vae.init_decode_state()
        t = time.perf_counter()
        vae.decode_step(torch.randn(1, vae_config.z_dim, 7, h, w, generator=g).to(device), state)
        _sync(device)
        first = time.perf_counter() - t
        z = torch.randn(1, vae_config.z_dim, block_latents, h, w, generator=g).to(device)
        for i in range(warmup + iters):
            t = time.perf_counter()
            frames = vae.decode_step(z, state)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return {"dtype": str(dtype).replace("torch.", ""), "warmup_chunk_7_latents_ms": round(1e3 * first, 3),
            "block_ms_median": round(1e3 * statistics.median(times), 3),
            "block_ms_mean": round(1e3 * statistics.fmean(times), 3), "iters": iters,
            "frames_per_block": int(frames.shape[2]), "frame_hw": list(frames.shape[-2:])}


# ---------------------------------------------------------------------------------------------
# 3. The hand-off between two processes
# ---------------------------------------------------------------------------------------------

def _handoff_worker(rank: int, backend: str, devices: list[str], stage_on_host: bool, init: str,
                    shapes: list[list[int]], iters: int, q) -> None:
    """Ping-pong the block's tensors ``iters`` times; rank 0 reports the round-trip times."""
    try:
        import torch.distributed as dist

        device = torch.device(devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=2)
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(*s, generator=g).to(torch.bfloat16).to(device) for s in shapes]
        recv = [torch.empty_like(t) for t in tensors]

        def send(ts, dst):
            for t in ts:
                dist.send(t.cpu() if stage_on_host else t, dst=dst)

        def receive(src):
            for buf in recv:
                if stage_on_host:
                    host = torch.empty(buf.shape, dtype=buf.dtype)
                    dist.recv(host, src=src)
                    buf.copy_(host)
                else:
                    dist.recv(buf, src=src)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        times = []
        for i in range(iters + 5):
            if rank == 0:
                t = time.perf_counter()
                send(tensors, 1)
                receive(1)
                if i >= 5:
                    times.append(time.perf_counter() - t)
            else:
                receive(0)
                send(recv, 0)
        ok = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(recv, tensors))
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            q.put({"ok": ok, "rtt_ms": [round(1e3 * t, 4) for t in times]})
    except Exception as exc:   # noqa: BLE001 - reported to the parent
        q.put(_error(exc) | {"rank": rank})


def time_handoff(backend: str, devices: list[str], stage_on_host: bool, shapes: list[list[int]],
                 iters: int, timeout_s: float = 60.0) -> dict[str, object]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_handoff_worker, args=(r, backend, devices, stage_on_host, init, shapes, iters, q))
                 for r in range(2)]
        for p in procs:
            p.start()
        res: dict[str, object] = {"backend": backend, "devices": devices, "staged_through_host": stage_on_host,
                                  "bytes": sum(2 * int(torch.Size(s).numel()) for s in shapes)}
        try:
            got = q.get(timeout=timeout_s)
        except Exception:   # noqa: BLE001 - queue.Empty
            got = {"error": f"no result within {timeout_s:.0f} s (hang)"}
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        res.update(got)
    if "rtt_ms" in res:
        rtt = sorted(res.pop("rtt_ms"))
        res.update(one_way_ms_median=round(statistics.median(rtt) / 2, 4), one_way_ms_p90=round(rtt[int(0.9 * (len(rtt) - 1))] / 2, 4),
                   iters=len(rtt))
    return res


# ---------------------------------------------------------------------------------------------
# 4. Projection for the lane shapes
# ---------------------------------------------------------------------------------------------

def lane_projection(step_s: float, first_step_s: float, vae_s: float, hop_s: float, step_flops: float,
                    vae_flops: float, peak_flops: float, steps: int = 4, frames_per_block: int = 12,
                    ) -> dict[str, dict[str, float]]:
    """FPS, time to first frame and MFU per lane shape.

    D denoise GPUs each run ``steps / D`` steps of every block. With the decoder on its own GPU ("+1"),
    a block leaves every max(steps/D x step + hop, VAE) seconds; with the decoder on the last denoise
    GPU that GPU does steps/D x step + VAE per block (plus one hop when it sends). First frame: the first block's steps one after
    the other, the hops between GPUs, and its decode (the sink prefill and the decoder's warm-up chunk
    happen at session start and are not counted). MFU = the lane's FLOPs per block / (period x GPUs
    x peak).
    """
    out = {}
    for shape in LANE_SHAPES:
        d = int(shape.split("+")[0])
        own_decoder = shape.endswith("+1")
        if steps % d:
            raise ValueError(f"{steps} steps do not split over {d} GPUs")
        per_gpu = steps // d * step_s
        hops = d - 1 + (1 if own_decoder else 0)
        # conservatively, a GPU that sends also pays the hop in its period (a blocking send)
        if own_decoder:
            period = max(per_gpu, vae_s) + hop_s
        else:
            period = per_gpu + vae_s + (hop_s if d > 1 else 0.0)
        gpus = d + (1 if own_decoder else 0)
        ttff = steps * first_step_s + hops * hop_s + vae_s
        out[shape] = {"gpus": gpus, "block_period_ms": round(1e3 * period, 2),
                      "fps": round(frames_per_block / period, 2), "ttff_ms": round(1e3 * ttff, 1),
                      "mfu": round((steps * step_flops + vae_flops) / (period * gpus * peak_flops), 4)}
    return out


def flop_projection(flops: dict, peaks: dict, hop_s: float) -> dict[str, dict]:
    """The same table from FLOPs alone: every op at 100 % and at 46 % of the peak (projections)."""
    out = {}
    step, first, vae = flops["step"], flops["first_step"], flops["vae_block"]
    for label, mfu in (("100% of peak", 1.0), ("46% of peak (the reference's implied MFU)", 0.46)):
        for prec in ("bf16", "fp8"):
            def t(f, prec=prec, mfu=mfu):
                lin = f["linear"] / (peaks["fp8"] if prec == "fp8" else peaks["bf16"])
                return (lin + (f["total"] - f["linear"]) / peaks["bf16"]) / mfu
            out[f"{prec}, {label}"] = lane_projection(t(step), t(first), t(vae), hop_s, step["total"],
                                                      vae["total"], peaks["bf16"])
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def render_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"_Generated by `bench/gpu_bench.py{' --tiny' if res['tiny'] else ''}` on {res['date']} on "
             f"{m.get('device_name')} (torch {m['torch']}, CUDA {m.get('cuda_runtime')}). Random weights; "
             f"{res['config']} config at {res['video_hw'][0]}x{res['video_hw'][1]}._", ""]
    fl = res.get("flops", {})
    if fl:
        lines.append(f"FLOPs (models/flops.py, counted on meta): steady step {_tf(fl['step']['total'])} TFLOP "
                     f"(linear {_tf(fl['step']['linear'])}), first-block step {_tf(fl['first_step']['total'])}, "
                     f"VAE block {_tf(fl['vae_block']['total'])}. MFU against {res['peaks_tflops']}.")
        lines.append("")
    lines += ["**1. One denoising step, steady state (measured)**", "",
              "| variant | step ms (median) | mean | MFU | compile first step s | graphs captured / replays | note |",
              "|---|---|---|---|---|---|---|"]
    for name, r in res.get("dit", {}).items():
        if "step_ms_median" in r:
            st = r.get("runner_stats", {})
            lines.append(f"| {name} | {r['step_ms_median']} | {r['step_ms_mean']} | {100 * r.get('mfu', 0):.1f} % | "
                         f"{r.get('compile_first_step_s', '')} | {st.get('captures', '')} / {st.get('replays', '')} | "
                         f"{'' if r.get('output_finite', True) else 'non-finite output (random weights)'} |")
        else:
            lines.append(f"| {name} | failed or skipped | | | | | {(r.get('error') or r.get('skipped', ''))[:160]} |")
    v = res.get("vae", {})
    lines += ["", "**2. VAE decode of one block (measured)**", ""]
    lines.append(f"{v['block_ms_median']} ms per block (median; {v['frames_per_block']} frames), warm-up chunk "
                 f"{v['warmup_chunk_7_latents_ms']} ms, {v['dtype']}." if "block_ms_median" in v
                 else f"failed: {v.get('error', 'not run')[:300]}")
    lines += ["", "**3. Hand-off of one block (latent + audio features, measured, one way = round trip / 2)**", "",
              "| transport | result |", "|---|---|"]
    for name, h in res.get("handoff", {}).items():
        lines.append(f"| {name} | " + (f"{h['one_way_ms_median']} ms median, {h['one_way_ms_p90']} ms p90"
                                        if "one_way_ms_median" in h else h.get("error", "")[:200].replace("\n", " ")) + " |")
    lines += ["", "**4. Lane projection from the measured step, VAE and hop times**", "",
              "| variant | " + " | ".join(LANE_SHAPES) + " |", "|---|" + "---|" * len(LANE_SHAPES)]
    for name, table in res.get("projection_measured", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{t['fps']} FPS, TTFF {t['ttff_ms']} ms, MFU {100 * t['mfu']:.0f} %"
                                                   for t in table.values()) + " |")
    lines += ["", f"**5. Projection from FLOPs alone (not measured; hop {1e3 * res.get('hop_s_used', 0):.3f} ms, "
              f"{res.get('hop_source', '')})**", "",
              "| assumption | " + " | ".join(LANE_SHAPES) + " |", "|---|" + "---|" * len(LANE_SHAPES)]
    for name, table in res.get("projection_flops_only", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{t['fps']} FPS, TTFF {t['ttff_ms']} ms" for t in table.values()) + " |")
    return "\n".join(lines) + "\n"


def _tf(flops: float) -> str:
    return f"{flops / 1e12:.4g}"


def write_outputs(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(res, indent=2, default=str) + "\n")
    section = f"{DOC_BEGIN}\n{render_markdown(res)}{DOC_END}"
    doc = out_dir / DOC_NAME
    if doc.exists() and DOC_BEGIN in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1] if DOC_END in rest else ""
        doc.write_text(head + section + tail)
    else:
        doc.write_text(f"# GPU benchmark\n\n{section}\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for benchmarks-gpu.json and gpu.md (default: docs; with --tiny a temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (the same code path, < 1 min)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all; --tiny: the non-compile ones)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per variant (default 10; --tiny 3)")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining DiT variants after this long")
    p.add_argument("--skip-handoff", action="store_true", help="do not spawn the two hand-off processes")
    args = p.parse_args(argv)

    if args.tiny:
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="gpu_bench_tiny_"))
        if out_dir.resolve() == (ROOT / "docs").resolve():
            p.error("--tiny must not overwrite docs/: pass another --out")
        device = torch.device("cpu")
    else:
        out_dir = args.out or ROOT / "docs"
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or use --tiny for the CPU dry run")
        device = torch.device("cuda")
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else \
        [v for v in VARIANTS if not (args.tiny and "compile" in v)]
    for v in variants:
        parse_variant(v)
    variants.sort(key=lambda v: (v.startswith("fp8"), "compile" in v))    # bf16 first (FP8 converts in place)
    iters = args.iters or (3 if args.tiny else 10)
    warmup = 8 if not args.tiny else 5          # >= 4 ring phases (+ graph capture) before timing

    from models.liveavatar import LiveAvatarConfig

    config = LiveAvatarConfig.tiny() if args.tiny else LiveAvatarConfig.reference()
    video_hw = (64, 64) if args.tiny else (384, 704)
    latent_hw = (video_hw[0] // 8, video_hw[1] // 8)
    dtype = torch.bfloat16
    spec = DEVICE_SPECS[PEAK_DEVICE]
    peaks = {"bf16": float(spec["bf16_tflops"]) * 1e12, "fp8": float(spec["fp8_tflops"]) * 1e12}
    t_start = time.perf_counter()
    res: dict = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "tiny": args.tiny,
                 "config": "tiny" if args.tiny else "reference", "video_hw": list(video_hw),
                 "latent_hw": list(latent_hw), "machine": machine(device),
                 "peaks_tflops": {"device": PEAK_DEVICE, "bf16": spec["bf16_tflops"], "fp8": spec["fp8_tflops"]},
                 "command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}

    def save(_=None) -> None:
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(res, out_dir)

    # FLOPs on the meta device (CPU)
    try:
        c = count_dit_flops_meta(config.dit, latent_hw)
        vae_f = count_vae_decode_flops_meta(config.vae, latent_hw, config.dit.frames_per_block)
        res["flops"] = {"step": c["steady_state"].as_dict(), "first_step": c["first_block"].as_dict(),
                        "vae_block": vae_f.as_dict(), "parameters": c["parameters"],
                        "keys_steady_state": c["keys_steady_state"]}
    except Exception as exc:   # noqa: BLE001
        res["flops"] = {}
        res["flops_error"] = _error(exc)
    save()

    # 1. the DiT step
    try:
        bench = StepBench(config.dit, latent_hw, device, dtype)
        res["dit_build_s"] = round(bench.build_s, 2)

        def save_dit(part):
            res["dit"] = part
            save()

        res["dit"] = run_dit_variants(bench, variants, warmup, iters, args.budget_s, t_start, save_dit)
        del bench
    except Exception as exc:   # noqa: BLE001
        res["dit_error"] = _error(exc)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fl = res.get("flops") or {}
    for r in res.get("dit", {}).values():
        if "step_ms_median" in r and fl:
            s = r["step_ms_median"] / 1e3
            if r["options"]["linear_precision"] == "fp8":
                at_peak = fl["step"]["linear"] / peaks["fp8"] + (fl["step"]["total"] - fl["step"]["linear"]) / peaks["bf16"]
            else:
                at_peak = fl["step"]["total"] / peaks["bf16"]
            r["mfu"] = round(at_peak / s, 4)
            r["tflops_achieved"] = round(fl["step"]["total"] / s / 1e12, 1)
    save()

    # 2. the VAE decode
    try:
        res["vae"] = time_vae(config.vae, latent_hw, device, dtype, config.dit.frames_per_block,
                              warmup=1 if args.tiny else 2, iters=2 if args.tiny else iters)
        if fl:
            res["vae"]["mfu_bf16"] = round(fl["vae_block"]["total"] / (res["vae"]["block_ms_median"] / 1e3) / peaks["bf16"], 4)
    except Exception as exc:   # noqa: BLE001
        res["vae"] = _error(exc)
    save()

    # 3. the hand-off
    shapes = [[1, config.dit.in_dim, config.dit.frames_per_block, *latent_hw],
              [1, config.dit.num_audio_layers, config.dit.audio_dim, 4 * config.dit.frames_per_block]]
    res["handoff"] = {}
    if not args.skip_handoff:
        if device.type == "cuda":
            two = torch.cuda.device_count() >= 2
            nccl_devices = ["cuda:0", "cuda:1"] if two else ["cuda:0", "cuda:0"]
            res["handoff"]["nccl " + ("2 GPUs" if two else "2 ranks on 1 GPU")] = time_handoff(
                "nccl", nccl_devices, False, shapes, iters=50)
            save()
            res["handoff"]["gloo via host memory, 1 GPU"] = time_handoff("gloo", ["cuda:0", "cuda:0"], True, shapes, 50)
        else:
            res["handoff"]["gloo, CPU"] = time_handoff("gloo", ["cpu", "cpu"], False, shapes, iters=10)
        save()

    # 4. projections
    hop_s = None
    for h in res["handoff"].values():
        if "one_way_ms_median" in h:
            hop_s = h["one_way_ms_median"] / 1e3 if hop_s is None else min(hop_s, h["one_way_ms_median"] / 1e3)
    res["hop_s_used"] = hop_s if hop_s is not None else 0.05e-3
    res["hop_source"] = "measured (fastest transport above)" if hop_s is not None else "assumed 0.05 ms (NVLink NCCL)"
    if fl:
        res["projection_flops_only"] = flop_projection(fl, peaks, res["hop_s_used"])
        vae_s = res.get("vae", {}).get("block_ms_median")
        res["projection_measured"] = {}
        for name, r in res.get("dit", {}).items():
            if "step_ms_median" in r and vae_s:
                s = r["step_ms_median"] / 1e3
                first = s * fl["first_step"]["total"] / fl["step"]["total"]   # scaled by FLOPs (not measured)
                res["projection_measured"][name] = lane_projection(s, first, vae_s / 1e3, res["hop_s_used"],
                                                                   fl["step"]["total"], fl["vae_block"]["total"],
                                                                   peaks["bf16"])
    save()
    print(json.dumps({"out": str(out_dir), "elapsed_s": res["elapsed_s"],
                      "dit": {k: v.get("step_ms_median", v.get("error", v.get("skipped"))) for k, v in res.get("dit", {}).items()},
                      "vae_ms": res.get("vae", {}).get("block_ms_median")}, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
