"""bf16 against float32 (DiT stream with KV caches, VAE decode) and the FP8 quantisation math, on CPU.

Tolerances come from models/precision.py's error model: ``3 * u / sqrt(3) * sqrt(n)`` for ``n``
sequential roundings, u = 2^-8 for bf16 (DiT: n = layers + 2; VAE: n = its convolutions). Every
tolerance test has a negative control that must exceed the same tolerance: the same network with
its weights rounded to e4m3 (16x bf16's eps), or with a real streaming bug (a KV ring emptied
before each block, a decoder that forgets its temporal cache). The FP8 ``_scaled_mm`` call itself
is tested in tests/gpu/.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from models.accel import AccelOptionError, AccelOptions, accelerate
from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.generator import LiveAvatarGenerator
from models.kv_cache import KVCache, SinkCache
from models.precision import (
    BF16_UNIT_ROUNDOFF,
    E4M3_MAX,
    FP8Linear,
    PrecisionError,
    bf16_tolerance,
    convert_linears_to_fp8,
    count_rounding_convs,
    dequantize_fp8,
    dit_bf16_roundings,
    e4m3_roundtrip_bound,
    fp8_linear_reference,
    fp8_scale,
    fp8_unavailable_reason,
    quantize_fp8,
    relative_error,
)
from models.scheduler import FlowMatchScheduler
from models.vae import VAEConfig, WanVAE

pytestmark = pytest.mark.unit

CFG = DiTConfig.tiny()
HW = (8, 8)
BLOCKS = 6          # 3 blocks fill the 12-frame ring, 3 more wrap it


def to_bf16(model: CausalWanS2V) -> CausalWanS2V:
    """The bf16 model as the loader makes it (the dtype policy keeps FP32_MODULES in fp32)."""
    return model.cast(torch.bfloat16)


def e4m3_weights(model: nn.Module) -> nn.Module:
    """Negative control: the same model with every weight rounded to e4m3 (per-tensor scale)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            q, s = quantize_fp8(p)
            p.copy_(dequantize_fp8(q, s, p.dtype))
    return model


@pytest.fixture(scope="module")
def dit32():
    torch.manual_seed(0)
    return CausalWanS2V(CFG).eval()


