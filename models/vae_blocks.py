"""Building blocks of the Wan2.1 video VAE (causal 3D convolutions, RMS norms, resampling).

Every block here is *causal in time*: an output frame depends only on the input frames at or
before it. That is what lets the decoder run as a stream, one chunk of latents at a time, and
still produce exactly what a single call over all latents produces.

Streaming is expressed with two explicit arguments that every block's ``forward`` accepts:

* ``caches``: a list with one slot per temporal convolution (``CausalConv3d`` whose time kernel
  is larger than 1). Slot indices are integers assigned once by :func:`assign_cache_slots`.
  A slot holds the last input frames that convolution saw (``CACHE_T`` = 2 for the 3-tap
  convolutions, 1 for the stride-2 temporal downsampler), or ``None`` before the first write.
  ``None`` means "zeros", which is exactly the causal zero padding of a one-shot call.
  Pass ``caches=None`` for a one-shot (non-streaming) call; nothing is then stored.
* ``first_chunk``: True when the chunk starts at the very first frame of the video. The first
  frame is special in the Wan VAE: the temporal resamplers pass it through alone (one pixel
  frame <-> one latent frame), and every later group of 4 pixel frames maps to one latent.

The parameter names (``residual.0.gamma``, ``resample.1.weight``, ``time_conv.weight``, ...)
follow the official ``Wan2.1_VAE.pth`` state dict, which is why some ``nn.Sequential`` slots
hold parameter-free layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Number of past frames a 3-tap causal temporal convolution keeps between chunks.
CACHE_T = 2

Caches = list[Tensor | None]


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are computed in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    return tuple(value)  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """A Conv3d that pads only into the past along time (and symmetrically in space).

    ``padding=(pt, ph, pw)`` means ``2 * pt`` frames of past context and none of future. In
    streaming use, the past frames come from ``caches[self.cache_slot]`` instead of zeros.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_dim, out_dim, _triple(kernel_size), stride=_triple(stride), padding=0)
        pad_t, pad_h, pad_w = _triple(padding)
        self.past_frames = 2 * pad_t  # all temporal padding goes before the first frame
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)  # F.pad order: W left/right, H top/bottom
        self.cache_slot: int | None = None  # set by assign_cache_slots when kernel_t > 1

    def forward(self, x: Tensor, caches: Caches | None = None) -> Tensor:  # type: ignore[override]
        # [B, C_in, T, H, W] -> [B, C_out, T', H, W]
        if self.past_frames > 0 and caches is None:  # one-shot: causal zero padding
            return super().forward(F.pad(x, (*self.space_pad, self.past_frames, 0)))
        if self.past_frames > 0:
            past = caches[self._slot()]
            if past is None:  # first chunk of a stream: the past is zeros
                b, c, _, h, w = x.shape
                past = x.new_zeros(b, c, self.past_frames, h, w)
            x = torch.cat([past, x], dim=2)  # [B, C, past + T, H, W]
            caches[self._slot()] = x[:, :, -self.past_frames :].clone()  # a copy, not a view
        if any(self.space_pad):
            x = F.pad(x, self.space_pad)
        return super().forward(x)

    def _slot(self) -> int:
        if self.cache_slot is None:
            raise RuntimeError("CausalConv3d used with caches but no cache slot was assigned")
        return self.cache_slot


class RMSNorm(nn.Module):
    """Channel-wise RMS norm: ``x / ||x||_2 * sqrt(C) * gamma`` over dim 1 (no bias).

    The stored gamma has the official checkpoint shape: ``[C, 1, 1, 1]`` with ``video=True``,
    ``[C, 1, 1]`` otherwise (the attention block's norm); it is broadcast over whatever trailing
    dims the input has, so both work on ``[B, C, T, H, W]``. Computed in fp32 (fp64 for fp64).
    """

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * (3 if video else 2))))

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, *] -> [B, C, *]
        dtype = upcast_dtype(x.dtype)
        gamma = self.gamma.to(dtype).reshape(-1, *([1] * (x.dim() - 2)))
        y = F.normalize(x.to(dtype), dim=1) * self.scale * gamma
        return y.type_as(x)


