"""Audio adapter of the causal Wan2.2-S2V DiT: per-latent-frame audio tokens and their injection.

`CausalAudioEncoder` (state-dict prefix `casual_audio_encoder.`, the official spelling)
    wav2vec2 features of one block `[B, 25, 1024, 4F]` (one vector per video frame) ->
      1. weighted layer mix: w = SiLU(weights) [1, 25, 1, 1] (init 0.01), sum(w f) / sum(w)
      2. left pad with `motion_frames` (73) replicas of the block's first frame: 73 + 4F frames
      3. MotionEncoder_tc causal convs (replicate left pad k-1; strides 1, 2, 2):
         local branch -> `num_audio_token` (4) tokens + 1 learned padding token = 5 tokens,
         global branch -> final_linear -> 1 global vector (drives the AdaLN)
      4. drop the outputs that belong to the pad (ceil(73 / 4) = 19), keep F latent frames
    Blocks are encoded independently (no cross-block audio context), as at reference inference.

`AudioInjector` (keys `audio_injector.injector.N.*`, `audio_injector.injector_adain_layers.N.*`)
    After the DiT blocks listed in `audio_inject_layers`: for each latent frame, the frame's
    tokens go through AdaLN (LayerNorm eps 1e-5, no affine; `shift, scale = Linear(SiLU(g))`,
    SHIFT FIRST) and cross-attend to that frame's 5 audio tokens; the result is added back as
    a residual with no gate. Audio never enters self-attention or the KV cache.

Dtype: convs/linears run in the parameter dtype; LayerNorms and the AdaLN modulation in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import CrossAttention, upcast
from models.config import DiTConfig, ModelInputError


def _layer_norm_fp32(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim without affine, computed in (at least) fp32."""
    return F.layer_norm(upcast(x), (x.shape[-1],), eps=eps).type_as(x)


class CausalConv1d(nn.Module):
    """Conv1d that only looks back: replicate left pad of (kernel - 1), then a strided conv."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, T] -> [B, C_out, ceil(T / stride)] (for kernel 3)."""
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class MotionEncoderTC(nn.Module):
    """Causal temporal conv encoder (the reference's MotionEncoder_tc), keys `encoder.*`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        n, dim = config.num_audio_token, config.dim
        head = dim // n
        self.num_tokens = n
        self.eps = config.eps
        # 1. local branch: one conv producing n token "heads" of dim/n channels
        self.conv1_local = CausalConv1d(config.audio_dim, head * n, 3, stride=1)
        # 2. global branch: one head-wide conv
        self.conv1_global = CausalConv1d(config.audio_dim, head, 3, stride=1)
        # 3. shared downsampling convs (time / 4 overall)
        self.conv2 = CausalConv1d(head, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        # 4. global projection and the learned padding token
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _trunk(self, x: Tensor) -> Tensor:
        """[N, T, dim/n] -> [N, T', dim]: norm/SiLU, then the two strided convs (norm/SiLU each)."""
        x = F.silu(_layer_norm_fp32(x, self.eps)).transpose(1, 2)            # [N, C, T]
        x = F.silu(_layer_norm_fp32(self.conv2(x).transpose(1, 2), self.eps))  # [N, T/2, dim/2]
        x = F.silu(_layer_norm_fp32(self.conv3(x.transpose(1, 2)).transpose(1, 2), self.eps))
        return x                                                              # [N, T/4, dim]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, audio_dim] -> local [B, T', n+1, dim], global [B, T', 1, dim]."""
        b = x.shape[0]
        x = x.transpose(1, 2)                                                 # [B, C, T]
        # 1. local tokens: split channels into n heads, each through the shared trunk
        loc = self.conv1_local(x)                                             # [B, n*c, T]
        loc = loc.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)           # [B*n, c, T]
        loc = self._trunk(loc.transpose(1, 2))                                # [B*n, T', dim]
        loc = loc.unflatten(0, (b, self.num_tokens)).transpose(1, 2)          # [B, T', n, dim]
        pad = self.padding_tokens.to(loc.dtype).expand(b, loc.shape[1], 1, -1)
        loc = torch.cat([loc, pad], dim=2)                                    # [B, T', n+1, dim]
        # 2. global vector
        glob = self._trunk(self.conv1_global(x).transpose(1, 2))              # [B, T', dim]
        glob = self.final_linear(glob).unsqueeze(2)                           # [B, T', 1, dim]
        return loc, glob


