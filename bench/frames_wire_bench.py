"""Frames-topic bench: one block as raw RGB frames vs as the H.264 access units the decode rank now sends.

Usage (from the repository root; ~1 minute on 2 cores)::

    .venv/bin/python bench/frames_wire_bench.py
    .venv/bin/python bench/frames_wire_bench.py --blocks 6 --json /tmp/frames_wire.json

Per size (64x64 with the test-size encoder settings, 704x384 and 448x640 with the reference ones, both
as chosen by ``lane_stream_config``) and content, over ``--blocks`` consecutive blocks of 12 frames:

- the ``frames`` message in bytes (``services.common.messages.encode``, header + PCM included): raw
  ``frames`` [12, H, W, 3] uint8 as before, and ``h264`` access units + ``avcc`` as the lane sends now;
- the CPU seconds of encoding one block on the decode rank (``BlockVideoEncoder.encode_block``: RGB ->
  YUV conversion + x264; process CPU time, so x264's own threads are counted) and its wall time;
- the packager's CPU seconds per block before (``PackageStage.push_block``: encode + AAC + mux) and
  now (``push_encoded``: AAC + mux only).

Content: ``image`` = a real example image (``examples/cyclops_baker.jpg``) panning one pixel per frame
with N(0, 2) noise per frame, a stand-in for generated video; ``noise`` = uniform RGB noise, the worst
case for H.264 (what ``infra/topics.py`` sizes the topic for). The first block of an encoder also
carries x264's SEI; means are over all blocks. Timings on a shared machine are rough: the load
average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _benchlib import cpu_model, load  # noqa: E402

from pipeline_stages.package_stage import lane_stream_config, make_package_stage  # noqa: E402
from pipeline_stages.video_encode import BlockVideoEncoder  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402
from services.common.messages import Frames, Tensor, encode, h264_tensors  # noqa: E402

T, FPS, PCM = 12, 25, 7680
SIZES = [(64, 64), (704, 384), (640, 448)]          # (width, height)


def content(kind: str, width: int, height: int, blocks: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``blocks`` blocks of [T, H, W, 3] uint8 frames."""
    n = blocks * T
    if kind == "noise":
        return list(rng.integers(0, 256, (blocks, T, height, width, 3), dtype=np.uint8))
    from PIL import Image, ImageOps

    pan = n + 1
    img = ImageOps.fit(Image.open(examples_dir() / "cyclops_baker.jpg").convert("RGB"), (width + pan, height))
    base = np.asarray(img, dtype=np.float32)                                          # [H, W + pan, 3]
    frames = np.stack([base[:, i:i + width] for i in range(n)])                        # [n, H, W, 3]
    frames = np.clip(np.rint(frames + rng.normal(0.0, 2.0, frames.shape)), 0, 255).astype(np.uint8)
    return list(frames.reshape(blocks, T, height, width, 3))


def measure(width: int, height: int, kind: str, blocks: int, rng: np.random.Generator) -> dict:
    data = content(kind, width, height, blocks, rng)
    pcm = np.zeros(PCM, np.float32)
    header = Frames(session_id="s-" + "0" * 10, tenant_id="acme", seq=7, kind="block", lane_id="lane-0")
    cfg = lane_stream_config(width, height, FPS, T)
    enc = BlockVideoEncoder(cfg)
    raw_bytes, enc_bytes, cpu, wall, units = [], [], [], [], []
    for frames in data:
        raw_bytes.append(len(encode(header, {"frames": Tensor.from_numpy(frames), "pcm": Tensor.from_numpy(pcm)})))
        c0, w0 = time.process_time(), time.perf_counter()
        block = enc.encode_block(frames)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        units.append(block.access_units)
        enc_bytes.append(len(encode(header, {**h264_tensors(block.access_units, enc.codec_config),
                                             "pcm": Tensor.from_numpy(pcm)})))
    # the packager per block: before (encodes itself) and now (muxes the access units)
    before = make_package_stage(width, height, FPS, T, tiny=None)
    now = make_package_stage(width, height, FPS, T, tiny=None, video_config=enc.codec_config)
    cpu_before, cpu_now = [], []
    for frames, au in zip(data, units, strict=True):
        c0 = time.process_time()
        before.push_block(frames, pcm)
        cpu_before.append(time.process_time() - c0)
        c0 = time.process_time()
        now.push_encoded(au, pcm, enc.codec_config)
        cpu_now.append(time.process_time() - c0)
    return {"size": f"{width}x{height}", "content": kind, "preset": cfg.preset, "crf": cfg.crf,
            "raw_msg_bytes": int(np.mean(raw_bytes)), "h264_msg_bytes_mean": int(np.mean(enc_bytes)),
            "h264_msg_bytes_max": int(max(enc_bytes)), "ratio": round(np.mean(raw_bytes) / np.mean(enc_bytes), 1),
            "encode_cpu_s_per_block": round(float(np.median(cpu)), 4),
            "encode_wall_s_per_block": round(float(np.median(wall)), 4),
            "packager_cpu_s_before": round(float(np.median(cpu_before)), 4),
            "packager_cpu_s_now": round(float(np.median(cpu_now)), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=4, help="consecutive blocks per size and content")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    load_before = load()
    rows = [measure(w, h, kind, args.blocks, rng) for w, h in SIZES for kind in ("image", "noise")]
    out = {"machine": {"cpu": cpu_model(), "python": platform.python_version(), "load_before": load_before,
                       "load_after": load()}, "blocks": args.blocks, "rows": rows}
    head = ("size", "content", "raw_msg_bytes", "h264_msg_bytes_mean", "h264_msg_bytes_max", "ratio",
            "encode_cpu_s_per_block", "encode_wall_s_per_block", "packager_cpu_s_before", "packager_cpu_s_now")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k in head) + " |")
    print(f"load average {load_before} before, {out['machine']['load_after']} after; {out['machine']['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
