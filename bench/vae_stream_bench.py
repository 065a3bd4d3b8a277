"""Does the VAE hold up in the streaming steady state? Reconstruction error per 4-frame chunk.

    python bench/vae_stream_bench.py                                  # the shipped checkpoint's VAE
    python bench/vae_stream_bench.py --state runs/train/vae/state.pt  # a training-stage state instead
    python bench/vae_stream_bench.py --state runs/train/vae/state.pt --sheet out/vae.png   # + a picture

Streaming encodes and decodes chunk after chunk for hours, so every temporal cache of the causal VAE
holds real history. A VAE that only saw short clips drifts once its caches fill (the v1 checkpoint:
the colours invert from about the sixth chunk). This bench encodes and decodes, in one causal pass
(equal to streaming, tested in tests/unit/models/test_vae.py), ``--frames`` frames of held-out
identities speaking held-out speech, and a static reference repeated for as long (what the sink's
motion latents are made of), and prints the mean L1 error (pixels in [-1, 1]) of every 4th chunk.
Seeded random weights give the floor. It then scores the round trip of the talking clips with the
quality harness (``liveavatar eval``'s metrics): the ceiling that any DiT output decoded by this VAE
can reach. Writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoints import SHIPPED_CHECKPOINT  # noqa: E402
from models.liveavatar import LiveAvatarConfig, build_models  # noqa: E402
from models.training import synthetic as syn  # noqa: E402
from models.training.data import to_pixels  # noqa: E402
from models.training.speech import SpeechCorpus  # noqa: E402
from models.vae import WanVAE  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402

HELD_OUT_IDS = (905, 812)


@torch.no_grad()
def round_trip(vae: WanVAE, x: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mean) and decode ``x`` [B, 3, T, H, W] in one causal pass, clamped to [-1, 1]."""
    mu = vae.conv1(vae.encoder(x))[:, :vae.config.z_dim]
    return vae.decoder(vae.conv2(mu)).clamp(-1.0, 1.0)


def chunk_errors(vae: WanVAE, x: torch.Tensor) -> list[float]:
    """Mean L1 of frame 0, then of each 4-frame chunk, for video ``x`` [B, 3, 1 + 4k, H, W]."""
    st = vae.config.stride[0]
    err = (round_trip(vae, x) - x).abs().mean(dim=(0, 1, 3, 4))   # [T]
    return [err[0].item()] + [err[1 + st * k:1 + st * (k + 1)].mean().item() for k in range((x.shape[2] - 1) // st)]


def clips(frames: int, examples: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor, syn.SyntheticDataset]:
    """Held-out talking clips and the same identities' static references: 2 x [2, 3, frames, 64, 64]."""
    speech = SpeechCorpus(cache, examples).eval_clips()
    data = syn.SyntheticDataset(speech, list(HELD_OUT_IDS), frames, seed=5)
    talking = np.stack([data[i].frames for i in range(len(HELD_OUT_IDS))])
    static = np.stack([np.repeat(data[i].frames[:1], frames, axis=0) for i in range(len(HELD_OUT_IDS))])
    return to_pixels(talking), to_pixels(static), data


def write_sheet(talking: torch.Tensor, recon: torch.Tensor, out_png: Path, every: int = 4, columns: int = 12) -> None:
    """Every ``every``-th frame of each talking clip: ground truth above, its round trip ``recon`` below
    (2x upscaled)."""
    from PIL import Image

    from models.training.data import to_uint8

    rows = []
    for i in range(talking.shape[0]):
        for video in (talking[i], recon[i]):
            frames = to_uint8(video)[1::every][:columns]                     # [columns, H, W, 3]
            rows.append(np.concatenate(list(frames), axis=1))
    img = np.concatenate(rows, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(out_png)


def round_trip_quality(recon: torch.Tensor, data: syn.SyntheticDataset) -> list[dict]:
    """Quality-harness scores of the round trips ``recon`` [B, 3, T, H, W] of the clips ``data[0..B)``."""
    from models.quality.probes import load_probes
    from models.quality.report import evaluate
    from models.training.data import to_uint8

    probes, rows = load_probes(), []
    for i in range(recon.shape[0]):
        clip, (_, pcm, _) = data[i], data.window(i)
        r = evaluate(to_uint8(recon[i]), pcm, clip.reference, probes, gt_motion=clip.motion)
        rows.append({"sync_corr": r.sync.correlation, "sync_offset": r.sync.offset_frames,
                     "identity": r.identity.mean, "mouth_var_ratio": r.motion.mouth_var_ratio})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", default=None, help="a training stage's state.pt holding a 'vae' module")
    p.add_argument("--frames", type=int, default=161, help="1 + 4k frames (default 161 = 6.4 s, 40 chunks)")
    p.add_argument("--examples", default=str(examples_dir()))
    p.add_argument("--cache", default=str(ROOT / "runs" / "speech-cache"), help="espeak-ng speech cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--sheet", default=None, help="write a PNG of ground-truth and round-trip frames here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = LiveAvatarConfig.load("tiny-trained")
    if args.state:   # a training state, possibly of another width (TrainConfig.vae_dim)
        state = torch.load(args.state, weights_only=False)["modules"]["vae"]
        shipped = WanVAE(dataclasses.replace(cfg.vae, dim=state["encoder.conv1.weight"].shape[0])).eval()
        shipped.load_state_dict(state)
    else:
        shipped = build_models(cfg, checkpoint=SHIPPED_CHECKPOINT, parts={"vae"}).vae.eval()
    torch.manual_seed(0)
    random = WanVAE(cfg.vae).eval()                                # PyTorch default init: the floor
    talking, static, data = clips(args.frames, Path(args.examples), Path(args.cache))
    result = {"frames": args.frames, "state": args.state,
              "trained": {"talking": chunk_errors(shipped, talking), "static": chunk_errors(shipped, static)},
              "random": {"talking": chunk_errors(random, talking), "static": chunk_errors(random, static)}}
    for name, rows in (("trained", result["trained"]), ("random", result["random"])):
        for kind, errs in rows.items():
            print(f"{name:8s} {kind:8s} frame0 {errs[0]:.3f} | chunks 1,5,9,...: "
                  + " ".join(f"{e:.3f}" for e in errs[1::4]))
    recon = round_trip(shipped, talking)
    result["round_trip_quality"] = round_trip_quality(recon, data)
    for row in result["round_trip_quality"]:
        print("round trip: " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.sheet:
        write_sheet(talking, recon, Path(args.sheet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
