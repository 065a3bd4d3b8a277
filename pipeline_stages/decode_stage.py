"""The streaming VAE decode stage: block latents in, uint8 RGB frames out.

At session start the decoder's causal cache is warmed with the first ``warmup_latents`` (7) motion
latents (the static reference; their 25 frames are discarded), as the reference's TPP VAE rank does.
After that every 3-latent block decodes to exactly 12 frames, so block k covers video time
[0.48 k, 0.48 (k+1)) s and audio samples [7680 k, 7680 (k+1)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.vae import DecoderState, WanVAE


def to_uint8_frames(video: Tensor) -> Tensor:
    """[B=1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (round half to even)."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)   # [3, T, H, W]
    return x.permute(1, 2, 3, 0).contiguous()


class DecodeStage:
    """Streaming causal decode with an explicit :class:`DecoderState`."""

    name = "decode"

    def __init__(self, vae: WanVAE, warmup_latents: int = 7):
        self.vae = vae
        self.warmup_latents = warmup_latents
        self.state: DecoderState | None = None

    @torch.no_grad()
    def start_session(self, motion_latents: Tensor) -> None:
        """Reset the decoder and warm its cache with the static reference's motion latents."""
        self.state = self.vae.init_decode_state()
        n = min(self.warmup_latents, motion_latents.shape[2])
        dev = next(self.vae.parameters()).device
        self.vae.decode_step(motion_latents[:, :, :n].to(device=dev, dtype=self.vae.dtype), self.state)

    def end_session(self) -> None:
        self.state = None

    @torch.no_grad()
    def run(self, latent: Tensor) -> Tensor:
        """latent [1, C, F, h, w] -> frames [4F, H, W, 3] uint8."""
        if self.state is None:
            raise RuntimeError("decode: no session started")
        dev = next(self.vae.parameters()).device
        video = self.vae.decode_step(latent.to(device=dev, dtype=self.vae.dtype), self.state)
        return to_uint8_frames(video)
