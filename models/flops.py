"""FLOP accounting of the Live Avatar networks and the physical real-time bound on a GPU.

Two independent ways to count, which the tests hold against each other and against the
reference notes (§9 of reference/liveavatar-method.md):

* **Counted** (`count_flops_meta`, `count_vae_decode_flops_meta`): build the network on the
  ``meta`` device (no memory, no compute) and run one real forward under
  ``torch.utils.flop_counter.FlopCounterMode``, which reads the FLOPs of every matmul,
  convolution and attention op from its shapes. This counts exactly what the code runs.
* **Analytic** (`analytic_flops`, `analytic_vae_decode_flops`): the closed form, written from the
  architecture description and the config alone.

Counting rule: FLOPs = 2 x multiply-accumulates (MACs). Only matmuls, convolutions and attention
(QK^T and PV) are counted; norms, activations, RoPE and other elementwise ops are not (they are a
fraction of a percent here and memory-bound anyway). Categories:

* ``linear``    every ``nn.Linear`` / ``F.linear`` (aten ``mm``/``addmm``);
* ``attention`` the two attention matmuls, QK^T and PV (``bmm`` or a fused SDPA op);
* ``conv``      convolutions (patch embedding, FramePack, audio convs, the VAE);
* ``other``     anything else the counter reports (nothing, for these networks).

Geometry of one denoising step of a streaming block (384x704, latent 48x88, patch 2x2):
N = 3 frames x 1056 tokens = 3168 queries; the self-attention keys are the KV ring plus the sink:
L = 12 x 1056 + 2640 = 15,312 at steady state (the ring is full, 4 blocks) and
3 x 1056 + 2640 = 5,808 for the first block of a stream (the ring holds only the block itself).

Meta-device caveat: ``CausalWanS2V._check_t`` validates the timestep with ``.all()``/``.any()``
on a tensor on the model's device, a data-dependent op that the meta device cannot run. The
counter therefore swaps that one check, on its own private meta instance only, for the same
validation done on the host (see `_meta_dit`). Nothing else in the model needs changing.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.config import DiTConfig, ModelInputError
from models.motioner import COMPRESSIONS, framepack_bucket_shapes, framepack_token_count

# ---------------------------------------------------------------------------------------------
# Device specifications (one place; every number has its source)
# ---------------------------------------------------------------------------------------------

#: Dense peaks (no 2:4 sparsity) of the GPUs the bound is computed for.
DEVICE_SPECS: dict[str, dict[str, object]] = {
    "h100-sxm": {
        "name": "NVIDIA H100 SXM5 80 GB",
        "bf16_tflops": 989.0,     # dense BF16 tensor core (the datasheet's 1,979 is with sparsity)
        "fp8_tflops": 1979.0,     # dense FP8 tensor core (3,958 with sparsity)
        "hbm_tb_s": 3.35,         # HBM3 bandwidth
        "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column (dense = half the sparse figure)",
    },
    "h800-sxm": {
        "name": "NVIDIA H800 SXM5 80 GB",
        "bf16_tflops": 989.0,     # same SMs and clocks as the H100 SXM5 (export variant, less NVLink)
        "fp8_tflops": 1979.0,
        "hbm_tb_s": 3.35,
        "source": "same compute and memory as H100 SXM5 (reference notes §9; NVLink cut to 400 GB/s)",
    },
    "h200-sxm": {
        "name": "NVIDIA H200 SXM 141 GB",
        "bf16_tflops": 989.0,
        "fp8_tflops": 1979.0,
        "hbm_tb_s": 4.8,          # HBM3e
        "source": "NVIDIA H200 Tensor Core GPU datasheet, SXM column (dense = half the sparse figure)",
    },
}

#: The reference's throughput claims (reference notes §4.6, §7): 5 x H800, TPP.
CLAIMED_FPS = {"v4_fp8_compile": 45.0, "v1": 20.0}

CATEGORIES = ("linear", "attention", "conv", "other")


class FlopsError(ValueError):
    """A FLOP-accounting argument (resolution, device name, config) is invalid."""


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs (2 x MACs) split by kind of op. Plain ints: exact and JSON-friendly."""

    linear: int = 0
    attention: int = 0
    conv: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.conv + self.other

    def __add__(self, o: FlopBreakdown) -> FlopBreakdown:
        return FlopBreakdown(self.linear + o.linear, self.attention + o.attention, self.conv + o.conv,
                             self.other + o.other)

    def scaled(self, k: int) -> FlopBreakdown:
        return FlopBreakdown(self.linear * k, self.attention * k, self.conv * k, self.other * k)

    def as_dict(self) -> dict[str, int]:
        return {"linear": self.linear, "attention": self.attention, "conv": self.conv, "other": self.other,
                "total": self.total}


