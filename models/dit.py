"""Causal Wan2.2-S2V DiT (the Live Avatar generator): block-causal, KV-cached, with a rolling sink.

The network is Wan2.2-S2V-14B with its official state-dict key names and shapes (1260 keys,
16.296 B parameters at the default config). A stream is generated block by block
(3 latent frames each); per denoising stage:

    sink = SinkCache.allocate(...); kv = KVCache.allocate(...)
    text = model.embed_text(t5_context)                       # once per session
    model.prefill_sink(ref_latent, motion_latents, text, sink)  # once (again at re-anchoring)
    for each block:  v = model.forward_block(x, t, audio, text, kv, sink, frame_start,
                                             ref_time=model.sink_ref_time(frame_start, lead))

Token groups: noisy tokens (cond-mask id 0, absolute frame positions), ref tokens (id 1,
RoPE time `ref_rope_time`, rolled forward on each call) and FramePack motion tokens (id 2,
fixed negative times). The cond (ref + motion) tokens use the t = 0 modulation
(`zero_timestep`) and are run once, in `prefill_sink`; later calls only reuse their K/V.

Dtype policy (declared once, here)
    * Parameters and the residual stream between blocks use the construction `dtype`:
      float32 on CPU for tests (float64 for the tightest equivalence tests), bfloat16 on GPU.
    * "fp32" below means at least fp32 (`torch.promote_types(dtype, float32)`: a float64
      model stays float64). In fp32: the timestep path (`time_embedding`, `time_projection`;
      the sinusoid itself is float64), every modulation (`blocks.N.modulation`,
      `head.modulation`), LayerNorm/RMSNorm statistics, the residual updates inside a block
      (cast back to `dtype` at the block end, like the reference), the head (`head.head`),
      the audio AdaLN and layer mix, and the returned velocity.
    * float64: RoPE angles and rotation (models/rope.py).
    * Matmuls, convolutions and attention run in the parameter dtype.
    These layers cast at call time (`upcast(x) ... .type_as(x)`), so they work whatever dtype
    their weights are in.
    * FP32_MODULES lists the modules whose weights are stored in (at least) fp32. It is the one
      list both dtype casts read: `CausalWanS2V.cast` (construction, seeded weights) and the
      checkpoint loader (`_keep_in_fp32_modules`, read by `models.checkpoint.load_state_dict_strict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import (
    AttentionContext,
    CrossAttention,
    MaskedFull,
    SelfAttention,
    SinkPrefill,
    StreamingStep,
    upcast,
)
from models.audio_adapter import AudioInjector, CausalAudioEncoder
from models.checkpoint import keeps_fp32
from models.config import DiTConfig, ModelInputError
from models.kv_cache import KVCache, SinkCache
from models.motioner import FramePackMotioner, framepack_mode
from models.rope import RopeFactors, RopePositions, rope_factors

FP32_MODULES = ("time_embedding", "time_projection", "head", "blocks.*.modulation",
                "blocks.*.norm3", "audio_injector.injector_adain_layers")
NUM_TRAIN_TIMESTEPS = 1000


def sinusoidal_embedding(freq_dim: int, t: Tensor) -> Tensor:
    """[N] timesteps -> [N, freq_dim] float64 `[cos, sin]` with frequencies 10000^(-i/half)."""
    half = freq_dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _as_int(name: str, value: object, minimum: int | None = None) -> int:
    """An integer argument (Python or numpy int, not bool/float), else a named ModelInputError."""
    if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
        raise ModelInputError(f"{name} must be an int, got {value!r}")
    value = int(value)  # type: ignore[call-overload]
    if minimum is not None and value < minimum:
        raise ModelInputError(f"{name} must be >= {minimum}, got {value}")
    return value


def sink_ref_time(frame_start: int, lead: int, config: DiTConfig) -> int:
    """Rolling sink: ref RoPE time = R + max(0, f0 - R + lead), R = ref_rope_time (30).

    Once f0 >= R - lead the reference sits exactly `lead` latent frames ahead of the block.
    """
    frame_start = _as_int("frame_start", frame_start, minimum=0)
    lead = _as_int("sink lead", lead)
    if not config.sink_lead_min <= lead <= config.sink_lead_max:
        raise ModelInputError(f"sink lead must be an int in [{config.sink_lead_min}, "
                              f"{config.sink_lead_max}], got {lead!r}")
    r = config.ref_rope_time
    return r + max(0, frame_start - r + lead)


def draw_sink_lead(seed: int, frame_start: int, step: int, config: DiTConfig) -> int:
    """A reproducible lead in [sink_lead_min, sink_lead_max] for (seed, block, denoising step).

    The reference redraws it with unseeded Python `random` on every call; a pure function of
    (seed, frame_start, step) gives the same value in a sequential run and in every TPP stage.
    """
    values = [_as_int(name, v, minimum=0) for name, v in
              (("seed", seed), ("frame_start", frame_start), ("step", step))]
    rng = np.random.default_rng(values)
    return int(rng.integers(config.sink_lead_min, config.sink_lead_max + 1))


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32, weights cast at call time; returns that dtype."""

    def forward(self, x: Tensor) -> Tensor:
        x = upcast(x)
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """Linear in (at least) fp32 whatever the weight dtype."""
    x = upcast(x)
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