def stream_inputs(cfg: DiTConfig = CFG, hw=HW, blocks: int = BLOCKS, seed: int = 0):
    """Sink latents, a text context, and per-block audio features and noise (CPU, float32)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(1, cfg.in_dim, 1, *hw, generator=g)
    motion = torch.randn(1, cfg.in_dim, cfg.motion_latent_frames, *hw, generator=g)
    text = torch.randn(1, 5, cfg.text_dim, generator=g)
    audio = [torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 4 * cfg.frames_per_block, generator=g)
             for _ in range(blocks)]
    noise = [torch.randn(1, cfg.in_dim, cfg.frames_per_block, *hw, generator=g) for _ in range(blocks)]
    return ref, motion, text, audio, noise


def velocity_errors(reference: CausalWanS2V, others: dict[str, CausalWanS2V], reset_kv: frozenset = frozenset(),
                    hw=HW, blocks: int = BLOCKS) -> dict[str, list[float]]:
    """Relative velocity error of each model against ``reference`` at every (block, step).

    All models see the reference's latent trajectory (so errors do not compound through the Euler
    updates) but keep their own sink and 4 KV rings, in their own dtype and on their own device,
    across the stream. Names in ``reset_kv`` empty their ring before every block (a streaming bug).
    """
    cfg = reference.config
    ref, motion, text, audio, noise = stream_inputs(cfg, hw, blocks)
    sched = FlowMatchScheduler()
    state = {}
    with torch.no_grad():
        for name, m in {"ref": reference, **others}.items():
            dev = m.device
            emb = m.embed_text(text.to(dev))
            sink = SinkCache.allocate(cfg, 1, hw, device=dev, dtype=m.dtype)
            m.prefill_sink(ref.to(dev), motion.to(dev), emb, sink)
            kvs = [KVCache.allocate(cfg, 1, hw, device=dev, dtype=m.dtype) for _ in range(sched.num_steps)]
            state[name] = (m, emb, sink, kvs)
        errors = {name: [] for name in others}
        for b in range(blocks):
            x = noise[b]
            f0 = b * cfg.frames_per_block
            for step in range(sched.num_steps):
                t = torch.full((1,), sched.timestep(step))
                rt = reference.sink_ref_time(f0, 7 + step)
                v = {}
                for name, (m, emb, sink, kvs) in state.items():
                    if name in reset_kv:
                        kvs[step].reset()
                    v[name] = m.forward_block(x.to(m.device, m.dtype), t, audio[b].to(m.device), emb, kvs[step],
                                              sink, f0, rt).cpu()
                for name in others:
                    errors[name].append(relative_error(v[name], v["ref"]))
                x = sched.step(x, v["ref"], step)
    return errors


# ---------------------------------------------------------------------------------------------
# The error model itself
# ---------------------------------------------------------------------------------------------

def test_bf16_rounding_rms_is_u_over_sqrt3():
    """The base constant of the model: rounding to bf16 errs by at most u / sqrt(3) RMS (relative).

    The absolute error is uniform on half an ulp, RMS ulp / sqrt(12) = 2^e u / sqrt(3) for a value
    m 2^e; relative to the value that is u / sqrt(3) / m with m in [1, 2). For log-uniformly spread
    mantissas (Gaussian data is close) E[1/m^2] = (1/2 - 1/8) / ln 2, so the RMS is 0.736 of the bound.
    """
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rel = ((x.to(torch.bfloat16).double() - x) / x).pow(2).mean().sqrt().item()
    per_rounding = BF16_UNIT_ROUNDOFF / math.sqrt(3)
    assert rel < per_rounding
    assert rel == pytest.approx(per_rounding * math.sqrt(0.375 / math.log(2)), rel=0.05)
    assert bf16_tolerance(6) == pytest.approx(3 * 2 ** -8 / math.sqrt(3) * math.sqrt(6))
    with pytest.raises(ValueError):
        bf16_tolerance(0)


# ---------------------------------------------------------------------------------------------
# bf16 vs float32
# ---------------------------------------------------------------------------------------------

def test_dit_stream_bf16_matches_fp32_within_the_derived_tolerance(dit32):
    tol = bf16_tolerance(dit_bf16_roundings(CFG.num_layers))        # 0.0166 for 4 layers
    bf16 = to_bf16(copy.deepcopy(dit32))
    assert bf16.dtype == torch.bfloat16 and bf16.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    errs = velocity_errors(dit32, {"bf16": bf16, "e4m3": e4m3_weights(bf16), "stale": to_bf16(copy.deepcopy(dit32))},
                           reset_kv=frozenset({"stale"}))
    assert len(errs["bf16"]) == BLOCKS * 4
    assert max(errs["bf16"]) < tol, errs["bf16"]
    assert min(errs["bf16"]) > BF16_UNIT_ROUNDOFF / 10      # it really ran in bf16
    # negative controls: coarser weights, and a ring that loses the previous blocks
    assert max(errs["e4m3"]) > tol, errs["e4m3"]
    assert max(errs["stale"][3 * 4:]) > tol, errs["stale"]   # once the ring holds earlier blocks


def test_generator_stream_bf16_latents_match_fp32(dit32):
    """The public streaming API end to end: each path runs its own trajectory (bf16 latents between
    steps), so the 4 latent casts per block add to the roundings."""
    ref, motion, text, audio, _ = stream_inputs()
    tol = bf16_tolerance(dit_bf16_roundings(CFG.num_layers) + 4)

    def run(model):
        gen = LiveAvatarGenerator(model)
        session = gen.start(ref, motion, text, seed=3)
        return [gen.step_block(session, a).latent for a in audio]

    out32, out16 = run(dit32), run(to_bf16(copy.deepcopy(dit32)))
    assert out16[0].dtype == torch.bfloat16
    errs = [relative_error(b, a) for a, b in zip(out32, out16)]
    assert max(errs) < tol, errs
    bad = run(e4m3_weights(to_bf16(copy.deepcopy(dit32))))
    assert max(relative_error(b, a) for a, b in zip(out32, bad)) > tol


def _tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny()).eval()
    with torch.no_grad():
        for p in vae.parameters():      # perturb every parameter (zero-initialised ones too)
            p.add_(0.1 * torch.randn_like(p))
    return vae


def _decode(vae: WanVAE, z: torch.Tensor, chunks=(7, 3), forget_cache: bool = False) -> torch.Tensor:
    state, out, start = vae.init_decode_state(), [], 0
    with torch.no_grad():
        for n in chunks:
            if forget_cache and start:       # a decoder that loses its temporal cache between chunks
                state.conv_caches = [None] * len(state.conv_caches)
            out.append(vae.decode_step(z[:, :, start:start + n], state, clamp=False).float())
            start += n
    return torch.cat(out, dim=2)


def test_vae_streaming_decode_bf16_matches_fp32_within_the_derived_tolerance():
    vae = _tiny_vae()
    n = count_rounding_convs(vae.decoder) + count_rounding_convs(vae.conv2)
    tol = bf16_tolerance(n)                                            # 39 convolutions -> 0.042
    z = torch.randn(1, 16, 10, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _decode(vae, z)
    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    err = relative_error(_decode(vae16, z), ref)
    assert BF16_UNIT_ROUNDOFF / 10 < err < tol
    assert relative_error(_decode(e4m3_weights(vae16), z), ref) > tol
    assert relative_error(_decode(vae16, z, forget_cache=True), ref) > tol


# ---------------------------------------------------------------------------------------------
# FP8 quantisation math (pure torch)
# ---------------------------------------------------------------------------------------------

def _log_uniform(shape, lo=-12, hi=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mag = torch.pow(10.0, torch.empty(shape).uniform_(lo, hi, generator=g))
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def test_fp8_scales_map_the_largest_magnitude_to_448():
    w = torch.randn(32, 48) * torch.logspace(-3, 1, 32)[:, None]
    w[5] = 0.0
    s = fp8_scale(w)
    assert s.shape == () and s.item() == pytest.approx(w.abs().max().item() / 448)
    rows = fp8_scale(w, "row")
    assert rows.shape == (32, 1)
    assert torch.allclose(rows[:, 0], torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 448, torch.ones(32)))
    q, _ = quantize_fp8(w, "row")
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float().abs().amax(1)[torch.arange(32) != 5], torch.full((31,), E4M3_MAX))
    with pytest.raises(ValueError, match="scaling"):
        fp8_scale(w, "block")


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_e4m3_round_trip_stays_within_its_bound_and_the_bound_is_tight(scaling):
    x = _log_uniform((64, 256))
    q, s = quantize_fp8(x, scaling)
    err = (dequantize_fp8(q, s) - x).abs()
    bound = e4m3_roundtrip_bound(x, s)
    ratio = (err / bound).max().item()
    assert 0.5 < ratio <= 1.0 + 1e-6          # within, and reached to within a factor 2
    # negative control: e5m2 (2 mantissa bits) breaks the e4m3 bound
    q5 = (x / s).clamp(-448, 448).to(torch.float8_e5m2)
    assert ((q5.float() * s - x).abs() > bound * (1 + 1e-6)).any()


def test_row_scaling_keeps_small_rows_out_of_the_subnormals():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * torch.logspace(-6, 0, 16)[:, None]

    def worst_relative(scaling):
        q, s = quantize_fp8(w, scaling)
        return ((dequantize_fp8(q, s) - w).norm(dim=1) / w.norm(dim=1)).max().item()

    assert worst_relative("row") < 2 ** -4
    assert worst_relative("tensor") > 0.5     # rows 1e-6 below the largest lose everything


def test_fp8_linear_reference_against_an_independent_float64_linear():
    """With x^ = x + dx, w^ = w + dw and |dx| <= u8 |x| + sub s_x (likewise dw), the products err by
    |x^ w^ - x w| <= (2 u8 + u8^2) |x||w| + (1 + u8) sub (s_x |w| + s_w |x|) + sub^2 s_x s_w, summed
    over the K inputs; the bf16 output rounding adds 2^-8 of the result. u8 = 2^-4, sub = 2^-10."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(5, 7, 64, generator=g) * torch.logspace(-3, 0, 7)[None, :, None]
    xb = x.to(torch.bfloat16)
    x2, w = xb.reshape(-1, 64).double(), lin.weight.double()
    exact = x2 @ w.t() + lin.bias.to(torch.bfloat16).double()                     # [35, 48]
    u8, sub = 2.0 ** -4, 2.0 ** -10
    for scaling in ("tensor", "row"):
        layer = FP8Linear.from_linear(lin, scaling)
        y = layer.reference_forward(xb)
        assert y.dtype == torch.bfloat16 and y.shape == (5, 7, 48)
        assert torch.equal(y, fp8_linear_reference(xb, layer.weight_fp8, layer.weight_scale, layer.bias, scaling))
        s_x = fp8_scale(xb.reshape(-1, 64), scaling).double()                    # () or [35, 1]
        s_w = layer.weight_scale.double().reshape(1, -1) if scaling == "row" else layer.weight_scale.double()
        pre = ((2 * u8 + u8 ** 2) * (x2.abs() @ w.abs().t())
               + (1 + u8) * sub * (s_x * w.abs().sum(1)[None, :] + s_w * x2.abs().sum(1)[:, None])
               + sub ** 2 * s_x * s_w * 64)
        bound = pre + 2.0 ** -8 * (exact.abs() + pre)
        err = (y.reshape(-1, 48).double() - exact).abs()
        assert (err <= bound).all(), (err / bound).max()
        assert (err / bound).max() > 0.05        # the bound is not vacuous