# ---------------------------------------------------------------------------------------------
# Counting under FlopCounterMode
# ---------------------------------------------------------------------------------------------

_LINEAR_OPS = {"mm", "addmm", "matmul", "linear", "_scaled_mm"}
_ATTENTION_OPS = {"bmm", "baddbmm", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                  "_efficient_attention_forward", "_flex_attention"}
_CONV_OPS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d", "cudnn_convolution"}


def _op_name(op: object) -> str:
    """'aten.addmm.default' / OpOverloadPacket 'aten.addmm' -> 'addmm'."""
    name = str(op)
    if name.startswith("aten."):
        name = name[len("aten."):]
    return name.split(".")[0]


def breakdown_from_counts(counts: Mapping[object, int]) -> FlopBreakdown:
    """FlopCounterMode's global {op: flops} -> FlopBreakdown.

    Batched matmuls are attention here: every ``nn.Linear`` of these networks lowers to
    ``mm``/``addmm``, and ``bmm`` only comes from scaled-dot-product attention (decomposed on the
    meta device). The tests check the split against the closed form, so a change shows up.
    """
    acc = dict.fromkeys(CATEGORIES, 0)
    for op, flops in counts.items():
        name = _op_name(op)
        if name in _LINEAR_OPS:
            acc["linear"] += int(flops)
        elif name in _ATTENTION_OPS:
            acc["attention"] += int(flops)
        elif name in _CONV_OPS:
            acc["conv"] += int(flops)
        else:
            acc["other"] += int(flops)
    return FlopBreakdown(**acc)


