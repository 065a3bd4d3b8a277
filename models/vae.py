"""The Wan2.1 video VAE with causal, streaming encode and decode.

Compression: 4x in time, 8x in space, 16 latent channels. The VAE is causal in time: pixel
frame 0 maps alone to latent 0, and every following group of 4 pixel frames maps to one more
latent, so ``T = 1 + 4k`` frames give ``1 + k`` latents and decoding ``1 + k`` latents gives
``1 + 4k`` frames.

Latents handed to and from the DiT are *normalized*: ``z = (mu - mean) / std`` with the 16
per-channel constants in :class:`VAEConfig`. Encoding is deterministic (the posterior mean).

Streaming decode (what the VAE stage of a TPP lane runs)::

    vae = WanVAE(VAEConfig())
    state = vae.init_decode_state()
    frames = vae.decode_step(z[:, :, :7], state)   # 1 + 4*6 = 25 frames
    frames = vae.decode_step(z[:, :, 7:10], state)  # 12 frames, and so on

Any chunking gives the same frames as ``vae.decode(z)`` on all latents at once, and the state
stays the same size however long the stream runs. The state is a :class:`DecoderState`: one
cached-frames slot per temporal convolution plus an integer count of latents decoded so far
(whose being zero is the "first chunk" condition, replacing the reference's ``'Rep'`` marker).

Parameter names follow the official ``Wan2.1_VAE.pth`` state dict (``encoder.conv1``,
``encoder.downsamples.N``, ``encoder.middle``, ``encoder.head``, ``conv1``, ``conv2``,
``decoder.conv1``, ``decoder.middle``, ``decoder.upsamples.N``, ``decoder.head``).
The latent mean/std live in the config (not in the state dict, as in the official checkpoint).

Dtype policy: the module runs in the dtype of its parameters (fp32 or bf16); inputs are cast
to it. RMS norms and the latent (de)normalization compute in fp32 (fp64 for fp64 inputs) and
cast back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.config import unknown_fields
from models.vae_blocks import (
    AttentionBlock,
    Caches,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    assign_cache_slots,
    run_causal,
    upcast_dtype,
)

# Per-channel statistics of Wan2.1 VAE posterior means (the official normalization constants,
# as published with the Wan2.1 VAE).
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class VAEInputError(ValueError):
    """A tensor handed to the VAE has the wrong rank, channel count, length or size."""


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the Wan2.1 VAE. Defaults are the real model (~127 M parameters).

    Field names follow the official config keys, including the official spelling
    ``temperal_downsample``.
    """

    dim: int = 96  # base channel width; stage widths are dim * dim_mult
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder stage (the decoder uses one more)
    attn_scales: tuple[float, ...] = ()  # spatial scales (1, 1/2, ...) with extra attention
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder downsample
    dropout: float = 0.0
    in_channels: int = 3  # RGB
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    # Base width of the decoder alone; None = ``dim`` (the real model). A narrower decoder keeps the
    # encoder and therefore the latent space, so the DiT is unchanged (the tiny v5 checkpoint: 12 / 8).
    decoder_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dim <= 0 or self.z_dim <= 0 or self.num_res_blocks <= 0 or self.in_channels <= 0:
            raise ValueError("VAEConfig: dim, z_dim, num_res_blocks and in_channels must be > 0")
        if len(self.dim_mult) < 2 or any(m <= 0 for m in self.dim_mult):
            raise ValueError(f"VAEConfig: dim_mult needs >= 2 positive entries, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig: temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
                f" entries, got {len(self.temperal_downsample)}"
            )
        if self.decoder_dim is not None and self.decoder_dim <= 0:
            raise ValueError(f"VAEConfig: decoder_dim must be > 0 or None, got {self.decoder_dim}")
        if any((w * m) % 2 for w in (self.dim, self.dec_dim) for m in self.dim_mult):
            raise ValueError("VAEConfig: every stage width (dim or decoder_dim) * dim_mult must be even")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"VAEConfig: latents_mean and latents_std need z_dim = {self.z_dim} entries")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("VAEConfig: latents_std entries must be > 0")

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Same architecture and latent space (z_dim 16, 4x8x8), narrow widths, for CPU tests."""
        return cls(dim=8)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        """Build from a config mapping; unknown keys are an error."""
        unknown = unknown_fields(cls, values)
        if unknown:
            raise ValueError(f"VAEConfig: unknown config keys {unknown}")
        return cls(**values)

    @property
    def dec_dim(self) -> int:
        """The decoder's base width: ``decoder_dim``, or ``dim`` when it is not set."""
        return self.dim if self.decoder_dim is None else self.decoder_dim

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        """Per decoder upsample stage: the encoder's temporal downsampling, mirrored."""
        return self.temperal_downsample[::-1]

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression factors: (4, 8, 8) for the real config."""
        spatial = 2 ** (len(self.dim_mult) - 1)
        return (2 ** sum(self.temperal_downsample), spatial, spatial)


@dataclass
class DecoderState:
    """Everything a streaming decode carries from one chunk to the next.

    ``conv_caches[i]`` holds the last ``CACHE_T`` (= 2) input frames of the decoder's i-th
    temporal convolution (``None`` before its first write, meaning zeros). ``latents_decoded``
    counts the latents decoded so far; while it is 0 the next chunk is the first one, whose
    latent 0 passes through the temporal upsamplers alone (1 frame instead of 4).
    ``batch_size`` and ``latent_hw`` are fixed by the first chunk and checked on later ones.
    """

    conv_caches: Caches
    latents_decoded: int = 0
    batch_size: int | None = None
    latent_hw: tuple[int, int] | None = None

    @property
    def first_chunk(self) -> bool:
        return self.latents_decoded == 0

    def nbytes(self) -> int:
        """Total bytes of the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.conv_caches if t is not None)