class WanAttentionBlock(nn.Module):
    """Transformer block: modulated self-attn, text cross-attn (no gate), modulated FFN."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        # 1. modulation [1, 6, dim]: shift, scale, gate (attn), shift, scale, gate (ffn)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        # 2. self-attention
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps, config.qk_norm)
        # 3. text cross-attention
        self.norm3 = (FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm
                      else nn.Identity())
        self.cross_attn = CrossAttention(dim, config.num_heads, eps, config.qk_norm)
        # 4. feed-forward
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))

    def forward(self, x: Tensor, e0: Tensor, text: Tensor, ctx: AttentionContext, layer: int) -> Tensor:
        """x [B, L, dim], e0 [B, 6, dim] fp32 (time_projection), text [B, Lt, dim] -> [B, L, dim]."""
        dtype = x.dtype
        h = upcast(x)                                                      # fp32 residual in-block
        mod = self.modulation.to(h.dtype) + e0.to(h.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)  # [B, 1, dim] each
        # 1. (modulation) -> 2. self-attention
        y = self.self_attn((self.norm1(h) * (1 + scale1) + shift1).to(dtype), ctx, layer)
        h = h + y.to(h.dtype) * gate1
        # 3. text cross-attention, no gate
        h = h + self.cross_attn(self.norm3(h).to(dtype), text).to(h.dtype)
        # 4. feed-forward
        y = self.ffn((self.norm2(h) * (1 + scale2) + shift2).to(dtype))
        h = h + y.to(h.dtype) * gate2
        return h.to(dtype)


class Head(nn.Module):
    """Final modulated LayerNorm + Linear(dim, out_dim * prod(patch)), in fp32."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, dim], e [B, dim] fp32 time embedding -> [B, L, out_dim * prod(patch)] fp32."""
        shift, scale = (self.modulation.to(e.dtype) + e[:, None]).chunk(2, dim=1)   # [B, 1, dim] each
        return _linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)


