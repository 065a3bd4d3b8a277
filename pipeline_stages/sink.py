"""Sink inputs of a session: the reference latent, the motion latents and the text context.

At session start the reference image is VAE-encoded twice (as the reference's TPP path does):

- the reference latent: the image as a single frame -> 1 latent frame ``[B, C, 1, h, w]``;
- the motion latents: ``motion_frames`` (73) copies of the image -> 19 latent frames
  ``[B, C, 19, h, w]``, the FramePack history and the VAE decoder's warm-up context.

These tensors are all a denoise or decode stage needs to rebuild a session's sink, so they are what
the services store per session (Redis) and ship to a lane that takes the session over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.inputs import prepare_reference, size_for_area
from models.text_encoder import TextEncoder
from models.vae import WanVAE

if TYPE_CHECKING:
    from models.liveavatar import LiveAvatarModels
    from pipeline_stages.runner import SessionSpec


@dataclass
class SinkInputs:
    """Everything needed to (re)build a session's sink on any stage."""

    ref_latent: Tensor        # [B, C, 1, h, w]
    motion_latents: Tensor    # [B, C, Fm, h, w]
    text_context: Tensor      # [B, Lt, text_dim] (trimmed umT5 output)

    def tensors(self) -> list[Tensor]:
        return [self.ref_latent, self.motion_latents, self.text_context]

    @classmethod
    def from_tensors(cls, tensors: list[Tensor]) -> SinkInputs:
        ref, motion, text = tensors
        return cls(ref, motion, text)

    def to(self, device: torch.device | str) -> SinkInputs:
        return SinkInputs(*(t.to(device) for t in self.tensors()))


@torch.no_grad()
def encode_sink(vae: WanVAE, text: TextEncoder, image: Tensor, prompt: str, motion_frames: int) -> SinkInputs:
    """image [3, H, W] in [-1, 1] -> :class:`SinkInputs` (batch 1)."""
    video = image.to(device=next(vae.parameters()).device, dtype=vae.dtype)[None, :, None]   # [1, 3, 1, H, W]
    ref_latent = vae.encode(video)                                                          # [1, C, 1, h, w]
    motion_latents = vae.encode(video.expand(-1, -1, motion_frames, -1, -1).contiguous())  # [1, C, 19, h, w]
    context = text.encode_prompt(prompt)[None]                                              # [1, Lt, text_dim]
    return SinkInputs(ref_latent, motion_latents, context)


def output_size(models: LiveAvatarModels, image_rgb: np.ndarray) -> tuple[int, int]:
    """(H, W) of the video for this image under the configured area rule."""
    cfg = models.config
    return size_for_area(image_rgb.shape[0], image_rgb.shape[1], cfg.area, cfg.size_multiple)


def prepare_sink(models: LiveAvatarModels, spec: SessionSpec) -> tuple[SinkInputs, tuple[int, int]]:
    """Resize/crop the reference image, VAE-encode it and encode the prompt (once per session).

    Returns the sink and the video's (H, W). ``models`` needs its VAE and text encoder.
    """
    h, w = output_size(models, spec.image_rgb)
    ref = prepare_reference(spec.image_rgb, h, w)
    return encode_sink(models.vae, models.text, ref, spec.prompt, models.config.dit.motion_frames), (h, w)