@dataclass
class EncoderState:
    """Everything a streaming encode carries between chunks (see :class:`DecoderState`).

    The first chunk holds ``1 + 4k`` frames and later chunks ``4k`` frames (k >= 1), so that each
    chunk ends on a latent boundary. ``frames_encoded`` counts pixel frames consumed so far.
    """

    conv_caches: Caches
    frames_encoded: int = 0
    batch_size: int | None = None
    pixel_hw: tuple[int, int] | None = None

    @property
    def first_chunk(self) -> bool:
        return self.frames_encoded == 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv_caches if t is not None)


class Encoder3d(nn.Module):
    """Video -> 2*z_dim channels (mean and log-variance) at 1/4 time and 1/8 space."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]  # real: [96, 96, 192, 384, 384]
        scale = 1.0
        # 1. stem
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        # 2. downsampling stages: residual blocks, then a (temporal) downsample except at the end
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        # 3. middle: residual, attention, residual
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1], cfg.dropout),
            AttentionBlock(dims[-1]),
            ResidualBlock(dims[-1], dims[-1], cfg.dropout),
        )
        # 4. head to mean + log-variance
        self.head = nn.Sequential(
            RMSNorm(dims[-1], video=True), nn.SiLU(), CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)
        )

    def forward(self, x: Tensor, caches: Caches | None = None, first_chunk: bool = True) -> Tensor:
        # [B, 3, T, H, W] -> [B, 2*z, T', H/8, W/8]
        x = self.conv1(x, caches)  # 1.
        x = run_causal(self.downsamples, x, caches, first_chunk)  # 2.
        x = run_causal(self.middle, x, caches, first_chunk)  # 3.
        return run_causal(self.head, x, caches, first_chunk)  # 4.


class Decoder3d(nn.Module):
    """z_dim latent channels -> video: 4x time (first latent -> 1 frame), 8x space."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mults = cfg.dim_mult
        dims = [cfg.dec_dim * m for m in (mults[-1], *mults[::-1])]  # real: [384, 384, 384, 192, 96]
        scale = 1.0 / 2 ** (len(mults) - 2)
        # 1. stem
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        # 2. middle: residual, attention, residual
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], cfg.dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], cfg.dropout),
        )
        # 3. upsampling stages; each upsample halves the width, so later stages start at dims[i]/2
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim = in_dim // 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mults) - 1:
                mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        # 4. head to RGB
        self.head = nn.Sequential(
            RMSNorm(dims[-1], video=True), nn.SiLU(), CausalConv3d(dims[-1], cfg.in_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, caches: Caches | None = None, first_chunk: bool = True) -> Tensor:
        # [B, z, n, h, w] -> [B, 3, 4n (- 3 on the first chunk), 8h, 8w]
        x = self.conv1(x, caches)  # 1.
        x = run_causal(self.middle, x, caches, first_chunk)  # 2.
        x = run_causal(self.upsamples, x, caches, first_chunk)  # 3.
        return run_causal(self.head, x, caches, first_chunk)  # 4.


class WanVAE(nn.Module):
    """The Wan2.1 VAE: deterministic causal encode, full and streaming causal decode."""

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else VAEConfig()
        self.config = cfg
        # 1. encoder, 2. posterior projection (mean | log-variance)
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        # 3. latent projection, 4. decoder
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.num_encoder_caches = assign_cache_slots(self.encoder)
        self.num_decoder_caches = assign_cache_slots(self.decoder)

    # ------------------------------------------------------------------ helpers

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def normalize(self, mu: Tensor) -> Tensor:
        """Raw posterior mean -> DiT latent: ``(mu - mean) / std`` per channel."""
        mean, std = self._latent_stats(mu)
        return ((mu.to(mean.dtype) - mean) / std).to(mu.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """DiT latent -> raw latent: ``z * std + mean`` per channel."""
        mean, std = self._latent_stats(z)
        return (z.to(mean.dtype) * std + mean).to(z.dtype)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # The constants are built from the config on use (not stored as buffers), so that casting
        # the module to bf16 never rounds them. -> 2 x [1, z, 1, 1, 1]
        dtype, shape = upcast_dtype(like.dtype), (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=dtype, device=like.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=dtype, device=like.device).view(shape)
        return mean, std

    def _check_video(self, video: Tensor, what: str) -> None:
        cfg = self.config
        _, sh, sw = cfg.stride
        if not isinstance(video, Tensor) or video.dim() != 5:
            raise VAEInputError(f"{what}: expected a video tensor [B, C, T, H, W], got {_describe(video)}")
        if not video.is_floating_point():
            raise VAEInputError(f"{what}: expected a floating-point video in [-1, 1], got {video.dtype}")
        b, c, t, h, w = video.shape
        if c != cfg.in_channels:
            raise VAEInputError(f"{what}: expected {cfg.in_channels} channels (dim 1), got {c} in {tuple(video.shape)}")
        if b == 0 or t == 0:
            raise VAEInputError(f"{what}: empty batch or time axis in {tuple(video.shape)}")
        if h == 0 or w == 0 or h % sh or w % sw:
            raise VAEInputError(f"{what}: H and W must be positive multiples of {sh} and {sw}, got {h}x{w}")

    def _check_latent(self, z: Tensor, what: str) -> None:
        if not isinstance(z, Tensor) or z.dim() != 5:
            raise VAEInputError(f"{what}: expected a latent tensor [B, z, n, h, w], got {_describe(z)}")
        if not z.is_floating_point():
            raise VAEInputError(f"{what}: expected a floating-point latent, got {z.dtype}")
        b, c, n, h, w = z.shape
        if c != self.config.z_dim:
            raise VAEInputError(
                f"{what}: expected {self.config.z_dim} latent channels (dim 1), got {c} in {tuple(z.shape)}"
            )
        if b == 0 or n == 0 or h == 0 or w == 0:
            raise VAEInputError(f"{what}: empty dimension in latent of shape {tuple(z.shape)}")

    # ------------------------------------------------------------------ encode

    def _encode(self, video: Tensor, caches: Caches | None, first_chunk: bool) -> Tensor:
        # [B, 3, T, H, W] -> normalized mean [B, z, T', H/8, W/8]
        x = self.encoder(video.to(self.dtype), caches, first_chunk)  # 1. [B, 2z, T', h, w]
        mu = self.conv1(x)[:, : self.config.z_dim]  # 2. keep the mean, drop the log-variance
        return self.normalize(mu)

    def encode(self, video: Tensor) -> Tensor:
        """Video ``[B, 3, 1+4k, H, W]`` in [-1, 1] -> normalized latent mean ``[B, z, 1+k, H/8, W/8]``."""
        self._check_video(video, "encode")
        st = self.config.stride[0]
        if (video.shape[2] - 1) % st:
            raise VAEInputError(f"encode: the frame count must be 1 + {st}k, got {video.shape[2]}")
        return self._encode(video, None, first_chunk=True)

    def init_encode_state(self) -> EncoderState:
        return EncoderState(conv_caches=[None] * self.num_encoder_caches)

    def encode_step(self, video_chunk: Tensor, state: EncoderState) -> Tensor:
        """Encode the next frames of a stream: first ``1 + 4k`` frames, then ``4k`` per chunk.

        Returns the normalized latents of the chunk (``1 + k``, then ``k``); the concatenation over
        chunks equals :meth:`encode` of the whole video. ``state`` is updated in place.
        """
        self._check_video(video_chunk, "encode_step")
        st = self.config.stride[0]
        b, _, t, h, w = video_chunk.shape
        if len(state.conv_caches) != self.num_encoder_caches:
            raise VAEInputError("encode_step: state was not made by this model's init_encode_state()")
        if state.first_chunk:
            if (t - 1) % st:
                raise VAEInputError(f"encode_step: the first chunk must hold 1 + {st}k frames, got {t}")
            state.batch_size, state.pixel_hw = b, (h, w)
        else:
            if t % st:
                raise VAEInputError(f"encode_step: later chunks must hold a multiple of {st} frames, got {t}")
            if (b, (h, w)) != (state.batch_size, state.pixel_hw):
                raise VAEInputError(
                    f"encode_step: chunk batch/size {b}, {h}x{w} differs from the stream's "
                    f"{state.batch_size}, {state.pixel_hw}"
                )
        z = self._encode(video_chunk, state.conv_caches, state.first_chunk)
        state.frames_encoded += t
        return z

    # ------------------------------------------------------------------ decode

    def _decode(self, z: Tensor, caches: Caches | None, first_chunk: bool, clamp: bool) -> Tensor:
        # normalized [B, z, n, h, w] -> [B, 3, 4n (- 3 on the first chunk), 8h, 8w]
        x = self.conv2(self.denormalize(z.to(self.dtype)))  # 3.
        x = self.decoder(x, caches, first_chunk)  # 4.
        return x.clamp(-1.0, 1.0) if clamp else x

    def decode(self, z: Tensor, clamp: bool = True) -> Tensor:
        """Normalized latents ``[B, z, n, h, w]`` -> video ``[B, 3, 1 + 4(n-1), 8h, 8w]``.

        One causal pass over all latents; latent 0 is the start of the video. Output is clamped
        to [-1, 1] unless ``clamp=False``.
        """
        self._check_latent(z, "decode")
        return self._decode(z, None, first_chunk=True, clamp=clamp)

    def init_decode_state(self) -> DecoderState:
        return DecoderState(conv_caches=[None] * self.num_decoder_caches)

    def decode_step(self, z_chunk: Tensor, state: DecoderState, clamp: bool = True) -> Tensor:
        """Decode the next ``n >= 1`` latents of a stream; ``state`` is updated in place.

        Returns ``1 + 4(n-1)`` frames for the first chunk (latent 0 gives 1 frame) and ``4n``
        frames after that. Concatenated over chunks, this equals :meth:`decode` of all latents.
        """
        self._check_latent(z_chunk, "decode_step")
        b, _, _, h, w = z_chunk.shape
        if len(state.conv_caches) != self.num_decoder_caches:
            raise VAEInputError("decode_step: state was not made by this model's init_decode_state()")
        if state.first_chunk:
            state.batch_size, state.latent_hw = b, (h, w)
        elif (b, (h, w)) != (state.batch_size, state.latent_hw):
            raise VAEInputError(
                f"decode_step: chunk batch/size {b}, {h}x{w} differs from the stream's "
                f"{state.batch_size}, {state.latent_hw}"
            )
        frames = self._decode(z_chunk, state.conv_caches, state.first_chunk, clamp)
        state.latents_decoded += z_chunk.shape[2]
        return frames


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    return f"an object of type {type(x).__name__}"