def count_flops(fn: Callable[[], object]) -> FlopBreakdown:
    """Run ``fn()`` under FlopCounterMode and return its FLOPs by category."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return breakdown_from_counts(counter.get_flop_counts().get("Global", {}))


def _check_t_on_host(self, t, batch: int) -> torch.Tensor:
    """Same validation as CausalWanS2V._check_t, done on the CPU, result moved to the device."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.device.type == "meta":
        raise ModelInputError("pass the timestep as a Python number or CPU tensor when counting on meta")
    t = t.cpu()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ModelInputError(f"t must be a scalar or [B={batch}] tensor, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1000).any():
        raise ModelInputError(f"timesteps must be finite and in [0, 1000], got {t.tolist()}")
    return t.to(self.device)


def _meta_dit(config: DiTConfig, dtype: torch.dtype = torch.bfloat16):
    """A CausalWanS2V on the meta device whose timestep check runs on the host (see module doc)."""
    from models.dit import CausalWanS2V

    model = CausalWanS2V(config, dtype=dtype, device="meta")
    model._check_t = types.MethodType(_check_t_on_host, model)
    return model


def _check_grid(config: DiTConfig, latent_hw) -> tuple[int, int]:
    try:
        return config.check_latent_hw(tuple(latent_hw))
    except (TypeError, ValueError) as exc:
        raise FlopsError(f"bad latent grid {latent_hw!r}: {exc}") from exc


def count_dit_flops_meta(config: DiTConfig, latent_hw: tuple[int, int], batch: int = 1,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, object]:
    """Count one model build's sink prefill, first-block step and steady-state step on meta.

    Returns ``{"sink_prefill", "first_block", "steady_state"}`` (FlopBreakdown each), the model's
    ``parameters`` and ``state_dict_keys``, and the geometry (``tokens_per_block``, ``sink_tokens``,
    ``keys_first_block``, ``keys_steady_state``).
    """
    from models.kv_cache import KVCache, SinkCache

    h, w = _check_grid(config, latent_hw)
    model = _meta_dit(config, dtype)
    dev = torch.device("meta")
    fpb = config.frames_per_block
    sink = SinkCache.allocate(config, batch, (h, w), device=dev, dtype=dtype)
    kv = KVCache.allocate(config, batch, (h, w), device=dev, dtype=dtype)
    text = model.embed_text(torch.zeros(batch, config.text_len, config.text_dim, device=dev))
    ref = torch.zeros(batch, config.in_dim, 1, h, w, device=dev)
    motion = torch.zeros(batch, config.in_dim, config.motion_latent_frames, h, w, device=dev)
    x = torch.zeros(batch, config.in_dim, fpb, h, w, device=dev)
    audio = torch.zeros(batch, config.num_audio_layers, config.audio_dim, config.vae_temporal_stride * fpb,
                        device=dev)
    t = torch.full((batch,), 1000.0)
    # 1. the sink prefill (cond tokens through every block, once per session)
    prefill = count_flops(lambda: model.prefill_sink(ref, motion, text, sink))
    # 2. the first block of a stream: the ring holds only the block itself
    first = count_flops(lambda: model.forward_block(x, t, audio, text, kv, sink, 0, config.ref_rope_time))
    # 3. steady state: put the ring in the state "full of the previous frames" (an explicit state
    #    object, so no need to run the earlier blocks), then run the next block
    start = config.kv_cache_frames
    kv.start_frame, kv.end_frame = start - (config.kv_cache_frames - fpb), start
    steady = count_flops(lambda: model.forward_block(x, t, audio, text, kv, sink, start,
                                                     model.sink_ref_time(start, config.sink_lead_min)))
    if kv.num_frames != config.kv_cache_frames:  # pragma: no cover - guards the state set-up above
        raise RuntimeError(f"steady-state count saw {kv.num_frames} cached frames, not {config.kv_cache_frames}")
    fsl = config.frame_seq_len((h, w))
    return {
        "sink_prefill": prefill, "first_block": first, "steady_state": steady,
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_dict_keys": len(model.state_dict()),
        "tokens_per_block": fpb * fsl, "sink_tokens": sink.num_tokens,
        "keys_first_block": fpb * fsl + sink.num_tokens,
        "keys_steady_state": config.kv_cache_frames * fsl + sink.num_tokens,
    }


def count_flops_meta(config: DiTConfig, latent_hw: tuple[int, int], steady_state: bool = True,
                     batch: int = 1) -> dict[str, object]:
    """FLOPs of one denoising step of one block, counted on the meta device.

    ``steady_state=True``: the KV ring is full (12 latent frames = 4 blocks, the block included);
    False: the first block of a stream (the ring holds only the block). Returns
    ``{"step": {linear, attention, conv, other, total}, "sink_prefill": {...}, "keys": L,
    "tokens_per_block": N, "sink_tokens": S, "steady_state": bool}``.
    """
    c = count_dit_flops_meta(config, latent_hw, batch)
    step = c["steady_state"] if steady_state else c["first_block"]
    return {"step": step.as_dict(), "sink_prefill": c["sink_prefill"].as_dict(),
            "keys": c["keys_steady_state"] if steady_state else c["keys_first_block"],
            "tokens_per_block": c["tokens_per_block"], "sink_tokens": c["sink_tokens"],
            "steady_state": steady_state}


# ---------------------------------------------------------------------------------------------
# The closed form (DiT)
# ---------------------------------------------------------------------------------------------

def sink_token_count(config: DiTConfig, latent_hw: tuple[int, int]) -> int:
    """Cond tokens: ref (one frame) + FramePack buckets at 1x, 2x, 4x compression (floored grids)."""
    h, w = _check_grid(config, latent_hw)
    _, ph, pw = config.patch_size
    return (h // ph) * (w // pw) + framepack_token_count(config, (h, w))


def _conv1d_out(t: int, stride: int) -> int:
    """Length after a causal k=3 conv (left pad 2) with this stride."""
    return (t + 2 - 3) // stride + 1


def analytic_flops(config: DiTConfig, latent_hw: tuple[int, int], steady_state: bool = True,
                   batch: int = 1) -> dict[str, object]:
    """Closed-form FLOPs of one denoising step (and of the sink prefill), per §9 plus the small terms.

    Per transformer layer with N noisy tokens, L self-attention keys, T text tokens, width d:
        linear    8 N d^2 (self q,k,v,o) + 4 N d^2 (cross q,o) + 4 T d^2 (cross k,v) + 4 N d ffn
        attention 4 N L d (self QK^T + PV) + 4 N T d (cross)
    plus, per audio-injected layer: q,o on N tokens, k,v on the 5 audio tokens of each frame,
    the AdaLN linear, attention 4 N 5 d; plus the patch-embedding conv, the audio conv encoder,
    the timestep MLPs and the head. ``terms`` lists each part.
    """
    h, w = _check_grid(config, latent_hw)
    d, ffn, T, B = config.dim, config.ffn_dim, config.text_len, batch
    pt, ph, pw = config.patch_size
    fpb = config.frames_per_block
    fsl = (h // ph) * (w // pw)
    N = fpb * fsl
    S = sink_token_count(config, (h, w))
    L = (config.kv_cache_frames if steady_state else fpb) * fsl + S
    layers, n_inj = config.num_layers, len(config.audio_inject_layers)
    n_tok = config.num_audio_token + 1                      # local audio tokens + padding token

    def block_linear(n: int) -> int:
        return 8 * n * d * d + 4 * n * d * d + 4 * T * d * d + 4 * n * d * ffn

    def block_attention(n: int, keys: int) -> int:
        return 4 * n * keys * d + 4 * n * T * d

    time_mlp = 2 * config.freq_dim * d + 2 * d * d + 2 * d * 6 * d       # time_embedding + time_projection
    patch = 2 * d * config.in_dim * pt * ph * pw                           # per token
    # audio conv encoder on motion_frames + 4F video frames
    t0 = config.motion_frames + config.vae_temporal_stride * fpb
    t2 = _conv1d_out(t0, 2)
    t3 = _conv1d_out(t2, 2)
    head_c = d // config.num_audio_token
    audio_conv = (2 * t0 * d * config.audio_dim * 3                    # conv1_local
                  + 2 * t0 * head_c * config.audio_dim * 3              # conv1_global
                  + (config.num_audio_token + 1) * (2 * t2 * (d // 2) * head_c * 3 + 2 * t3 * d * (d // 2) * 3))
    audio_linear = 2 * t3 * d * d                                       # final_linear (all frames, before the drop)
    inj_linear = 2 * N * d * d * 2 + 2 * fpb * n_tok * d * d * 2 + 2 * fpb * d * 2 * d
    inj_attention = 4 * N * n_tok * d
    head = 2 * N * d * config.out_dim * pt * ph * pw
    step_terms = {
        "blocks_linear": B * layers * block_linear(N),
        "blocks_attention": B * layers * block_attention(N, L),
        "audio_injector_linear": B * n_inj * inj_linear,
        "audio_injector_attention": B * n_inj * inj_attention,
        "audio_encoder_conv": B * audio_conv,
        "audio_encoder_linear": B * audio_linear,
        "time_embedding_linear": B * time_mlp,
        "patch_embedding_conv": B * N * patch,
        "head_linear": B * head,
    }
    step = FlopBreakdown(
        linear=sum(v for k, v in step_terms.items() if k.endswith("linear")),
        attention=sum(v for k, v in step_terms.items() if k.endswith("attention")),
        conv=sum(v for k, v in step_terms.items() if k.endswith("conv")),
    )
    # sink prefill: ref through patch_embedding, motion through the FramePack convs, S tokens through
    # every block attending to each other, t = 0 modulation; no audio, no head
    fp_conv = 0
    for (nt, nh, nw), c in zip(framepack_bucket_shapes(config, (h, w)), COMPRESSIONS, strict=True):
        fp_conv += 2 * nt * nh * nw * d * config.in_dim * c * (c * ph) * (c * pw)   # every bucket is convolved
    prefill = FlopBreakdown(linear=B * (layers * block_linear(S) + time_mlp),
                            attention=B * layers * block_attention(S, S),
                            conv=B * (fsl * patch + fp_conv))
    section9 = FlopBreakdown(linear=step_terms["blocks_linear"] + 2 * N * d * d * 2 * n_inj * B,
                             attention=step_terms["blocks_attention"])
    return {"step": step.as_dict(), "sink_prefill": prefill.as_dict(), "terms": step_terms,
            "section9": section9.as_dict(), "keys": L, "tokens_per_block": N, "sink_tokens": S,
            "steady_state": steady_state}


# ---------------------------------------------------------------------------------------------
# VAE decode
# ---------------------------------------------------------------------------------------------

def count_vae_decode_flops_meta(vae_config=None, latent_hw: tuple[int, int] = (48, 88), block_latents: int = 3,
                                warmup_latents: int = 7, dtype: torch.dtype = torch.bfloat16) -> FlopBreakdown:
    """FLOPs of the streaming decode of one block of ``block_latents`` latents, after the warm-up
    chunk (as the VAE stage runs it), counted on the meta device."""
    from models.vae import VAEConfig, WanVAE

    cfg = vae_config if vae_config is not None else VAEConfig()
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1 or block_latents < 1 or warmup_latents < 1:
        raise FlopsError(f"need a positive latent grid and latent counts, got {latent_hw}, "
                         f"{block_latents}, {warmup_latents}")
    with torch.device("meta"):
        vae = WanVAE(cfg).to(dtype)
    state = vae.init_decode_state()
    vae.decode_step(torch.zeros(1, cfg.z_dim, warmup_latents, h, w, device="meta"), state)
    z = torch.zeros(1, cfg.z_dim, block_latents, h, w, device="meta")
    return count_flops(lambda: vae.decode_step(z, state))


def analytic_vae_decode_flops(vae_config=None, latent_hw: tuple[int, int] = (48, 88),
                              block_latents: int = 3) -> FlopBreakdown:
    """Closed form of a steady-state (not first) streaming decode chunk of ``block_latents`` latents.

    conv FLOPs = 2 x C_in x C_out x kernel volume x output positions; causal temporal convs see
    the cached past frames, so every conv outputs one frame per input frame. Temporal upsamplers
    double the frames (a (3,1,1) conv to 2C channels), spatial upsamplers double H and W then run
    a 3x3 conv to C/2 channels. Attention blocks: 1x1 q/k/v and output convs plus 4 (HW)^2 C.
    """
    from models.vae import VAEConfig

    cfg = vae_config if vae_config is not None else VAEConfig()
    z, mults = cfg.z_dim, cfg.dim_mult
    T, H, W = block_latents, int(latent_hw[0]), int(latent_hw[1])
    conv = attention = 0

    def c3(cin: int, cout: int, k: int = 27) -> int:
        return 2 * cin * cout * k * T * H * W

    def attn_block(c: int) -> tuple[int, int]:
        hw = H * W
        return 2 * T * hw * c * 3 * c + 2 * T * hw * c * c, 4 * T * hw * hw * c

    def res_block(cin: int, cout: int) -> int:
        return c3(cin, cout) + c3(cout, cout) + (c3(cin, cout, 1) if cin != cout else 0)

    dims = [cfg.dim * m for m in (mults[-1], *mults[::-1])]
    conv += c3(z, z, 1)                                   # conv2 (1x1x1) on the latents
    conv += c3(z, dims[0])                                # decoder.conv1
    a_conv, a_attn = attn_block(dims[0])
    conv += 2 * res_block(dims[0], dims[0]) + a_conv      # middle: res, attention, res
    attention += a_attn
    scale = 1.0 / 2 ** (len(mults) - 2)
    for i in range(len(mults)):
        cin, cout = (dims[i] // 2 if i > 0 else dims[i]), dims[i + 1]
        for _ in range(cfg.num_res_blocks + 1):
            conv += res_block(cin, cout)
            if scale in cfg.attn_scales:
                a_conv, a_attn = attn_block(cout)
                conv, attention = conv + a_conv, attention + a_attn
            cin = cout
        if i != len(mults) - 1:
            if cfg.temperal_upsample[i]:
                conv += 2 * cout * 2 * cout * 3 * T * H * W   # time_conv (3,1,1) to 2C channels
                T *= 2
            H, W = 2 * H, 2 * W
            conv += 2 * cout * (cout // 2) * 9 * T * H * W   # spatial 3x3 conv after nearest 2x
            scale *= 2.0
    conv += c3(dims[-1], cfg.in_channels)                 # head conv
    return FlopBreakdown(conv=conv, attention=attention)


# ---------------------------------------------------------------------------------------------
# Physical bound
# ---------------------------------------------------------------------------------------------

def physical_bound(step: FlopBreakdown, first_step: FlopBreakdown, vae_block: FlopBreakdown,
                   device: str = "h800-sxm", steps: int = 4, frames_per_block: int = 12, fps: int = 25,
                   weight_bytes: int | None = None, kv_bytes_per_step: int | None = None,
                   claimed_fps: float = CLAIMED_FPS["v4_fp8_compile"], vae_conv_efficiency: float = 0.35
                   ) -> dict[str, object]:
    """Time per step at 100% of peak, FPS bounds (1 GPU; TPP 4 DiT + 1 VAE GPU), implied MFU.

    * BF16: everything at the BF16 dense peak. FP8: linears at the FP8 peak, attention and convs at
      BF16 (as the reference's --fp8 path: only nn.Linear is quantised).
    * 1 GPU: a block needs ``steps`` sequential steps plus its VAE decode.
    * TPP: each DiT GPU runs one step of every block, so a block leaves per max(step, VAE) time.
    * Claimed FPS -> step time = frames_per_block / fps_claimed -> MFU = FLOPs / (time x peak).
    """
    if device not in DEVICE_SPECS:
        raise FlopsError(f"unknown device {device!r}; choose from {sorted(DEVICE_SPECS)}")
    spec = DEVICE_SPECS[device]
    bf16 = float(spec["bf16_tflops"]) * 1e12
    fp8 = float(spec["fp8_tflops"]) * 1e12
    bw = float(spec["hbm_tb_s"]) * 1e12

    def t_bf16(f: FlopBreakdown) -> float:
        return f.total / bf16

    def t_fp8(f: FlopBreakdown) -> float:
        return f.linear / fp8 + (f.total - f.linear) / bf16

    step_bf16, step_fp8 = t_bf16(step), t_fp8(step)
    vae_peak = t_bf16(vae_block)
    vae_real = vae_peak / vae_conv_efficiency
    budget = frames_per_block / fps
    out: dict[str, object] = {
        "device": device, "device_spec": dict(spec),
        "step_flops": step.total, "first_step_flops": first_step.total, "vae_block_flops": vae_block.total,
        "step_ms_bf16": 1e3 * step_bf16, "step_ms_fp8_linear": 1e3 * step_fp8,
        "first_step_ms_bf16": 1e3 * t_bf16(first_step), "vae_block_ms_bf16_peak": 1e3 * vae_peak,
        "vae_block_ms_at_efficiency": 1e3 * vae_real, "vae_conv_efficiency": vae_conv_efficiency,
        "realtime_block_budget_ms": 1e3 * budget,
        "single_gpu": {
            "block_ms_bf16": 1e3 * (steps * step_bf16 + vae_peak),
            "fps_bf16": frames_per_block / (steps * step_bf16 + vae_peak),
            "block_ms_fp8_linear": 1e3 * (steps * step_fp8 + vae_peak),
            "fps_fp8_linear": frames_per_block / (steps * step_fp8 + vae_peak),
            "realtime_needs_mfu_bf16": (steps * step_bf16 + vae_peak) / budget,
            "realtime_needs_mfu_fp8_linear": (steps * step_fp8 + vae_peak) / budget,
        },
        "tpp": {
            "gpus": steps + 1,
            "fps_bf16": frames_per_block / max(step_bf16, vae_peak),
            "fps_fp8_linear": frames_per_block / max(step_fp8, vae_peak),
        },
        "first_frame_floor_ms_bf16": 1e3 * (steps * t_bf16(first_step) + vae_peak),
    }
    if claimed_fps:
        step_claim = frames_per_block / claimed_fps
        out["claimed"] = {"fps": claimed_fps, "step_ms": 1e3 * step_claim,
                          "mfu_bf16": step_bf16 / step_claim, "mfu_fp8_linear": step_fp8 / step_claim,
                          "vae_fits_at_efficiency": vae_real <= step_claim}
    if weight_bytes is not None and kv_bytes_per_step is not None:
        mem = (weight_bytes + kv_bytes_per_step) / bw
        out["step_memory_ms"] = 1e3 * mem
        out["weight_bytes"] = weight_bytes
        out["kv_bytes_per_step"] = kv_bytes_per_step
        out["compute_bound"] = step_bf16 > mem
    return out


def lane_shape_period(step_s: float, vae_s: float, denoisers: int, decoder_rank: bool, steps: int = 4,
                      hop_s: float = 0.0, frames_per_block: int = 12) -> dict[str, object]:
    """Steady-state time per block and FPS of a lane shape (``denoisers`` ranks of ``steps / denoisers``
    steps each; the decoder on a rank of its own when ``decoder_rank``, else after the last denoise rank's
    steps), one GPU per rank: a block leaves per the slowest rank's time, plus one hop between ranks.

    ``4+1`` gives ``max(step, VAE)`` (:func:`physical_bound`'s TPP row), ``1`` gives ``4 steps + VAE`` (its
    one-GPU row).
    """
    if denoisers < 1 or steps % denoisers:
        raise FlopsError(f"{denoisers} denoise ranks cannot share {steps} steps evenly")
    denoise_s = steps // denoisers * step_s
    ranks = {"denoise": denoise_s}
    if decoder_rank:
        ranks["decode"] = vae_s
    else:
        ranks["denoise+decode"] = denoise_s + vae_s
    gpus = denoisers + (1 if decoder_rank else 0)
    period = max(ranks.values()) + (hop_s if gpus > 1 else 0.0)
    return {"gpus": gpus, "period_s": period, "fps": frames_per_block / period,
            "slowest": max(ranks, key=ranks.get), "fps_per_gpu": frames_per_block / period / gpus}


def model_report(dit_config: DiTConfig, vae_config, latent_hw: tuple[int, int], device: str = "h800-sxm",
                 steps: int = 4, fps: int = 25, weight_dtype_bytes: int = 2) -> dict[str, object]:
    """Everything `liveavatar inspect` and the benchmark print about one configuration and grid.

    FLOPs per denoising step and per block (``steps`` steps), first block and steady state, the
    sink prefill, the VAE decode of one block, the closed-form check, and the physical bound.
    """
    counted = count_dit_flops_meta(dit_config, latent_hw)
    vae = count_vae_decode_flops_meta(vae_config, latent_hw, dit_config.frames_per_block)
    first, steady = counted["first_block"], counted["steady_state"]
    an_first = analytic_flops(dit_config, latent_hw, steady_state=False)
    an_steady = analytic_flops(dit_config, latent_hw, steady_state=True)
    frames = dit_config.frames_per_block * dit_config.vae_temporal_stride
    kv_bytes = (2 * dit_config.num_layers * counted["keys_steady_state"] * dit_config.dim * weight_dtype_bytes)
    bound = physical_bound(steady, first, vae, device=device, steps=steps, frames_per_block=frames, fps=fps,
                           weight_bytes=counted["parameters"] * weight_dtype_bytes, kv_bytes_per_step=kv_bytes)
    return {
        "latent_hw": list(latent_hw),
        "tokens_per_block": counted["tokens_per_block"], "sink_tokens": counted["sink_tokens"],
        "keys_first_block": counted["keys_first_block"], "keys_steady_state": counted["keys_steady_state"],
        "dit_parameters": counted["parameters"], "dit_state_dict_keys": counted["state_dict_keys"],
        "step_first_block": first.as_dict(), "step_steady_state": steady.as_dict(),
        "block_first": first.scaled(steps).as_dict(), "block_steady_state": steady.scaled(steps).as_dict(),
        "sink_prefill": counted["sink_prefill"].as_dict(),
        "vae_decode_block": vae.as_dict(),
        "analytic_step_first_block": an_first["step"], "analytic_step_steady_state": an_steady["step"],
        "analytic_relative_error": max(abs(an["step"]["total"] - c.total) / c.total
                                       for an, c in ((an_first, first), (an_steady, steady))),
        "physical_bound": bound,
    }


def tflop(flops: float, digits: int = 2) -> float:
    """FLOPs -> TFLOP, rounded (for printing)."""
    return round(flops / 1e12, digits) if math.isfinite(flops) else flops
