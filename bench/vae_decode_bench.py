"""What one block's VAE decode costs on this CPU, by decoder width and torch thread count.

    python bench/vae_decode_bench.py                       # widths 8 and 12, 1 and 2 threads
    python bench/vae_decode_bench.py --widths 12 --threads 1 --repeats 20 --json /tmp/decode.json

A lane's decode rank turns each block's latents (``frames_per_block`` latent frames) into 12 video
frames with the streaming decoder (``WanVAE.decode_step`` through a warm cache, as the rank does).
Random weights of the shipped checkpoint's VAE architecture with the decoder at each base width
(``VAEConfig.decoder_dim``; the decoder alone decides the cost, and it does not depend on the weights):
8 is v1-v3's VAE and v5's narrow decoder, 12 is v4's. Prints the median seconds per block over ``--repeats`` timed blocks (after two
warm-up blocks) and the share of the 0.48 s a block may take in real time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoints import SHIPPED_SPEC  # noqa: E402
from models.liveavatar import LiveAvatarConfig  # noqa: E402
from models.vae import WanVAE  # noqa: E402

BLOCK_SECONDS = 0.48


def time_decode(width: int, threads: int, repeats: int, size: int = 64, seed: int = 0) -> dict:
    """Median wall seconds of ``decode_step`` on one block's latents with a decoder of base width ``width``."""
    torch.set_num_threads(threads)
    config = LiveAvatarConfig.load(SHIPPED_SPEC)
    torch.manual_seed(seed)
    vae = WanVAE(dataclasses.replace(config.vae, decoder_dim=width)).eval()
    lat = size // config.vae.stride[1]
    z = torch.randn(1, config.vae.z_dim, config.dit.frames_per_block, lat, lat)   # [1, z, F, h, w]
    state = vae.init_decode_state()
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            frames = vae.decode_step(z, state)                                       # [1, 3, 4F (4F-3 first), H, W]
            if i >= 2:                                                               # steady state: warm caches
                times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"width": width, "threads": threads, "frames": int(frames.shape[2]), "seconds_per_block": round(median, 4),
            "share_of_real_time": round(median / BLOCK_SECONDS, 3),
            "parameters": sum(p.numel() for p in vae.decoder.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="8,12", help="comma-separated decoder base widths (8: v1-v3 and v5, 12: v4)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="video height = width (the shipped checkpoint's: 64)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    rows = [time_decode(int(w), int(t), args.repeats, args.size) for w in args.widths.split(",") for t in args.threads.split(",")]
    print(f"{platform.processor() or 'cpu'}, torch {torch.__version__}; one block = 0.48 s of video")
    print("| decoder width | threads | frames | decode s / block | share of real time |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['width']} | {r['threads']} | {r['frames']} | {r['seconds_per_block']:.3f} | "
              f"{100 * r['share_of_real_time']:.0f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
