"""Single-frame VAE training curves: how far does the tiny VAE's picture get, and what keeps the mouth?

    python bench/vae_image_bench.py --dim 8 --mouth-weight 0 --out docs/training/vae_image_d8_w0.json
    python bench/vae_image_bench.py --dim 12 --mouth-weight 1 --steps 3000

The recipe's VAE stage starts with 600 single-frame steps (``VAEStage``'s warm-up). This bench runs
that warm-up for ``--steps`` steps instead (inflated init, lr 2e-3, then 5e-4 from step 600, as the
recipe) at base width ``--dim`` with the mouth-mask loss weight ``--mouth-weight``, and every
``--eval-every`` steps reconstructs one frame (the widest-open mouth of a 2 s clip) of each of 48
held-out identities speaking held-out speech. It reports the mean L1 (pixels in [-1, 1]) of the
whole frame and inside the mouth mask, the latter also split by skin tone (mean skin RGB below 120:
dark). Writes ``--out`` (JSON) as it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.vae_stream_bench import round_trip  # noqa: E402
from models.training import synthetic as syn  # noqa: E402
from models.training.data import identities_split, to_pixels  # noqa: E402
from models.training.recipe import TrainConfig  # noqa: E402
from models.training.speech import SpeechCorpus  # noqa: E402
from models.training.stages import VAEStage, inflated_init_  # noqa: E402
from models.vae import WanVAE  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402

DARK_SKIN = 120.0   # mean skin RGB below this counts as dark
EVAL_FACES = 48


def held_out_frames(corpus: SpeechCorpus, held: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eval set: x [N, 3, 1, H, W], mouth masks [N, 1, 1, H, W], dark-skin flags [N]."""
    data = syn.SyntheticDataset(corpus.eval_clips(), held[::4][:EVAL_FACES], 50, seed=3, silence_prob=0.0)
    samples = [data[i] for i in range(EVAL_FACES)]
    widest = [int(np.argmax(s.motion.mouth)) for s in samples]
    x = to_pixels(np.stack([s.frames[k:k + 1] for s, k in zip(samples, widest, strict=True)]))
    mask = torch.from_numpy(np.stack([s.mouth[k:k + 1] for s, k in zip(samples, widest, strict=True)]))
    dark = torch.tensor([float(np.mean(syn.face_params(s.identity).skin_rgb)) < DARK_SKIN for s in samples])
    return x, mask[:, None], dark


@torch.no_grad()
def errors(vae: WanVAE, x: torch.Tensor, mask: torch.Tensor, dark: torch.Tensor) -> dict[str, float]:
    """L1 of the round trip over the frame and inside the mouth (all, dark, light skin)."""
    was_training = vae.training
    recon = round_trip(vae.eval(), x)
    vae.train(was_training)
    err = (recon - x).abs()                                                       # [N, 3, 1, H, W]
    mouth = (err * mask).sum(dim=(1, 2, 3, 4)) / (3 * mask.sum(dim=(1, 2, 3, 4)))  # [N]
    return {"l1": err.mean().item(), "mouth_l1": mouth.mean().item(),
            "mouth_l1_dark": mouth[dark].mean().item(), "mouth_l1_light": mouth[~dark].mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=8, help="the VAE's base width (TrainConfig.vae_dim)")
    p.add_argument("--mouth-weight", type=float, default=0.0, help="TrainConfig.vae_mouth_weight")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--examples", default=str(examples_dir()))
    p.add_argument("--cache", default=str(ROOT / "runs" / "speech-cache"), help="espeak-ng speech cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the curve as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(vae_dim=args.dim)
    torch.manual_seed(cfg.seed)
    vae = inflated_init_(WanVAE(cfg.model_config().vae)).train()
    train_ids, held = identities_split(cfg.num_identities, cfg.train_identities)
    corpus = SpeechCorpus(Path(args.cache), Path(args.examples), num_synth=cfg.num_synth_speech, seed=cfg.seed)
    data = syn.SyntheticDataset(corpus.train_clips(), train_ids, cfg.vae_frames, seed=cfg.seed + 11, size=cfg.size)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    stage = VAEStage(vae, data, opt, cfg.vae_batch, image_steps=args.steps + 1, mouth_weight=args.mouth_weight)
    x, mask, dark = held_out_frames(corpus, list(held))
    result = {"dim": args.dim, "mouth_weight": args.mouth_weight, "eval_faces": EVAL_FACES,
              "dark_faces": int(dark.sum()), "threads": args.threads, "curve": []}
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 1), **errors(vae, x, mask, dark)}
            result["curve"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
        if step == args.steps:
            break
        if step == 600:      # the recipe's warm-up length; its rate afterwards
            for group in opt.param_groups:
                group["lr"] = cfg.vae_lr_clips
        stage(step, torch.Generator().manual_seed(step))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