class FrameUpsample2x(nn.Module):
    """Nearest 2x upsampling of H and W of ``[B, C, T, H, W]`` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, T, H, W] -> [B, C, T, 2H, 2W]
        return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")  # exact copy


class FramePadRightBottom(nn.Module):
    """Zero-pad W on the right and H at the bottom by one (before a stride-2 3x3 conv)."""

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, T, H, W] -> [B, C, T, H + 1, W + 1]
        return F.pad(x, (0, 1, 0, 1))


def framewise_conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Apply a Conv2d to every frame of ``[B, C, T, H, W]``.

    Runs as a conv3d with a (1, kh, kw) kernel instead of folding T into the batch: same math, but
    on CPU a conv2d's rounding can depend on the batch size, and folding T into the batch would
    make a streamed chunk differ from a one-shot call in the last bits. conv3d along T does not.
    """
    return F.conv3d(
        x,
        conv.weight.unsqueeze(2),  # [C_out, C_in, kh, kw] -> [C_out, C_in, 1, kh, kw]
        conv.bias,
        stride=(1, *conv.stride),
        padding=(0, *conv.padding),  # type: ignore[misc]
    )


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3x3x3-norm-SiLU-dropout-conv3x3x3 plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # 1. residual branch (indices 0..6 match the official keys residual.{0,2,3,6})
        self.residual = nn.Sequential(
            RMSNorm(in_dim, video=True),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, video=True),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        # 2. shortcut (a pointwise conv only when the channel count changes)
        self.shortcut: nn.Module = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, caches: Caches | None = None, first_chunk: bool = True) -> Tensor:
        # [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        # 1. residual branch
        h = x
        for layer in self.residual:
            h = layer(h, caches) if isinstance(layer, CausalConv3d) else layer(h)
        # 2. shortcut
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # 1. norm, 2. fused q/k/v projection, 3. output projection (zero-init: starts as identity)
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor, caches: Caches | None = None, first_chunk: bool = True) -> Tensor:
        identity = x
        b, c, t, h, w = x.shape
        # 1. norm over C at every position
        x = self.norm(x)
        # 2. q/k/v: [B, 3C, T, H, W] -> 3 x [B*T, 1, H*W, C]
        qkv = framewise_conv2d(x, self.to_qkv).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = (part.contiguous() for part in qkv.chunk(3, dim=-1))  # one layout, one kernel path
        x = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        x = x.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # -> [B, C, T, H, W]
        # 3. output projection
        return framewise_conv2d(x, self.proj) + identity


RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")


class Resample(nn.Module):
    """Spatial 2x up/down sampling, optionally with 2x temporal up/down sampling.

    * ``upsample2d``: nearest 2x then conv3x3 to ``dim // 2`` channels (per frame).
    * ``upsample3d``: first a causal (3,1,1) conv to ``2 * dim`` channels whose two halves become
      two consecutive output frames (T -> 2T), then as ``upsample2d``. On the first chunk the
      first frame (that of latent 0) is passed through alone and not doubled, and is also not
      part of the time conv's context (the reference's ``'Rep'`` marker behaviour).
    * ``downsample2d``: zero-pad right/bottom by one then conv3x3 stride 2 (per frame).
    * ``downsample3d``: as ``downsample2d``, then a (3,1,1) stride-2 temporal conv. On the first
      chunk the first frame passes through alone; after that every 2 frames give 1, the window
      reaching one frame into the past (cached between chunks).
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {RESAMPLE_MODES}")
        self.mode = mode
        self.dim = dim
        # 1. spatial resampling (index 1 holds the conv, matching the key resample.1.*)
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(FrameUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(FramePadRightBottom(), nn.Conv2d(dim, dim, 3, stride=2))
        # 2. temporal resampling
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x: Tensor, caches: Caches | None = None, first_chunk: bool = True) -> Tensor:
        # upsample: [B, C, T, H, W] -> [B, C/2, T', 2H, 2W]; downsample: -> [B, C, T', H/2, W/2]
        if self.mode == "upsample3d":
            x = self._time_upsample(x, caches, first_chunk)
        # 1. spatial resampling, frame by frame: [B, C, T, H, W] -> [B, C', T, H', W']
        x = framewise_conv2d(self.resample[0](x), self.resample[1])
        # 2. temporal downsampling
        if self.mode == "downsample3d":
            x = self._time_downsample(x, caches, first_chunk)
        return x

    def _time_upsample(self, x: Tensor, caches: Caches | None, first_chunk: bool) -> Tensor:
        # [B, C, T, H, W] -> [B, C, 2T (- 1 on the first chunk), H, W]
        head, body = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (x[:, :, :0], x)
        if body.shape[2] == 0:
            return head
        b, c, t, h, w = body.shape
        y = self.time_conv(body, caches)  # [B, 2C, T, H, W]; channel halves = even/odd frames
        y = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return torch.cat([head, y], dim=2)

    def _time_downsample(self, x: Tensor, caches: Caches | None, first_chunk: bool) -> Tensor:
        # [B, C, T, H, W] -> first chunk (T odd): [B, C, 1 + (T-1)/2, ...]; later (T even): T/2
        slot = self.time_conv.cache_slot
        if first_chunk:
            head = x[:, :, :1]  # the first frame passes through alone
            body = self.time_conv(x) if x.shape[2] >= 3 else x[:, :, :0]
            out = torch.cat([head, body], dim=2)
        else:
            if caches is None or slot is None or caches[slot] is None:
                raise RuntimeError("temporal downsampling of a later chunk needs its cached frame")
            out = self.time_conv(torch.cat([caches[slot], x], dim=2))
        if caches is not None:
            if slot is None:
                raise RuntimeError("Resample used with caches but no cache slot was assigned")
            caches[slot] = x[:, :, -1:].clone()  # the window of the next pair starts here
        return out


def assign_cache_slots(module: nn.Module) -> int:
    """Give every temporal conv (time kernel > 1) under ``module`` a cache slot; return the count."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, CausalConv3d) and sub.kernel_size[0] > 1:
            sub.cache_slot = count
            count += 1
    return count


def run_causal(layers: nn.Sequential, x: Tensor, caches: Caches | None, first_chunk: bool) -> Tensor:
    """Apply a Sequential of VAE blocks, routing the streaming arguments to those that use them."""
    for layer in layers:
        if isinstance(layer, (ResidualBlock, AttentionBlock, Resample)):
            x = layer(x, caches, first_chunk)
        elif isinstance(layer, CausalConv3d):
            x = layer(x, caches)
        else:
            x = layer(x)
    return x
