"""Why the VAE stage uses inflated_init_ and lr_after_warmup: held-out reconstruction error over training.

    python bench/vae_recipe_bench.py                       # 4 variants x 900 steps (~25 min on 1 thread)
    python bench/vae_recipe_bench.py --variants inflated+lr-drop --steps 1200

Each variant trains a fresh tiny VAE with :class:`models.training.stages.VAEStage` (600 single-frame
warm-up steps at lr 2e-3, then alternating frames and 5-frame clips with latent noise) and every
``--every`` steps prints the mean L1 error (pixels in [-1, 1]) of 8 held-out 9-frame clips (held-out
identities and speech) for frame 0 and for the two 4-frame chunks after it:

- ``default``: PyTorch's default conv init, constant lr;
- ``he``: He init of every conv (no inflation), constant lr;
- ``inflated``: :func:`inflated_init_`, constant lr;
- ``inflated+lr-drop``: :func:`inflated_init_` and ``lr_after_warmup=5e-4`` (the recipe).
Writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.training import synthetic as syn  # noqa: E402
from models.training.data import identities_split, to_pixels  # noqa: E402
from models.training.recipe import TrainConfig  # noqa: E402
from models.training.speech import SpeechCorpus  # noqa: E402
from models.training.stages import VAEStage, inflated_init_  # noqa: E402
from models.vae import VAEConfig, WanVAE  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402

VARIANTS = ("default", "he", "inflated", "inflated+lr-drop")


def he_only(vae: WanVAE) -> WanVAE:
    """He init of every conv weight (all temporal taps), attention output projections kept at zero."""
    for name, module in vae.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and not name.endswith(".proj"):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return vae


def run_variant(name: str, steps: int, every: int, train: syn.SyntheticDataset, held_out: torch.Tensor,
                cfg: TrainConfig) -> list[dict]:
    torch.manual_seed(cfg.seed)
    vae = WanVAE(VAEConfig.tiny())
    if name == "he":
        he_only(vae)
    elif name.startswith("inflated"):
        inflated_init_(vae)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    stage = VAEStage(vae, train, opt, cfg.vae_batch, lr_after_warmup=cfg.vae_lr_clips if "lr-drop" in name else None)
    rows, t0 = [], time.perf_counter()
    for step in range(steps):
        stage(step, torch.Generator().manual_seed(cfg.seed + step))
        if (step + 1) % every == 0:
            with torch.no_grad():
                mu = vae.conv1(vae.encoder(held_out))[:, :vae.config.z_dim]
                err = (vae.decoder(vae.conv2(mu)).clamp(-1, 1) - held_out).abs().mean(dim=(0, 1, 3, 4))   # [9]
            row = {"step": step + 1, "frame0": err[0].item(), "chunk1": err[1:5].mean().item(),
                   "chunk2": err[5:9].mean().item(), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{name:18s} step {row['step']:5d}  frame0 {row['frame0']:.3f}  chunk1 {row['chunk1']:.3f}  "
                  f"chunk2 {row['chunk2']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--examples", default=str(examples_dir()))
    p.add_argument("--cache", default=str(ROOT / "runs" / "speech-cache"), help="espeak-ng speech cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    bad = sorted(set(names) - set(VARIANTS))
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    cfg = TrainConfig()
    corpus = SpeechCorpus(Path(args.cache), Path(args.examples), num_synth=cfg.num_synth_speech, seed=cfg.seed)
    train_ids, held_ids = identities_split(cfg.num_identities, cfg.train_identities)
    train = syn.SyntheticDataset(corpus.train_clips(), train_ids, cfg.vae_frames, seed=cfg.seed + 11, size=cfg.size)
    held = syn.SyntheticDataset(corpus.eval_clips(), held_ids, 9, seed=5, size=cfg.size)
    held_out = to_pixels(np.stack([held[i].frames for i in range(8)]))                  # [8, 3, 9, 64, 64]
    result = {name: run_variant(name, args.steps, args.every, train, held_out, cfg) for name in names}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
