"""``liveavatar inspect``: parameter counts, state-dict keys and FLOPs of a configuration, as JSON.

Everything is built on the ``meta`` device (no weights, no memory, no compute), so the real-size
(14B) configuration is inspected in a few seconds on any machine::

    liveavatar inspect --config reference                 # 384x704, the reference's default size
    liveavatar inspect --config tiny                      # 64x64
    liveavatar inspect --config CKPT_DIR --height 512 --width 512

Printed: parameter and key counts of the DiT, VAE, audio and text encoders; the streaming geometry
(tokens per block, sink tokens, attention keys); FLOPs per denoising step and per block (4 steps),
first block and steady state, the sink prefill, the VAE decode of one block and the closed-form check
(see models/flops.py); and the physical bound on an H100/H800-class GPU. Bad input: a one-line
``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

#: The reference's bundled examples are 400x720 (H x W) portraits; the default output size is that
#: aspect under the configuration's area rule (384x704 for the reference, 64x64 for tiny).
DEFAULT_ASPECT_HW = (400, 720)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="reference",
                   help="'reference', 'tiny' or a checkpoint directory (default reference)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default: the config's size)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default: the config's size)")
    p.add_argument("--device-spec", default="h800-sxm",
                   help="GPU the physical bound is computed for (h100-sxm, h800-sxm, h200-sxm)")
    p.add_argument("--no-encoders", action="store_true", help="skip the audio/text encoder counts")


def run(args: argparse.Namespace) -> int:
    try:
        report = inspect_config(args.config, args.height, args.width, device_spec=args.device_spec,
                                encoders=not args.no_encoders)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def _count(module) -> dict[str, int]:
    state = module.state_dict()
    return {"parameters": sum(p.numel() for p in module.parameters()), "state_dict_keys": len(state)}


def _resolution(config, height: int | None, width: int | None) -> tuple[int, int]:
    from models.inputs import size_for_area

    if (height is None) != (width is None):
        raise ValueError("give both --height and --width, or neither")
    if height is None:
        return size_for_area(*DEFAULT_ASPECT_HW, config.area, config.size_multiple)
    if height <= 0 or width <= 0:
        raise ValueError(f"--height and --width must be positive, got {height}x{width}")
    sh, sw = config.vae.stride[1], config.vae.stride[2]
    if height % sh or width % sw:
        raise ValueError(f"--height/--width must be multiples of the VAE stride {sh}x{sw}, got {height}x{width}")
    return height, width


def inspect_config(spec: str, height: int | None = None, width: int | None = None,
                   device_spec: str = "h800-sxm", encoders: bool = True) -> dict[str, object]:
    """The report ``liveavatar inspect`` prints, as a dict (see the module docstring)."""
    import torch

    from models.flops import model_report, tflop
    from models.liveavatar import LiveAvatarConfig
    from models.vae import WanVAE

    config = LiveAvatarConfig.load(spec)
    h, w = _resolution(config, height, width)
    sh, sw = config.vae.stride[1], config.vae.stride[2]
    latent_hw = (h // sh, w // sw)
    try:
        config.dit.check_latent_hw(latent_hw)
    except ValueError as exc:
        raise ValueError(f"video {h}x{w} is too small or misaligned for this config: {exc}") from exc
    steps = config.scheduler.num_inference_steps
    rep = model_report(config.dit, config.vae, latent_hw, device=device_spec, steps=steps, fps=config.fps)

    # 1. parameters and keys (meta device)
    with torch.device("meta"):
        vae = WanVAE(config.vae)
    params: dict[str, object] = {
        "dit": {"parameters": rep["dit_parameters"], "state_dict_keys": rep["dit_state_dict_keys"],
                "bf16_bytes": 2 * rep["dit_parameters"]},
        "vae": {**_count(vae), "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters())},
    }
    if encoders:
        from transformers import Wav2Vec2Model

        from models.text_encoder import UMT5Encoder

        with torch.device("meta"):
            params["audio_encoder"] = _count(Wav2Vec2Model(config.audio.to_hf()))
            params["text_encoder"] = _count(UMT5Encoder(config.text))

    # 2. FLOPs (exact ints) with TFLOP summaries
    flops = {k: rep[k] for k in ("step_first_block", "step_steady_state", "block_first", "block_steady_state",
                                 "sink_prefill", "vae_decode_block")}
    summary = {k: tflop(v["total"], 3) for k, v in flops.items()}
    bound = rep["physical_bound"]
    return {
        "config": str(spec),
        "resolution": {"height": h, "width": w, "latent_hw": list(latent_hw),
                       "tokens_per_block": rep["tokens_per_block"], "sink_tokens": rep["sink_tokens"],
                       "attention_keys_first_block": rep["keys_first_block"],
                       "attention_keys_steady_state": rep["keys_steady_state"],
                       "frames_per_block": config.dit.frames_per_block * config.dit.vae_temporal_stride,
                       "denoising_steps": steps},
        "parameters": params,
        "flops": flops,
        "tflop": summary,
        "analytic_check": {"step_first_block": rep["analytic_step_first_block"],
                           "step_steady_state": rep["analytic_step_steady_state"],
                           "max_relative_error": rep["analytic_relative_error"]},
        "physical_bound": bound,
        "counting_rule": "FLOPs = 2 x MACs of matmuls, convolutions and attention (QK^T, PV); "
                         "counted with torch FlopCounterMode on the meta device",
    }
