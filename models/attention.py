"""Attention layers of the causal Wan2.2-S2V DiT and the three ways self-attention is run.

Layers (key names as in the official checkpoint)
    `RMSNorm`        weight [dim]; x * rsqrt(mean(x^2) + eps) in fp32, then * weight.
    `SelfAttention`  q, k, v, o Linear(dim, dim); norm_q / norm_k RMSNorm over the FULL dim
                     (before the head split). RoPE and caching are delegated to a context.
    `CrossAttention` same layout; queries from x, keys/values from a context sequence
                     (text: all text_len tokens, padding included, no mask; audio: 5 tokens).

Self-attention contexts (explicit state, one object per forward call)
    `SinkPrefill`   cond (ref + motion) tokens attend to each other; un-roped K and V go
                    into the SinkCache.
    `StreamingStep` a noisy block attends to [ring-buffer keys | sink keys]; its roped K/V are
                    written into the KVCache first (so it sees itself bidirectionally).
    `MaskedFull`    all noisy frames at once with an explicit boolean mask over
                    [noisy keys | sink keys per ref time]: the reference for the streaming path.

All attention goes through `torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.kv_cache import KVCache, RingWindow, SinkCache
from models.rope import RopeFactors, apply_rope


def upcast(x: Tensor) -> Tensor:
    """x in at least fp32 (fp64 stays fp64): the precision of norms, modulation and residuals."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = upcast(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q [B, Lq, H, hd], k/v [B, Lk, H, hd], mask [Lq, Lk] bool (True = attend) -> [B, Lq, H, hd]."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


class _Projections(nn.Module):
    """q, k, v, o projections plus q/k RMSNorm, shared by self- and cross-attention."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))           # [B, L, dim] -> [B, L, H, hd]

    def queries(self, x: Tensor) -> Tensor:
        return self._heads(self.norm_q(self.q(x)))

    def keys_values(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.norm_k(self.k(ctx))), self._heads(self.v(ctx))


class SelfAttention(_Projections):
    def forward(self, x: Tensor, ctx: AttentionContext, layer: int) -> Tensor:
        """x [B, L, dim] -> [B, L, dim]; RoPE, caches and masking come from `ctx`."""
        # 1. projections and q/k norms (full dim, before the head split)   # [B, L, H, hd]
        q = self.queries(x)
        k, v = self.keys_values(x)
        # 2. attention as the context dictates
        out = ctx.attend(layer, q, k, v)
        # 3. output projection
        return self.o(out.flatten(2))


class CrossAttention(_Projections):
    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, L, dim] attends to every token of context [B, Lc, dim] (no mask) -> [B, L, dim]."""
        q = self.queries(x)
        k, v = self.keys_values(context)
        return self.o(sdpa(q, k, v).flatten(2))


class AttentionContext:
    """How one forward call runs self-attention; `attend` gets un-roped q, k and v."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class SinkPrefill(AttentionContext):
    """Cond tokens only: store un-roped K and V in the sink, attend cond -> cond with RoPE."""

    sink: SinkCache
    rope: RopeFactors                 # cond-token factors (ref at config.ref_rope_time)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.sink.write(layer, k, v)
        return sdpa(apply_rope(q, self.rope), apply_rope(k, self.rope), v)


@dataclass
class StreamingStep(AttentionContext):
    """One noisy block: write roped K/V into the ring, attend to [ring | re-rotated sink]."""

    kv: KVCache
    window: RingWindow
    sink: SinkCache
    rope: RopeFactors                 # the block's noisy-token factors (absolute frames)
    sink_rope: RopeFactors            # sink factors with the ref group at this call's ref time
    use_sink: bool = True             # False: attend to the ring only (the "no sink" ablation)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = apply_rope(q, self.rope), apply_rope(k, self.rope)
        self.kv.write(layer, self.window, k, v)
        k_ring, v_ring = self.kv.read(layer, self.window)                 # [B, L_ring, H, hd]
        if not self.use_sink:
            return sdpa(q, k_ring, v_ring)
        k_sink = apply_rope(self.sink.k[layer], self.sink_rope)          # [B, S_sink, H, hd]
        keys = torch.cat([k_ring, k_sink.to(k_ring.dtype)], dim=1)
        values = torch.cat([v_ring, self.sink.v[layer]], dim=1)
        return sdpa(q, keys, values)


@dataclass
class MaskedFull(AttentionContext):
    """All noisy tokens at once; mask [L, L + S_sink * len(sink_ropes)] says who sees what."""

    sink: SinkCache
    rope: RopeFactors                 # factors of all noisy tokens
    sink_ropes: list[RopeFactors]     # one sink rotation per distinct ref time
    mask: Tensor                      # bool, True = attend

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = apply_rope(q, self.rope), apply_rope(k, self.rope)
        sink_k = [apply_rope(self.sink.k[layer], r).to(k.dtype) for r in self.sink_ropes]
        sink_v = [self.sink.v[layer].to(v.dtype)] * len(self.sink_ropes)
        return sdpa(q, torch.cat([k, *sink_k], dim=1), torch.cat([v, *sink_v], dim=1), self.mask)
