"""FramePack motioner: the motion history as a few compressed sink tokens.

The last `sum(framepack_buckets)` = 1 + 2 + 16 = 19 motion latents are split, near to far,
into three buckets and patchified at 1x, 2x and 4x compression:

| bucket | latents | key                 | Conv3d kernel = stride | RoPE time indices    |
|--------|---------|---------------------|------------------------|----------------------|
| post   | 1       | `frame_packer.proj`    | (1, 2, 2)           | -1                   |
| 2x     | 2       | `frame_packer.proj_2x` | (2, 4, 4)           | -3                   |
| 4x     | 16      | `frame_packer.proj_4x` | (4, 8, 8)           | -19, -14, -9, -4     |

(kernels shown for patch (1, 2, 2): time = compression, space = compression * patch.)
At a 48x88 latent grid that is 1056 + 264 + 264 tokens. The h/w RoPE indices of a compressed
bucket are spread over the FULL patch grid with `linspace(0, n-1, m)` truncated to int, so a
coarse token sits where its patch centre-ish lies in the fine grid. Time indices of bucket i
run over its latent span [-(b_0+..+b_i), -(b_0+..+b_{i-1}) - 1] with `linspace`, truncated
towards zero like the reference (which looks up |p| and conjugates).

Drop mode (assumption, see report): with fewer than 19 motion latents the history is
zero-padded on the far (old) side. `add_last_motion` (2 = keep all buckets, 1 = hide the
nearest latent, 0 = hide the nearest 3) hides near buckets: in "padd" mode their latents are
zeroed and the token count stays fixed (the released config), in "drop" mode their tokens
are removed. The model uses add_last_motion = 2 (config `add_last_motion=True`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from models.config import DiTConfig, ModelInputError
from models.rope import RopePositions

COMPRESSIONS = (1, 2, 4)  # fixed by the checkpoint keys proj, proj_2x, proj_4x


def _linspace_int(start: float, stop: float, num: int) -> np.ndarray:
    """numpy linspace truncated to int64 (the reference's `np.linspace(...).astype(int)`)."""
    return np.linspace(start, stop, num).astype(np.int64)


def framepack_bucket_shapes(config: DiTConfig, latent_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
    """Token grid (t, h, w) of each bucket (post, 2x, 4x) for a latent grid (h, w)."""
    h, w = config.check_latent_hw(latent_hw)
    _, ph, pw = config.patch_size
    return [(b // c, h // (ph * c), w // (pw * c)) for b, c in zip(config.framepack_buckets, COMPRESSIONS, strict=True)]


def framepack_mode(config: DiTConfig) -> int:
    """The `add_last_motion` mode the model runs the motioner in: 2 (keep every bucket) when the
    config's `add_last_motion` is set (the released model), else 0."""
    return 2 if config.add_last_motion else 0


def framepack_dropped(config: DiTConfig, add_last_motion: int) -> int:
    """How many of the nearest buckets (post, then 2x) have no tokens: `2 - add_last_motion` in
    "drop" mode; none in "padd" mode (hidden buckets keep their tokens, their latents zeroed)."""
    if add_last_motion not in (0, 1, 2):
        raise ModelInputError(f"add_last_motion must be 0, 1 or 2, got {add_last_motion}")
    return 2 - add_last_motion if config.framepack_drop_mode == "drop" else 0


def framepack_token_count(config: DiTConfig, latent_hw: tuple[int, int], add_last_motion: int | None = None) -> int:
    """The number of FramePack motion tokens for a latent grid (h, w); `add_last_motion` defaults
    to the config's mode (`framepack_mode`). The one place this count is defined."""
    mode = framepack_mode(config) if add_last_motion is None else add_last_motion
    shapes = framepack_bucket_shapes(config, latent_hw)[framepack_dropped(config, mode):]
    return sum(t * h * w for t, h, w in shapes)


def framepack_positions(config: DiTConfig, latent_hw: tuple[int, int],
                        add_last_motion: int = 2) -> RopePositions:
    """RoPE positions of the FramePack tokens, in token order (post, 2x, 4x)."""
    h, w = config.check_latent_hw(latent_hw)
    gh, gw = h // config.patch_size[1], w // config.patch_size[2]   # full patch grid
    parts, spans, dropped = [], 0, framepack_dropped(config, add_last_motion)
    for i, (bucket, (nt, nh, nw)) in enumerate(zip(config.framepack_buckets,
                                                  framepack_bucket_shapes(config, latent_hw), strict=True)):
        spans += bucket
        if i < dropped:
            continue
        first = -spans                              # oldest latent index of the bucket
        t = -_linspace_int(-first, -first - bucket + 1, nt)   # e.g. 19 -> 4 in 4 steps, negated
        hh = _linspace_int(0, gh - 1, nh)
        ww = _linspace_int(0, gw - 1, nw)
        parts.append(RopePositions.grid(torch.from_numpy(t), torch.from_numpy(hh), torch.from_numpy(ww)))
    return RopePositions.cat(parts)


class FramePackMotioner(nn.Module):
    """Patchify the motion history at 1x/2x/4x compression into dim-wide tokens."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        _, ph, pw = config.patch_size
        c_in, dim = config.in_dim, config.dim
        # 1. one Conv3d per bucket, kernel = stride = (c, c*ph, c*pw)
        self.proj = nn.Conv3d(c_in, dim, (1, ph, pw), stride=(1, ph, pw))
        self.proj_2x = nn.Conv3d(c_in, dim, (2, 2 * ph, 2 * pw), stride=(2, 2 * ph, 2 * pw))
        self.proj_4x = nn.Conv3d(c_in, dim, (4, 4 * ph, 4 * pw), stride=(4, 4 * ph, 4 * pw))

    def forward(self, motion_latents: Tensor, add_last_motion: int = 2) -> Tensor:
        """motion_latents [B, C, Fm, h, w] (Fm <= 19, most recent last) -> tokens [B, Lm, dim]."""
        cfg = self.config
        if motion_latents.ndim != 5 or motion_latents.shape[1] != cfg.in_dim:
            raise ModelInputError(f"motion latents must be [B, {cfg.in_dim}, F, h, w], "
                                  f"got {tuple(motion_latents.shape)}")
        dropped = framepack_dropped(cfg, add_last_motion)
        b, c, fm, h, w = motion_latents.shape
        cfg.check_latent_hw((h, w))
        total = sum(cfg.framepack_buckets)
        if not 1 <= fm <= total:
            raise ModelInputError(f"need 1..{total} motion latent frames, got {fm}")
        # 1. zero-pad the far (old) side up to the bucket total           # [B, C, 19, h, w]
        x = motion_latents.to(self.proj.weight)                             # dtype and device
        if fm < total:
            x = torch.cat([x.new_zeros(b, c, total - fm, h, w), x], dim=2)
        n_post, n_2x, n_4x = cfg.framepack_buckets
        hidden = (0, n_post, n_post + n_2x)[2 - add_last_motion]   # nearest latents to hide
        if hidden and cfg.framepack_drop_mode == "padd":
            x = torch.cat([x[:, :, :total - hidden], x.new_zeros(b, c, hidden, h, w)], dim=2)
        # 2. split far -> near and patchify each bucket                      # [B, dim, t', h', w']
        far, mid, near = x.split([n_4x, n_2x, n_post], dim=2)
        tokens = [self.proj(near), self.proj_2x(mid), self.proj_4x(far)]
        tokens = [t.flatten(2).transpose(1, 2) for t in tokens[dropped:]]    # [B, L_i, dim]
        return torch.cat(tokens, dim=1)                                      # [B, Lm, dim]