class CausalWanS2V(nn.Module):
    """Wan2.2-S2V-14B made block-causal (Live Avatar). Construct with `device="meta"` for
    parameter/key/shape checks of the real size; weights come from the checkpoint loader."""

    #: read by `models.checkpoint.load_state_dict_strict` when it casts a checkpoint on load
    _keep_in_fp32_modules = FP32_MODULES

    def __init__(self, config: DiTConfig | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        cfg = self.config = config if config is not None else DiTConfig()
        dim, patch = cfg.dim, cfg.patch_size
        with torch.device(device) if device is not None else nullcontext():
            # 1. latent patchifiers: noisy latents, pose latents (added), cond-type embedding
            self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, patch, stride=patch)
            self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, patch, stride=patch)
            self.trainable_cond_mask = nn.Embedding(3, dim)       # 0 noisy, 1 ref, 2 motion
            # 2. text embedding
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                                nn.Linear(dim, dim))
            # 3. timestep embedding and the 6-way block modulation
            self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            # 4. audio adapter (official spelling "casual") and FramePack motioner
            self.casual_audio_encoder = CausalAudioEncoder(cfg)
            self.frame_packer = FramePackMotioner(cfg)
            # 5. transformer blocks and the audio injector that runs after some of them
            self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
            self.audio_injector = AudioInjector(cfg)
            # 6. output head
            self.head = Head(cfg)
        self.cast(dtype)
        # Steps 5-6 of forward_block run through this when set (torch.compile / CUDA graphs,
        # models/accel.py); None = eager `_core`. Same arguments as `_core`.
        self.core_runner = None

    # ---- helpers ----------------------------------------------------------------------
    def cast(self, dtype: torch.dtype) -> CausalWanS2V:
        """Cast to `dtype` per the dtype policy: FP32_MODULES to at least fp32, the rest to `dtype`.
        (A plain `.to(dtype)` casts everything.)"""
        keep = torch.promote_types(dtype, torch.float32)
        self.to(dtype)
        for name, p in self.named_parameters():
            if keeps_fp32(name, FP32_MODULES) and p.is_floating_point():
                p.data = p.data.to(keep)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype (that of the matmul weights; FP32_MODULES may be wider)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def sink_ref_time(self, frame_start: int, lead: int) -> int:
        """See module function `sink_ref_time`."""
        return sink_ref_time(frame_start, lead, self.config)

    def _rope(self, pos: RopePositions) -> RopeFactors:
        cfg = self.config
        return rope_factors(pos.to(self.device), cfg.head_dim, cfg.rope_theta, cfg.rope_fp16_factors)

    def _noisy_positions(self, frame_start: int, frames: int, grid: tuple[int, int]) -> RopePositions:
        return RopePositions.grid(torch.arange(frame_start, frame_start + frames),
                                  torch.arange(grid[0]), torch.arange(grid[1]))

    def time_modulation(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B] -> time embedding e [B, dim] and block modulation e0 [B, 6, dim], both fp32."""
        sin = sinusoidal_embedding(self.config.freq_dim, t).to(torch.promote_types(self.dtype, torch.float32))
        e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], sin)))
        e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def _embed_noisy(self, x: Tensor, pose: Tensor | None) -> Tensor:
        """x [B, C, F, h, w] (+ pose [B, cond_dim, F, h, w]) -> tokens [B, F*h'*w', dim]."""
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight)).flatten(2).transpose(1, 2)
        if pose is None:   # zero pose latents: the conv reduces to its bias
            tokens = tokens + self.cond_encoder.bias
        else:
            if pose.shape[0] != x.shape[0] or pose.shape[1] != self.config.cond_dim or pose.shape[2:] != x.shape[2:]:
                raise ModelInputError(f"pose latents must be [B, {self.config.cond_dim}, "
                                      f"{', '.join(map(str, x.shape[2:]))}], got {tuple(pose.shape)}")
            tokens = tokens + self.cond_encoder(pose.to(self.cond_encoder.weight)).flatten(2).transpose(1, 2)
        return tokens + self.trainable_cond_mask.weight[0]

    def _run_blocks(self, x: Tensor, e0: Tensor, text: Tensor, ctx: AttentionContext,
                    audio: tuple[Tensor, Tensor] | None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, e0, text, ctx, i)
            if audio is not None and i in self.audio_injector.block_to_injector:
                x = self.audio_injector(i, x, *audio)
        return x

    def unpatchify(self, out: Tensor, frames: int, grid: tuple[int, int]) -> Tensor:
        """[B, F*h'*w', pt*ph*pw*C] -> [B, C, F*pt, h'*ph, w'*pw] (layout 'fhwpqrc->cfphqwr')."""
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        out = out.reshape(out.shape[0], frames, grid[0], grid[1], pt, ph, pw, c)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(out.shape[0], c, frames * pt, grid[0] * ph, grid[1] * pw)

    # ---- input checks -------------------------------------------------------------
    def _check_latent(self, x: Tensor, name: str, channels: int) -> tuple[int, int, int, int, int]:
        if not isinstance(x, Tensor) or x.ndim != 5 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ModelInputError(f"{name} must be a [B, {channels}, F, h, w] tensor, got {shape}")
        self.config.check_latent_hw(tuple(x.shape[3:]))
        return tuple(x.shape)  # type: ignore[return-value]

    def _check_t(self, t: Tensor | float, batch: int) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ModelInputError(f"t must be a scalar or [B={batch}] tensor, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all() or (t < 0).any() or (t > NUM_TRAIN_TIMESTEPS).any():
            raise ModelInputError(f"timesteps must be finite and in [0, {NUM_TRAIN_TIMESTEPS}], got {t.tolist()}")
        return t

    def _check_text(self, text_emb: Tensor, batch: int) -> None:
        want = (batch, self.config.text_len, self.config.dim)
        if not isinstance(text_emb, Tensor) or tuple(text_emb.shape) != want:
            got = tuple(text_emb.shape) if isinstance(text_emb, Tensor) else type(text_emb).__name__
            raise ModelInputError(f"text_emb must be embed_text() output {list(want)}, got {got}")

    def _check_sink(self, sink: SinkCache, batch: int, grid_tokens: int) -> None:
        if sink.prefill_count == 0:
            raise ModelInputError("the sink cache is empty: call prefill_sink() first")
        if sink.k[0].shape[0] != batch or len(sink.k) != self.config.num_layers:
            raise ModelInputError(f"sink cache holds batch {sink.k[0].shape[0]} x {len(sink.k)} layers, "
                                  f"input has batch {batch} and the model {self.config.num_layers} layers")
        if sink.num_ref_tokens != grid_tokens:
            raise ModelInputError(f"sink cache was allocated for {sink.num_ref_tokens} tokens per frame, "
                                  f"the input latent has {grid_tokens}")

    def _check_audio(self, audio: Tensor, batch: int, frames: int) -> None:
        cfg = self.config
        want = (batch, cfg.num_audio_layers, cfg.audio_dim, cfg.vae_temporal_stride * frames)
        if not isinstance(audio, Tensor) or tuple(audio.shape) != want:
            got = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
            raise ModelInputError(f"audio must be [B, layers, audio_dim, video frames] = {list(want)}, got {got}")

    def _check_block_inputs(self, x: Tensor, t: Tensor | float, audio: Tensor, text_emb: Tensor, kv: KVCache,
                            sink: SinkCache, frame_start: int, ref_time: int
                            ) -> tuple[Tensor, int, tuple[int, int], int, int]:
        """Every input check of `forward_block`, each failing with a ModelInputError that names the input.

        Returns t [B] (float64), the latent frame count F, the token grid (h', w'), frame_start and ref_time.
        """
        cfg = self.config
        b, _, f, h, w = self._check_latent(x, "x", cfg.in_dim)
        grid = (h // cfg.patch_size[1], w // cfg.patch_size[2])
        t = self._check_t(t, b)
        self._check_audio(audio, b, f)
        self._check_text(text_emb, b)
        self._check_sink(sink, b, grid[0] * grid[1])
        frame_start = _as_int("frame_start", frame_start, minimum=0)
        ref_time = _as_int("ref_time", ref_time)
        if kv.frame_seq_len != grid[0] * grid[1] or kv.k[0].shape[0] != b or len(kv.k) != cfg.num_layers:
            raise ModelInputError(f"KV cache (batch {kv.k[0].shape[0]}, {kv.frame_seq_len} tokens/frame) "
                                  f"does not match the input (batch {b}, {grid[0] * grid[1]} tokens/frame)")
        return t, f, grid, frame_start, ref_time

    # ---- public API ---------------------------------------------------------------
    def embed_text(self, context: Tensor) -> Tensor:
        """umT5 context [B, Lt <= text_len, text_dim] -> zero pad to text_len -> [B, text_len, dim].

        Every text token, padding included, is attended to by cross-attention (no mask)."""
        cfg = self.config
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[2] != cfg.text_dim \
                or not 0 < context.shape[1] <= cfg.text_len:
            got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ModelInputError(f"text context must be [B, 1..{cfg.text_len}, {cfg.text_dim}], got {got}")
        pad = cfg.text_len - context.shape[1]
        context = F.pad(context.to(device=self.device, dtype=self.dtype), (0, 0, 0, pad))
        return self.text_embedding(context)                                # [B, text_len, dim]

    def prefill_sink(self, ref_latent: Tensor, motion_latents: Tensor, text_emb: Tensor,
                     sink: SinkCache) -> None:
        """Run the cond tokens [ref | FramePack motion] through all blocks at t = 0, cond-only
        attention, writing each layer's un-roped K and V into `sink`. No audio, no head.

        ref_latent [B, C, 1, h, w]; motion_latents [B, C, Fm <= 19, h, w] (most recent last).
        Call again with a new ref latent to re-anchor the sink.
        """
        cfg = self.config
        b, _, fr, h, w = self._check_latent(ref_latent, "ref_latent", cfg.in_dim)
        if fr != 1:
            raise ModelInputError(f"ref_latent must hold exactly 1 latent frame, got {fr}")
        mb, _, _, mh, mw = self._check_latent(motion_latents, "motion_latents", cfg.in_dim)
        if (mb, mh, mw) != (b, h, w):
            raise ModelInputError(f"motion_latents {tuple(motion_latents.shape)} do not match "
                                  f"ref_latent {tuple(ref_latent.shape)} in batch or grid")
        self._check_text(text_emb, b)
        # 1. cond tokens with their cond-type embedding                      # [B, S_sink, dim]
        ref = self.patch_embedding(ref_latent.to(self.patch_embedding.weight)).flatten(2).transpose(1, 2)
        ref = ref + self.trainable_cond_mask.weight[1]
        motion = self.frame_packer(motion_latents, framepack_mode(cfg))
        motion = motion + self.trainable_cond_mask.weight[2]
        x = torch.cat([ref, motion], dim=1)
        if x.shape[1] != sink.num_tokens or ref.shape[1] != sink.num_ref_tokens or sink.k[0].shape[0] != b:
            raise ModelInputError(f"sink cache was allocated for batch {sink.k[0].shape[0]} and "
                                  f"{sink.num_tokens} tokens; these latents give batch {b} and {x.shape[1]}")
        # 2. t = 0 modulation (zero_timestep)
        _, e0 = self.time_modulation(torch.zeros(b, dtype=torch.float64, device=self.device))
        # 3. blocks with cond-only attention, writing the sink
        ctx = SinkPrefill(sink, self._rope(sink.positions))
        self._run_blocks(x, e0, text_emb, ctx, audio=None)
        sink.prefill_count += 1

    def forward_block(self, x: Tensor, t: Tensor | float, audio: Tensor, text_emb: Tensor,
                      kv: KVCache, sink: SinkCache, frame_start: int, ref_time: int,
                      pose: Tensor | None = None, use_sink: bool = True) -> Tensor:
        """Velocity of one streaming block.

        x [B, C, F, h, w] noisy latents of absolute latent frames [frame_start, frame_start+F);
        t [B] timesteps in [0, 1000]; audio [B, num_audio_layers, audio_dim, 4F] wav2vec2
        features of the block; ref_time = RoPE time of the ref group (see `sink_ref_time`);
        use_sink=False attends to the ring only (the "no sink" ablation; the sink is not read).
        Writes the block's roped K/V into `kv`; the block attends to itself (bidirectional),
        the earlier frames held by `kv`, and the whole sink. Returns [B, out_dim, F, h, w] in fp32.
        """
        t, f, grid, frame_start, ref_time = self._check_block_inputs(x, t, audio, text_emb, kv, sink,
                                                                     frame_start, ref_time)
        # 1. noisy tokens (+ pose bias, + cond-type 0)                        # [B, F*h'*w', dim]
        tokens = self._embed_noisy(x, pose)
        # 2. audio tokens of the block                                        # [B, F, 5|1, dim]
        audio_tokens = self.casual_audio_encoder(audio.to(device=self.device))
        # 3. timestep modulation
        e, e0 = self.time_modulation(t)
        # 4. RoPE factors and the ring window (advances the cache state)
        rope = self._rope(self._noisy_positions(frame_start, f, grid))
        window = kv.advance(frame_start, f)
        ctx = StreamingStep(kv, window, sink, rope, self._rope(sink.positions_at(ref_time)), use_sink)
        # 5. blocks with audio injection, 6. head and unpatchify
        core = self._core if self.core_runner is None else self.core_runner
        return core(tokens, e, e0, text_emb, ctx, audio_tokens, f, grid)

    def _core(self, tokens: Tensor, e: Tensor, e0: Tensor, text_emb: Tensor, ctx: AttentionContext,
              audio_tokens: tuple[Tensor, Tensor] | None, frames: int, grid: tuple[int, int]) -> Tensor:
        """Steps 5-6 of forward_block: blocks (+ audio injection), head, unpatchify. Every tensor
        argument has a fixed shape for a given latent grid; `ctx` holds the caches and positions."""
        tokens = self._run_blocks(tokens, e0, text_emb, ctx, audio_tokens)
        return self.unpatchify(self.head(tokens, e), frames, grid)

    forward = forward_block

    def forward_full(self, x: Tensor, t: Tensor | float, audio: Tensor, text_emb: Tensor,
                     sink: SinkCache, ref_time: int | Sequence[int], frame_start: int = 0,
                     window_frames: int | None = None, pose: Tensor | None = None,
                     causal: bool = True) -> Tensor:
        """Block-causal forward over a whole sequence with an explicit mask (test reference, training).

        x [B, C, F_total, h, w] with F_total a multiple of frames_per_block; its blocks are
        [frame_start + k*3, frame_start + (k+1)*3). A noisy query sees noisy keys up to the end
        of its own block (and, with `window_frames`, only the last `window_frames` frames of
        that range, which is what a ring buffer of that length holds), plus all sink keys
        rotated with its block's ref time (`ref_time`: one int, or one per block).
        Audio is encoded per block, like at inference. ``causal=False`` lets every noisy query see
        every noisy key (the bidirectional teacher of training). Returns [B, out_dim, F_total, h, w] fp32.
        """
        cfg = self.config
        b, _, f, h, w = self._check_latent(x, "x", cfg.in_dim)
        grid = (h // cfg.patch_size[1], w // cfg.patch_size[2])
        fpb, fsl = cfg.frames_per_block, grid[0] * grid[1]
        if f % fpb:
            raise ModelInputError(f"forward_full needs a multiple of {fpb} latent frames, got {f}")
        n_blocks = f // fpb
        ref_times = [ref_time] * n_blocks if not isinstance(ref_time, Sequence) else list(ref_time)
        if len(ref_times) != n_blocks:
            raise ModelInputError(f"ref_time must be an int or {n_blocks} ints, got {ref_time!r}")
        ref_times = [_as_int("ref_time", r) for r in ref_times]
        frame_start = _as_int("frame_start", frame_start, minimum=0)
        if window_frames is not None and _as_int("window_frames", window_frames) < fpb:
            raise ModelInputError(f"window_frames must be >= {fpb} (or None), got {window_frames}")
        t = self._check_t(t, b)
        self._check_audio(audio, b, f)
        self._check_text(text_emb, b)
        self._check_sink(sink, b, fsl)
        # 1. noisy tokens, 2. audio tokens (per block), 3. modulation
        tokens = self._embed_noisy(x, pose)
        audio_tokens = self.casual_audio_encoder(audio.to(device=self.device), frames_per_chunk=fpb)
        e, e0 = self.time_modulation(t)
        # 4. RoPE factors and the mask over [noisy | sink @ each distinct ref time]
        distinct = sorted(set(ref_times))
        frame = torch.arange(f, device=self.device).repeat_interleave(fsl)     # [L] relative frame
        block_end = (frame // fpb + 1) * fpb                                     # [L] per query
        mask = frame[None, :] < block_end[:, None]                               # [L, L]
        if not causal:
            mask = torch.ones_like(mask)
        if window_frames is not None:
            mask &= frame[None, :] >= block_end[:, None] - window_frames
        group = torch.tensor([distinct.index(r) for r in ref_times], device=self.device)[frame // fpb]
        sink_masks = [(group == g)[:, None].expand(-1, sink.num_tokens) for g in range(len(distinct))]
        ctx = MaskedFull(sink, self._rope(self._noisy_positions(frame_start, f, grid)),
                         [self._rope(sink.positions_at(r)) for r in distinct],
                         torch.cat([mask, *sink_masks], dim=1))
        # 5. blocks with audio injection, 6. head and unpatchify
        tokens = self._run_blocks(tokens, e0, text_emb, ctx, audio_tokens)
        return self.unpatchify(self.head(tokens, e), f, grid)
