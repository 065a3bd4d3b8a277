"""``liveavatar generate``: image + audio file -> MP4, streamed block by block as it is made.

Single process by default (the sequential runner); ``--tpp`` runs the same job through a local lane
of processes, shaped by ``--lane-shape`` (default ``4+1``: 4 denoise stages + 1 decode stage; docs/tpp.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: Exceptions that are bad input or bad configuration: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="reference image (JPEG, PNG, ...); the bundled tiny model "
                   "animates synthetic 64x64 faces such as examples/faces/face_812.png, not photos")
    p.add_argument("--audio", required=True, help="speech (WAV int16/float, FLAC, OGG, MP3; any rate, mono or stereo)")
    p.add_argument("--prompt", default="", help="text prompt, encoded once")
    p.add_argument("--config", default="tiny-trained", help="'tiny-trained' (the shipped trained checkpoint), 'tiny' "
                   "(seeded random weights), 'reference' or a checkpoint directory (default tiny-trained)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (official layout); default: the shipped "
                   "checkpoint for tiny-trained, the directory itself when the config is a trained bundle, "
                   "seeded random weights otherwise")
    p.add_argument("--lora", default=None, help="PEFT LoRA file (liveavatar.safetensors), merged at load time")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same video; default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--dump-latents", default=None, help="write every block's final latent to this safetensors file")
    p.add_argument("--out", required=True, help="output .mp4 (fragmented MP4, H.264 + AAC)")
    p.add_argument("--tpp", action="store_true", help="run through a TPP lane of local processes (see --lane-shape)")
    p.add_argument("--lane-shape", default="4+1", metavar="SHAPE",
                   help="with --tpp: D+1 (D denoise processes of 4/D steps each, the decoder in its own process) "
                        "or D (the decoder in the last denoise process), D in 1, 2, 4; every shape gives the same "
                        "latents (default 4+1)")
    p.add_argument("--max-audio-seconds", type=float, default=3600.0, help="reject longer audio")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="reject larger images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (results are bit-reproducible "
                   "for a fixed thread count)")
    p.add_argument("--decode-threads", type=int, default=None, help="with --tpp: torch threads of the decoder "
                   "(default: --threads; the decode costs far more than a denoising step on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline_stages.tpp import LaneError

    try:
        return _run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LaneError as exc:
        print(f"error: the TPP lane failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from models.inputs import load_audio, load_image
    from models.liveavatar import LiveAvatarConfig, default_checkpoint
    from pipeline_stages.runner import SessionSpec, open_runner

    # 1. inputs first: bad input fails before any model is built
    image = load_image(Path(args.image).read_bytes() if Path(args.image).is_file() else args.image,
                       args.max_image_pixels)
    pcm = load_audio(args.audio, args.max_audio_seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # 2. models
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = LiveAvatarConfig.load(args.config)
    if args.tpp:                           # a bad lane shape fails here, before any model is built
        from pipeline_stages.tpp import LaneShape

        LaneShape.parse(args.lane_shape, config.scheduler.num_inference_steps)
    checkpoint = default_checkpoint(args.config, args.checkpoint)
    t0 = time.monotonic()
    random_weights = checkpoint is None
    if random_weights:
        print("note: no checkpoint given, so the weights are SEEDED RANDOM: the video shows structured noise, "
              "not a talking avatar", file=sys.stderr)
    spec = SessionSpec(image_rgb=image, prompt=args.prompt, seed=args.seed)
    block_samples = config.audio.block_samples
    n_blocks = -(-len(pcm) // block_samples)

    # 3. stream blocks to the file as they are made
    latents: dict[str, torch.Tensor] = {}
    frames = 0
    bar = tqdm(total=n_blocks, unit="block", disable=args.no_progress, file=sys.stderr)
    # with --tpp the same job runs through a lane of processes; this process only encodes audio and packages
    runner = open_runner(config, lane=args.tpp, device=args.device, dtype=dtype, seed=args.seed,
                         checkpoint=checkpoint, lora=args.lora, threads=args.threads or 1,
                         decode_threads=args.decode_threads, shape=args.lane_shape if args.tpp else None)
    with open(out, "wb") as f, runner as r:
        t_start = time.monotonic()
        f.write(r.start_session(spec))
        for res in r.generate(pcm):
            f.write(res.fragment)
            f.flush()
            frames += res.frames.shape[0]
            if args.dump_latents:
                latents[f"block_{res.block_index:06d}"] = res.latent.float().cpu().contiguous()
            bar.update(1)
        f.write(r.close_session())
    bar.close()
    elapsed = time.monotonic() - t_start
    if args.dump_latents:
        from safetensors.torch import save_file

        save_file(latents, args.dump_latents, metadata={"seed": str(args.seed), "config": str(args.config)})

    # 4. summary
    video_s = frames / config.fps
    summary = {
        "out": str(out), "frames": frames, "blocks": n_blocks, "video_seconds": round(video_s, 2),
        "audio_seconds": round(len(pcm) / config.audio.sample_rate, 2), "generate_seconds": round(elapsed, 2),
        "fps": round(frames / elapsed, 2) if elapsed > 0 else None,
        "real_time_factor": round(video_s / elapsed, 3) if elapsed > 0 else None,
        "setup_seconds": round(t_start - t0, 2), "random_weights": random_weights,
        "mode": "tpp" if args.tpp else "sequential", "lane_shape": args.lane_shape if args.tpp else None,
    }
    print(json.dumps(summary))
    return 0