def test_fp8_conversion_replaces_the_block_linears_and_keeps_the_excluded_ones(dit32):
    model = to_bf16(copy.deepcopy(dit32))
    with pytest.raises(PrecisionError, match="compute capability"):
        convert_linears_to_fp8(model)                        # CPU: refused before touching the model
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    report = convert_linears_to_fp8(model, check_device=False)
    n_inj = len(CFG.audio_inject_layers)
    # per block: self q,k,v,o + cross q,k,v,o + ffn.0, ffn.2; per injector: q,k,v,o
    assert len(report["converted"]) == 10 * CFG.num_layers + 4 * n_inj
    converted = set(report["converted"])
    for name in ("blocks.0.self_attn.q", "blocks.3.ffn.2", "audio_injector.injector.1.o"):
        assert name in converted and isinstance(model.get_submodule(name), FP8Linear)
    kept = " ".join(report["kept"])
    for name in ("text_embedding.0", "time_embedding.2", "time_projection.1", "head.head",
                 "casual_audio_encoder.encoder.final_linear", "audio_injector.injector_adain_layers.0.linear"):
        assert name in kept and type(model.get_submodule(name)) is nn.Linear
    # quantised weights dequantise to the bf16 weights within the e4m3 bound
    w = dit32.blocks[0].self_attn.q.weight.to(torch.bfloat16).float()
    q = model.blocks[0].self_attn.q
    assert (dequantize_fp8(q.weight_fp8, q.weight_scale) - w).abs().le(e4m3_roundtrip_bound(w, q.weight_scale)).all()


