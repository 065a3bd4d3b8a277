"""3D rotary position embedding (RoPE) for the causal Wan2.2-S2V DiT.

Scheme (same numbers as the reference, different mechanics)
-----------------------------------------------------------
* Each head vector of size d is split into three bands for the (t, h, w) axes with
  `[d - 4*(d//6), 2*(d//6), 2*(d//6)]` real dims (`[44, 42, 42]` for d = 128).
* Adjacent-pair complex convention: dims (2i, 2i+1) form the complex number x_2i + i*x_2i+1.
* Band with n real dims uses the n/2 frequencies `theta ** (-(0, 2, 4, ..., n-2) / n)`,
  theta = 10000.
* A token at integer position p on an axis rotates that band's pairs by the angle p * freq.

The reference precomputes `rope_params(45000, .)` tables of `polar(1, outer(arange(45000),
freq))` and indexes them, which stops working after 45,000 latent frames (7,200 s at
25 fps); negative (motion) positions are looked up at |p| and conjugated. Here the angle
`p * freq` is computed ON THE FLY in float64 for any integer p (negative too), so positions
never run out of range. For 0 <= p < 45000 this is bit-identical to the table (same float64
product, same `torch.polar`); `rope_table` builds the reference-style table so a test shows it.
float64 keeps the angle exact to ~1e-16 relative, i.e. < 1e-9 rad even at p = 10^7.

fp16 factors: the reference stores cos/sin as fp16 before applying them in float64.
`DiTConfig.rope_fp16_factors` (default True) reproduces that quantisation, because the
released weights were trained with it; set it to False for exact float64 factors.
The rotation itself is always done in float64 and cast back to the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims per axis (t, h, w): [d - 4(d//6), 2(d//6), 2(d//6)] -> [44, 42, 42] for 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE needs an even head_dim >= 6, got {head_dim}")
    s = head_dim // 6
    return head_dim - 4 * s, 2 * s, 2 * s


def rope_inv_freqs(head_dim: int, theta: float = 10000.0,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-axis float64 frequencies, lengths [22, 21, 21] for head_dim 128."""
    return tuple(1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64, device=device).div(n))
                 for n in rope_split(head_dim))  # type: ignore[return-value]


def rope_table(num_positions: int, head_dim: int, theta: float = 10000.0) -> Tensor:
    """The reference-style table: complex128 [num_positions, head_dim/2], bands concatenated
    (t | h | w). Row p holds the factors of position p on every axis. Only for tests/tools."""
    pos = torch.arange(num_positions)
    bands = [torch.polar(torch.ones(num_positions, len(f), dtype=torch.float64), torch.outer(pos, f))
             for f in rope_inv_freqs(head_dim, theta)]
    return torch.cat(bands, dim=1)


@dataclass(frozen=True)
class RopePositions:
    """Integer (t, h, w) positions of a token sequence, each int64 [L]."""

    t: Tensor
    h: Tensor
    w: Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @staticmethod
    def grid(t: Tensor, h: Tensor, w: Tensor) -> RopePositions:
        """Row-major (t, h, w) grid of 1-D index vectors -> L = len(t)*len(h)*len(w) tokens,
        in the token order of `Conv3d(...).flatten(2)`."""
        tt, hh, ww = torch.meshgrid(t.long(), h.long(), w.long(), indexing="ij")
        return RopePositions(tt.reshape(-1), hh.reshape(-1), ww.reshape(-1))

    @staticmethod
    def cat(parts: list[RopePositions]) -> RopePositions:
        return RopePositions(torch.cat([p.t for p in parts]), torch.cat([p.h for p in parts]),
                             torch.cat([p.w for p in parts]))

    def to(self, device: torch.device | str) -> RopePositions:
        return RopePositions(self.t.to(device), self.h.to(device), self.w.to(device))


@dataclass(frozen=True)
class RopeFactors:
    """cos/sin of the rotation angles, float64 [L, head_dim/2] (pair i of token l)."""

    cos: Tensor
    sin: Tensor

    @staticmethod
    def cat(parts: list[RopeFactors]) -> RopeFactors:
        return RopeFactors(torch.cat([p.cos for p in parts]), torch.cat([p.sin for p in parts]))


def rope_angles(pos: RopePositions, head_dim: int, theta: float = 10000.0) -> Tensor:
    """float64 angles [L, head_dim/2] = position * frequency per band, for any integer position."""
    ft, fh, fw = rope_inv_freqs(head_dim, theta, device=pos.t.device)
    return torch.cat([torch.outer(pos.t, ft), torch.outer(pos.h, fh), torch.outer(pos.w, fw)], dim=1)


def rope_factors(pos: RopePositions, head_dim: int, theta: float = 10000.0,
                 fp16: bool = False) -> RopeFactors:
    """cos/sin factors for `pos`; with fp16=True they are rounded to fp16 like the reference."""
    ang = rope_angles(pos, head_dim, theta)
    z = torch.polar(torch.ones_like(ang), ang)   # same cos/sin kernel as the reference table
    cos, sin = z.real.contiguous(), z.imag.contiguous()
    if fp16:
        cos, sin = cos.half().double(), sin.half().double()
    return RopeFactors(cos, sin)


def apply_rope(x: Tensor, f: RopeFactors) -> Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by factors [L, D/2]; float64 math, x's dtype out."""
    b, n, h, d = x.shape
    if f.cos.shape != (n, d // 2):
        raise ValueError(f"RoPE factors {tuple(f.cos.shape)} do not match x [B={b}, L={n}, H={h}, D={d}]")
    xp = x.double().reshape(b, n, h, d // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]                           # [B, L, H, D/2]
    cos, sin = f.cos[None, :, None, :], f.sin[None, :, None, :]  # [1, L, 1, D/2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.reshape(b, n, h, d).to(x.dtype)
