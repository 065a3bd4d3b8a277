"""Explicit self-attention caches of the causal DiT: the noisy ring buffer and the sink.

`KVCache` (one per denoising stage, "timestep forcing")
    Per layer K and V `[B, S, H, hd]` with S = kv_cache_frames * frame_seq_len tokens
    (12 * 1056 = 12,672 at 384x704). Latent frame f lives at ring slot f % kv_cache_frames.
    Keys are stored AFTER RoPE at their absolute frame index, so they never need re-rotation.
    The integer state (`start_frame`, `end_frame`) says which absolute frames are held;
    a block attends to all of them (itself included), i.e. to the last kv_cache_frames frames.

`SinkCache` (reference frame + FramePack motion tokens, permanent)
    Per layer K (BEFORE RoPE) and V `[B, S_sink, H, hd]`, plus the sink tokens' (t, h, w)
    RoPE positions. The ref group (the first `num_ref_tokens`) gets a new time index on
    every call (rolling sink); the motion tokens keep their fixed negative times.

Both are sized exactly from the config and the latent grid (no hard-coded capacity), hold
only tensors and ints, and report their size with `nbytes()`. Neither grows with time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.config import DiTConfig, ModelInputError
from models.motioner import framepack_mode, framepack_positions
from models.rope import RopePositions


@dataclass(frozen=True)
class RingWindow:
    """Token-slot ranges for one block: where it writes and what it attends to (ring order)."""

    write: tuple[tuple[int, int], ...]   # slot ranges receiving the block's tokens, in order
    read: tuple[tuple[int, int], ...]    # slot ranges holding every visible frame


def _ranges(first_frame: int, count: int, capacity: int, fsl: int) -> tuple[tuple[int, int], ...]:
    """Slot ranges of `count` consecutive frames from absolute `first_frame` (at most 2 pieces)."""
    if count == capacity:
        start = first_frame % capacity
        pieces = ((start, capacity), (0, start)) if start else ((0, capacity),)
    else:
        start = first_frame % capacity
        end = start + count
        pieces = ((start, end),) if end <= capacity else ((start, capacity), (0, end - capacity))
    return tuple((a * fsl, b * fsl) for a, b in pieces if b > a)


@dataclass
class KVCache:
    """Ring buffer of roped self-attention K/V for the last `capacity_frames` latent frames."""

    k: list[Tensor]            # per layer [B, capacity_frames * frame_seq_len, H, hd]
    v: list[Tensor]
    frame_seq_len: int
    capacity_frames: int
    start_frame: int = 0       # oldest absolute frame held
    end_frame: int = 0         # one past the newest absolute frame held (== start: empty)

    @classmethod
    def allocate(cls, config: DiTConfig, batch_size: int, latent_hw: tuple[int, int],
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        fsl = config.frame_seq_len(latent_hw)
        shape = (batch_size, config.kv_cache_frames * fsl, config.num_heads, config.head_dim)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   frame_seq_len=fsl, capacity_frames=config.kv_cache_frames)

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    def reset(self) -> None:
        """Forget every frame (the tensors are kept; stale slots are never read)."""
        self.start_frame = self.end_frame = 0

    def advance(self, frame_start: int, num_frames: int) -> RingWindow:
        """Register a block of frames [frame_start, frame_start + num_frames) and return its window.

        Allowed: the first block of an empty cache (any frame_start), the next block
        (frame_start == end_frame), or re-running a held block (frames after it are dropped).
        """
        cap = self.capacity_frames
        if not 1 <= num_frames <= cap:
            raise ModelInputError(f"a block must have 1..{cap} latent frames, got {num_frames}")
        if frame_start < 0:
            raise ModelInputError(f"frame_start must be >= 0, got {frame_start}")
        if self.num_frames == 0:
            self.start_frame = frame_start
        elif frame_start > self.end_frame:
            raise ModelInputError(f"frame_start {frame_start} leaves a gap after the cached frames "
                                  f"[{self.start_frame}, {self.end_frame}); reset() the cache first")
        elif frame_start < self.start_frame:
            raise ModelInputError(f"frame_start {frame_start} is older than the cached frames "
                                  f"[{self.start_frame}, {self.end_frame})")
        self.end_frame = frame_start + num_frames
        self.start_frame = max(self.start_frame, self.end_frame - cap)
        fsl = self.frame_seq_len
        return RingWindow(write=_ranges(frame_start, num_frames, cap, fsl),
                          read=_ranges(self.start_frame, self.num_frames, cap, fsl))

    def write(self, layer: int, window: RingWindow, k: Tensor, v: Tensor) -> None:
        """Store the block's roped keys and values k, v [B, N, H, hd] at its ring slots."""
        offset = 0
        for a, b in window.write:
            self.k[layer][:, a:b] = k[:, offset:offset + b - a].detach()
            self.v[layer][:, a:b] = v[:, offset:offset + b - a].detach()
            offset += b - a
        if offset != k.shape[1]:
            raise ModelInputError(f"block has {k.shape[1]} tokens but its window holds {offset}")

    def read(self, layer: int, window: RingWindow) -> tuple[Tensor, Tensor]:
        """Every visible key/value of the layer, [B, L_visible, H, hd] each."""
        if len(window.read) == 1:
            a, b = window.read[0]
            return self.k[layer][:, a:b], self.v[layer][:, a:b]
        return (torch.cat([self.k[layer][:, a:b] for a, b in window.read], dim=1),
                torch.cat([self.v[layer][:, a:b] for a, b in window.read], dim=1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def sink_positions(config: DiTConfig, latent_hw: tuple[int, int]) -> tuple[RopePositions, int]:
    """Prefill positions of the sink tokens [ref | FramePack motion] and the ref token count."""
    h, w = config.check_latent_hw(latent_hw)
    gh, gw = h // config.patch_size[1], w // config.patch_size[2]
    ref = RopePositions.grid(torch.tensor([config.ref_rope_time]), torch.arange(gh), torch.arange(gw))
    return RopePositions.cat([ref, framepack_positions(config, latent_hw, framepack_mode(config))]), len(ref)


@dataclass
class SinkCache:
    """Un-roped K and V of the cond (sink) tokens, per layer, plus their RoPE positions."""

    k: list[Tensor]            # per layer [B, S_sink, H, hd], BEFORE RoPE
    v: list[Tensor]
    positions: RopePositions   # prefill positions (ref group at config.ref_rope_time)
    num_ref_tokens: int        # the ref group is tokens [0, num_ref_tokens)
    prefill_count: int = 0     # how many times the sink was (re)filled; 0 = empty
    keep_grad: bool = False    # training: keep the autograd graph of the K/V (prefill once per graph)

    @classmethod
    def allocate(cls, config: DiTConfig, batch_size: int, latent_hw: tuple[int, int],
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> SinkCache:
        pos, n_ref = sink_positions(config, latent_hw)
        shape = (batch_size, len(pos), config.num_heads, config.head_dim)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   positions=pos.to(device) if device is not None else pos, num_ref_tokens=n_ref)

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    def positions_at(self, ref_time: int) -> RopePositions:
        """Positions with the ref group moved to time `ref_time` (motion tokens unchanged)."""
        t = self.positions.t.clone()
        t[: self.num_ref_tokens] = int(ref_time)
        return RopePositions(t, self.positions.h, self.positions.w)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store un-roped keys and values [B, S_sink, H, hd] of one layer."""
        if k.shape != self.k[layer].shape:
            raise ModelInputError(f"sink K/V {tuple(k.shape)} does not match the cache "
                                  f"{tuple(self.k[layer].shape)}")
        if self.keep_grad:                     # training: the cond path learns through the sink
            self.k[layer], self.v[layer] = k, v
            return
        self.k[layer].copy_(k.detach())
        self.v[layer].copy_(v.detach())

    def nbytes(self) -> int:
        tensors = (*self.k, *self.v, self.positions.t, self.positions.h, self.positions.w)
        return sum(t.numel() * t.element_size() for t in tensors)
