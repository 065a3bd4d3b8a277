"""DiT parts against independent computations: cache contents, audio adapter, FramePack,
unpatchify, timestep sinusoid, pose bias, text padding, and input validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.audio_adapter import AdaLayerNorm, AudioInjector
from models.config import DiTConfig, ModelInputError
from models.dit import CausalWanS2V, sinusoidal_embedding
from models.kv_cache import KVCache, SinkCache
from models.motioner import FramePackMotioner, framepack_mode, framepack_positions, framepack_token_count
from models.rope import rope_table

pytestmark = pytest.mark.unit

CFG = DiTConfig.tiny()
HW = (8, 8)
D64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = CausalWanS2V(CFG, dtype=D64)
    with torch.no_grad():
        model.casual_audio_encoder.encoder.padding_tokens.normal_()   # make the pad token visible
    text = model.embed_text(rand(1, 9, CFG.text_dim, seed=1))
    sink = SinkCache.allocate(CFG, 1, HW, dtype=D64)
    ref, motion = rand(1, 16, 1, *HW, seed=2), rand(1, 16, 19, *HW, seed=3)
    with torch.no_grad():
        model.prefill_sink(ref, motion, text, sink)
    return model, text, sink, ref, motion


def time_mod_reference(model, t):
    """Independent timestep path: math.cos/sin sinusoid, then the two MLPs written out."""
    half = CFG.freq_dim // 2
    freqs = [10000 ** (-i / half) for i in range(half)]
    sin = torch.tensor([[math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]], dtype=D64)
    te = model.time_embedding
    e = F.silu(sin @ te[0].weight.T + te[0].bias) @ te[2].weight.T + te[2].bias
    e0 = F.silu(e) @ model.time_projection[1].weight.T + model.time_projection[1].bias
    return e, e0.view(1, 6, CFG.dim)


def layer0_kv(model, tokens, t):
    """Layer-0 self-attention K (RMS-normed, un-roped) and V of `tokens`, written out."""
    blk = model.blocks[0]
    _, e0 = time_mod_reference(model, t)
    mod = blk.modulation + e0
    h = F.layer_norm(tokens, (CFG.dim,), eps=CFG.eps) * (1 + mod[:, 1:2]) + mod[:, 0:1]
    k = h @ blk.self_attn.k.weight.T + blk.self_attn.k.bias
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + CFG.eps) * blk.self_attn.norm_k.weight
    v = h @ blk.self_attn.v.weight.T + blk.self_attn.v.bias
    split = (tokens.shape[0], tokens.shape[1], CFG.num_heads, CFG.head_dim)
    return k.view(split), v.view(split)


def test_sinusoid_is_cos_then_sin_in_float64():
    t = torch.tensor([0.0, 8.9286, 602.1506, 1000.0])
    emb = sinusoidal_embedding(256, t)
    half = 128
    want = torch.tensor([[math.cos(v * 10000 ** (-i / half)) for i in range(half)]
                         + [math.sin(v * 10000 ** (-i / half)) for i in range(half)] for v in t.tolist()],
                        dtype=D64)
    assert emb.dtype == D64
    torch.testing.assert_close(emb, want, atol=1e-12, rtol=0)


def test_sink_stores_unroped_keys_at_t0(setup):
    model, _, sink, ref, motion = setup
    w = model.trainable_cond_mask.weight
    ref_tok = F.conv3d(ref, model.patch_embedding.weight, model.patch_embedding.bias, stride=(1, 2, 2))
    fp = model.frame_packer
    near = F.conv3d(motion[:, :, -1:], fp.proj.weight, fp.proj.bias, stride=(1, 2, 2))
    mid = F.conv3d(motion[:, :, -3:-1], fp.proj_2x.weight, fp.proj_2x.bias, stride=(2, 4, 4))
    far = F.conv3d(motion[:, :, :16], fp.proj_4x.weight, fp.proj_4x.bias, stride=(4, 8, 8))
    tokens = torch.cat([ref_tok.flatten(2).mT + w[1]] + [c.flatten(2).mT + w[2] for c in (near, mid, far)], 1)
    with torch.no_grad():
        k, v = layer0_kv(model, tokens, 0.0)
    assert sink.prefill_count == 1
    torch.testing.assert_close(sink.k[0], k, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sink.v[0], v, atol=1e-10, rtol=1e-10)


def test_ring_stores_roped_keys_at_absolute_frames(setup):
    model, text, sink, _, _ = setup
    x, f0, t = rand(1, 16, 3, *HW, seed=4), 9, 700.0
    kv = KVCache.allocate(CFG, 1, HW, dtype=D64)
    with torch.no_grad():
        model.forward_block(x, t, rand(1, 5, CFG.audio_dim, 12, seed=5), text, kv, sink, f0, 30)
        tokens = F.conv3d(x, model.patch_embedding.weight, model.patch_embedding.bias, stride=(1, 2, 2))
        tokens = tokens.flatten(2).mT + model.cond_encoder.bias + model.trainable_cond_mask.weight[0]
        k, v = layer0_kv(model, tokens, t)
    table = rope_table(64, CFG.head_dim)
    table = torch.complex(table.real.half().double(), table.imag.half().double())   # fp16 factors
    ft, fh, fw = torch.meshgrid(torch.arange(f0, f0 + 3), torch.arange(4), torch.arange(4), indexing="ij")
    nt, nh = 4, 2                                               # head_dim 16 -> bands [8, 4, 4] dims
    fac = torch.cat([table[ft.flatten(), :nt], table[fh.flatten(), nt:nt + nh], table[fw.flatten(), nt + nh:]], 1)
    k_rot = torch.view_as_real(torch.view_as_complex(k.reshape(1, 48, 4, 8, 2)) * fac[None, :, None]).flatten(3)
    slots = slice((f0 % 12) * 16, (f0 % 12 + 3) * 16)           # ring slot of frame 9
    torch.testing.assert_close(kv.k[0][:, slots], k_rot, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(kv.v[0][:, slots], v, atol=1e-10, rtol=1e-10)


def test_audio_tokens_per_latent_frame_are_causal(setup):
    enc = setup[0].casual_audio_encoder
    audio = rand(2, 5, CFG.audio_dim, 12, seed=6)
    with torch.no_grad():
        tok, glob = enc(audio)
        assert tok.shape == (2, 3, CFG.num_audio_token + 1, CFG.dim) and glob.shape == (2, 3, 1, CFG.dim)
        pad = enc.encoder.padding_tokens[0, 0, 0]
        assert torch.equal(tok[:, :, -1], pad.expand(2, 3, -1))
        for j in range(1, 12):                                  # slot s sees video frames <= 4s + 3
            pert = audio.clone()
            pert[..., j] += 1.0
            tok2, glob2 = enc(pert)
            s = j // 4
            # same shapes, same kernels in the same order: slots before s see unchanged inputs, exactly
            assert torch.equal(tok2[:, :s], tok[:, :s]) and torch.equal(glob2[:, :s], glob[:, :s])
            assert (tok2[:, s] - tok[:, s]).abs().max() > 1e-6
        pert = audio.clone()
        pert[..., 0] += 1.0                     # receptive field of slot s: frames [4s - 5, 4s + 3]
        change = (enc(pert)[0] - tok).abs().amax(dim=(0, 2, 3))
        assert change[0] > 1e-6 and change[1] > 1e-6 and change[2] == 0
        # pad / drop written out: mix layers, prepend 73 copies of frame 0, keep the last 3 outputs
        w = F.silu(enc.weights)
        mixed = (audio * w).sum(1) / w.sum(1)                                  # [B, C, 12]
        padded = torch.cat([mixed[..., :1].repeat(1, 1, CFG.motion_frames), mixed], -1)
        loc, glo = enc.encoder(padded.mT)                                      # [B, 22, 5, dim]
        assert loc.shape[1] == 22
        torch.testing.assert_close(tok, loc[:, -3:], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(glob, glo[:, -3:], atol=1e-12, rtol=1e-12)


def test_audio_blocks_are_encoded_independently_and_layer_mix_is_normalised(setup):
    enc = setup[0].casual_audio_encoder
    audio = rand(1, 5, CFG.audio_dim, 24, seed=7)
    with torch.no_grad():
        chunked = enc(audio, frames_per_chunk=3)[0]
        separate = torch.cat([enc(audio[..., :12])[0], enc(audio[..., 12:])[0]], dim=1)
        joint = enc(audio)[0]
        torch.testing.assert_close(chunked, separate, atol=1e-12, rtol=1e-12)
        assert (joint - chunked).abs().max() > 1e-6             # no cross-block context at inference
        same = rand(1, 1, CFG.audio_dim, 12, seed=8).expand(1, 5, -1, -1)
        a = enc(same)[0]
        saved = enc.weights.detach().clone()
        enc.weights.copy_(rand(1, 5, 1, 1, seed=9))
        b = enc(same)[0]
        enc.weights.copy_(saved)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)    # sum(w f) / sum(w) with equal f


def test_audio_injection_is_per_latent_frame():
    torch.manual_seed(1)
    inj = AudioInjector(CFG).double()
    x, tok, glob = rand(1, 3 * 16, CFG.dim, seed=10), rand(1, 3, 5, CFG.dim, seed=11), rand(1, 3, 1, CFG.dim, seed=12)
    with torch.no_grad():
        base = inj(2, x, tok, glob)
        for which in ("tok", "glob"):
            t2, g2 = tok.clone(), glob.clone()
            (t2 if which == "tok" else g2)[:, 1] += 1.0
            out = inj(2, x, t2, g2)
            diff = (out - base).abs().amax(dim=(0, 2)).view(3, 16).amax(dim=1)
            assert diff[0] == 0 and diff[2] == 0 and diff[1] > 1e-6


def test_adaln_applies_shift_first_then_scale():
    ada = AdaLayerNorm(8, eps=1e-5).double()
    shift, scale = rand(8, seed=13), rand(8, seed=14)
    with torch.no_grad():
        ada.linear.weight.zero_()
        ada.linear.bias.copy_(torch.cat([shift, scale]))
    x = rand(2, 5, 8, seed=15)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * (1 + scale) + shift
    torch.testing.assert_close(ada(x, rand(2, 8, seed=16)), want, atol=1e-12, rtol=1e-12)


def test_framepack_padding_and_drop_modes():
    torch.manual_seed(2)
    fp = FramePackMotioner(CFG).double()
    m = rand(1, 16, 19, *HW, seed=17)
    with torch.no_grad():
        full = fp(m)
        assert full.shape[1] == len(framepack_positions(CFG, HW)) == 16 + 4 + 4
        short = fp(m[:, :, -5:])  # zero-padded to 19 frames inside: then the same ops on the same tensor
        torch.testing.assert_close(short, fp(torch.cat([torch.zeros_like(m[:, :, :14]), m[:, :, -5:]], 2)),
                                   atol=0, rtol=0)
        zeroed = m.clone()
        zeroed[:, :, -1] = 0
        # add_last_motion=1 zeroes the nearest latent inside: the same tensor, then the same ops
        torch.testing.assert_close(fp(m, add_last_motion=1), fp(zeroed), atol=0, rtol=0)
    drop_cfg = DiTConfig.tiny(framepack_drop_mode="drop")
    fpd = FramePackMotioner(drop_cfg).double()
    fpd.load_state_dict(fp.state_dict())
    with torch.no_grad():
        kept = fpd(m, add_last_motion=1)
    assert kept.shape[1] == len(framepack_positions(drop_cfg, HW, add_last_motion=1)) == 8
    # exact: "drop" runs the same per-bucket convs on the same 19-frame input and discards a bucket
    torch.testing.assert_close(kept, full[:, 16:], atol=0, rtol=0)


@pytest.mark.parametrize("drop_mode", ["padd", "drop"])
@pytest.mark.parametrize("add_last_motion", [True, False])
def test_the_motion_token_count_is_what_every_user_gets(drop_mode, add_last_motion):
    """framepack_token_count against the token grids worked out by hand (h, w = 8, patch 2: 16, 4 and
    4 tokens per bucket) and against everything that makes or holds motion tokens."""
    from models.flops import sink_token_count
    from models.kv_cache import sink_positions

    cfg = DiTConfig.tiny(framepack_drop_mode=drop_mode, add_last_motion=add_last_motion)
    assert framepack_mode(cfg) == (2 if add_last_motion else 0)
    by_hand = {("padd", True): 24, ("padd", False): 24, ("drop", True): 24, ("drop", False): 4}
    count = framepack_token_count(cfg, HW)
    assert count == by_hand[drop_mode, add_last_motion]
    fp = FramePackMotioner(cfg)
    with torch.no_grad():
        tokens = fp(torch.zeros(1, cfg.in_dim, 19, *HW), framepack_mode(cfg))
    assert tokens.shape[1] == len(framepack_positions(cfg, HW, framepack_mode(cfg))) == count
    pos, n_ref = sink_positions(cfg, HW)
    assert n_ref == 16 and len(pos) == n_ref + count == sink_token_count(cfg, HW)
    for mode, dropped_tokens in ((2, 0), (1, 16), (0, 20)):    # drop mode removes post (16), then 2x (4)
        want = 24 - (dropped_tokens if drop_mode == "drop" else 0)
        assert framepack_token_count(cfg, HW, mode) == want
        with torch.no_grad():
            assert fp(torch.zeros(1, cfg.in_dim, 19, *HW), mode).shape[1] == want
    with pytest.raises(ModelInputError, match="add_last_motion"):
        framepack_token_count(cfg, HW, 3)


def test_unpatchify_uses_the_reference_layout(setup):
    model = setup[0]
    y = rand(2, 16, 3, 8, 12, seed=18)
    tokens = torch.einsum("bcfphqwr->bfhwpqrc", y.reshape(2, 16, 3, 1, 4, 2, 6, 2)).reshape(2, 3 * 4 * 6, 64)
    assert torch.equal(model.unpatchify(tokens, 3, (4, 6)), y)


def test_no_pose_equals_zero_pose_and_text_padding_is_zeros(setup):
    model, text, sink, _, _ = setup
    x, a = rand(1, 16, 3, *HW, seed=19), rand(1, 5, CFG.audio_dim, 12, seed=20)
    outs = []
    with torch.no_grad():
        for pose in (None, torch.zeros(1, 16, 3, *HW, dtype=D64), rand(1, 16, 3, *HW, seed=21)):
            kv = KVCache.allocate(CFG, 1, HW, dtype=D64)
            outs.append(model.forward_block(x, 500.0, a, text, kv, sink, 0, 30, pose=pose))
        ctx = rand(1, 9, CFG.text_dim, seed=1)
        padded = torch.cat([ctx, torch.zeros(1, CFG.text_len - 9, CFG.text_dim, dtype=D64)], 1)
        assert torch.equal(model.embed_text(ctx), model.embed_text(padded))  # both padded to text_len inside
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-12)
    assert (outs[2] - outs[0]).abs().max() > 1e-4


def _bad_calls():
    x, a = rand(1, 16, 3, *HW), rand(1, 5, CFG.audio_dim, 12)
    return {
        "channels": (dict(x=rand(1, 15, 3, *HW)), "x must be"),
        "ndim": (dict(x=rand(16, 3, *HW)), "x must be"),
        "grid": (dict(x=rand(1, 16, 3, 8, 7)), "latent grid"),
        "t_range": (dict(t=1500.0), "timesteps"),
        "t_shape": (dict(t=torch.ones(3)), "t must be"),
        "audio_frames": (dict(audio=rand(1, 5, CFG.audio_dim, 8)), "audio must be"),
        "audio_layers": (dict(audio=rand(1, 4, CFG.audio_dim, 12)), "audio must be"),
        "text": (dict(text_emb=rand(1, 3, CFG.dim)), "text_emb"),
        "frame_start": (dict(frame_start=-3), "frame_start"),
        "ref_time": (dict(ref_time=30.5), "ref_time"),
        "kv_grid": (dict(kv=KVCache.allocate(CFG, 1, (16, 8), dtype=D64)), "KV cache"),
        "empty_sink": (dict(sink=SinkCache.allocate(CFG, 1, HW, dtype=D64)), "prefill_sink"),
        "_ok": (dict(x=x, audio=a), None),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_inputs_raise_clear_value_errors(setup, case):
    model, text, sink, _, _ = setup
    override, words = _bad_calls()[case]
    args = dict(x=rand(1, 16, 3, *HW), t=500.0, audio=rand(1, 5, CFG.audio_dim, 12), text_emb=text,
                kv=KVCache.allocate(CFG, 1, HW, dtype=D64), sink=sink, frame_start=0, ref_time=30)
    args.update(override)
    with torch.no_grad():
        if words is None:
            assert model.forward_block(**args).shape == (1, 16, 3, *HW)
            return
        with pytest.raises(ModelInputError, match=words) as err:
            model.forward_block(**args)
    assert isinstance(err.value, ValueError)


def test_bad_text_and_sink_inputs(setup):
    model, text, sink, ref, motion = setup
    with pytest.raises(ModelInputError, match="text context"):
        model.embed_text(rand(1, CFG.text_len + 1, CFG.text_dim))
    with pytest.raises(ModelInputError, match="1 latent frame"):
        model.prefill_sink(torch.cat([ref, ref], 2), motion, text, SinkCache.allocate(CFG, 1, HW, dtype=D64))
    with pytest.raises(ModelInputError, match="motion latent"):
        model.prefill_sink(ref, rand(1, 16, 20, *HW), text, SinkCache.allocate(CFG, 1, HW, dtype=D64))
    with pytest.raises(ModelInputError, match="sink cache"):
        model.prefill_sink(ref, motion, text, SinkCache.allocate(CFG, 1, (16, 16), dtype=D64))
    with pytest.raises(ModelInputError, match="multiple of 3"):
        model.forward_full(rand(1, 16, 4, *HW), 500.0, rand(1, 5, CFG.audio_dim, 16), text, sink, 30)