class CausalAudioEncoder(nn.Module):
    """wav2vec2 layer mix + causal conv encoder -> per-latent-frame audio tokens."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        # 1. layer weights (SiLU-activated, normalised to sum 1 at use)
        self.weights = nn.Parameter(torch.full((1, config.num_audio_layers, 1, 1), 0.01))
        # 2. the conv encoder
        self.encoder = MotionEncoderTC(config)

    def forward(self, audio: Tensor, frames_per_chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """audio [B, L, audio_dim, T_video] -> tokens [B, F, n+1, dim], global [B, F, 1, dim].

        T_video = vae_temporal_stride * F. With `frames_per_chunk`, the video axis is cut into
        chunks of that many latent frames (blocks) that are encoded independently.
        """
        cfg = self.config
        s = cfg.vae_temporal_stride
        if audio.ndim != 4 or audio.shape[1] != cfg.num_audio_layers or audio.shape[2] != cfg.audio_dim:
            raise ModelInputError(f"audio features must be [B, {cfg.num_audio_layers}, {cfg.audio_dim}, "
                                  f"T_video], got {tuple(audio.shape)}")
        b, _, _, t_video = audio.shape
        if t_video == 0 or t_video % s:
            raise ModelInputError(f"audio has {t_video} video frames; need a positive multiple of "
                                  f"{s} (one latent frame = {s} video frames)")
        frames = t_video // s
        chunk = frames if frames_per_chunk is None else frames_per_chunk
        if chunk < 1 or frames % chunk:
            raise ModelInputError(f"{frames} latent frames of audio do not split into chunks of {chunk}")
        n_chunks = frames // chunk
        # 1. weighted mix of the wav2vec2 layers                               # [B, C, T_video]
        w = F.silu(upcast(self.weights))
        mixed = ((audio.to(w.dtype) * w).sum(dim=1) / w.sum(dim=1)).to(self.weights.dtype)
        # 2. one row per chunk, left-padded with replicas of its first frame  # [B*n, C, 73+T_c]
        mixed = mixed.unflatten(2, (n_chunks, chunk * s)).permute(0, 2, 1, 3).flatten(0, 1)
        mixed = torch.cat([mixed[:, :, :1].expand(-1, -1, cfg.motion_frames), mixed], dim=2)
        # 3. encode                                                          # [B*n, T', 5, dim]
        loc, glob = self.encoder(mixed.transpose(1, 2))
        # 4. drop the outputs of the pad (19 for 73 frames), keep `chunk` frames per row
        drop = loc.shape[1] - chunk
        if drop != -(-cfg.motion_frames // s):
            raise ModelInputError(f"audio encoder produced {loc.shape[1]} frames for {chunk} "
                                  f"latent frames; expected {chunk} + ceil({cfg.motion_frames}/{s})")
        loc, glob = loc[:, drop:], glob[:, drop:]
        return loc.unflatten(0, (b, n_chunks)).flatten(1, 2), glob.unflatten(0, (b, n_chunks)).flatten(1, 2)


class AdaLayerNorm(nn.Module):
    """LayerNorm(eps, no affine) * (1 + scale) + shift with `shift, scale = Linear(SiLU(emb))`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [N, L, dim], emb [N, dim] -> [N, L, dim]."""
        g = F.silu(upcast(emb))                                    # fp32, the weights cast at call time
        mod = F.linear(g, self.linear.weight.to(g.dtype), self.linear.bias.to(g.dtype))
        shift, scale = mod.chunk(2, dim=-1)                                 # SHIFT first
        y = F.layer_norm(upcast(x), (x.shape[-1],), eps=self.eps).to(shift.dtype)
        return (y * (1 + scale[:, None]) + shift[:, None]).type_as(x)


class AudioInjector(nn.Module):
    """Per-frame audio cross-attention after selected DiT blocks (residual, no gate)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        n = len(config.audio_inject_layers)
        # 1. one cross-attention per injected block
        self.injector = nn.ModuleList([CrossAttention(config.dim, config.num_heads, config.eps,
                                                      config.qk_norm) for _ in range(n)])
        # 2. one AdaLN per injected block, driven by the global audio vector
        self.injector_adain_layers = nn.ModuleList([AdaLayerNorm(config.dim, config.audio_norm_eps)
                                                    for _ in range(n)])
        self.block_to_injector = {blk: i for i, blk in enumerate(config.audio_inject_layers)}

    def forward(self, block_index: int, x: Tensor, tokens: Tensor, glob: Tensor) -> Tensor:
        """x [B, F*n, dim] (frame-major noisy tokens), tokens [B, F, 5, dim], glob [B, F, 1, dim]."""
        i = self.block_to_injector[block_index]
        b, frames = tokens.shape[:2]
        # 1. one row per latent frame                                        # [B*F, n, dim]
        rows = x.reshape(b * frames, -1, x.shape[-1])
        # 2. AdaLN from the frame's global audio vector
        h = self.injector_adain_layers[i](rows, glob.flatten(0, 1)[:, 0].to(x.dtype))
        # 3. cross-attention to the frame's audio tokens, residual without gate
        out = self.injector[i](h, tokens.flatten(0, 1).to(x.dtype))         # [B*F, n, dim]
        return x + out.reshape(x.shape)