def test_emulated_fp8_dit_stays_close_to_bf16(dit32):
    """The whole tiny DiT with every FP8 linear emulated (dequantise-and-multiply) against bf16.

    One FP8 linear rounds both operands to e4m3 (u8 = 2^-4): relative RMS error sqrt(2) u8 / sqrt(3).
    The velocity's error is, to first order, a weighted mean of the errors of the linears that feed
    the residual stream (they do not add up: each is a fraction of the stream), so the bound is one
    linear's error with the usual safety factor 3: tol = 3 sqrt(2) u8 / sqrt(3) = 0.153."""
    bf16 = to_bf16(copy.deepcopy(dit32))
    fp8 = copy.deepcopy(bf16)
    convert_linears_to_fp8(fp8, check_device=False)
    for m in fp8.modules():
        if isinstance(m, FP8Linear):
            m.forward = m.reference_forward
    tol = 3 * 2 ** -4 / math.sqrt(3) * math.sqrt(2)
    bad = copy.deepcopy(fp8)                 # negative control: weight scales 1.5x off (a scaling bug)
    for m in bad.modules():
        if isinstance(m, FP8Linear):
            m.weight_scale.mul_(1.5)
            m.forward = m.reference_forward
    errs = velocity_errors(bf16, {"fp8": fp8, "bad": bad})
    assert 1e-3 < max(errs["fp8"]) < tol, errs["fp8"]          # measured 0.011-0.013
    assert max(errs["bad"]) > tol, errs["bad"]


def test_fp8_on_cpu_fails_with_a_clear_error(dit32):
    reason = fp8_unavailable_reason("cpu")
    assert "CUDA" in reason and "8.9" in reason
    model = to_bf16(copy.deepcopy(dit32))
    with pytest.raises(PrecisionError, match=r"linear_precision='fp8' is not available: .*CUDA"):
        accelerate(model, AccelOptions(linear_precision="fp8"))
    assert not any(isinstance(m, FP8Linear) for m in model.modules()) and model.core_runner is None
    layer = FP8Linear.from_linear(nn.Linear(32, 16))
    with pytest.raises(PrecisionError, match="CUDA"):
        layer(torch.randn(2, 32))
    with pytest.raises(PrecisionError, match="CUDA device"):
        accelerate(model, AccelOptions(cuda_graphs=True))


def test_accel_options_validate_and_default_to_off():
    opts = AccelOptions()
    assert not opts.enabled and opts.as_dict() == {"linear_precision": "bf16", "fp8_scaling": "tensor",
                                                    "compile": False, "cuda_graphs": False, "graph_warmup": 2}
    assert AccelOptions.from_dict({"linear_precision": "fp8", "compile": True}).enabled
    for bad in ({"linear_precision": "fp16"}, {"fp8_scaling": "block"}, {"compile": "yes"},
                {"graph_warmup": 0}, {"turbo": True}):
        with pytest.raises(AccelOptionError):
            AccelOptions.from_dict(bad)
