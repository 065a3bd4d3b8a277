"""VAE building blocks against hand-written float64 references (norm, attention, resampling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.vae_blocks import AttentionBlock, CausalConv3d, Resample, RMSNorm, assign_cache_slots
from tests.numerics import assert_close_dtype, fan_in_sum

pytestmark = pytest.mark.unit


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return module.double()


def test_rms_norm_matches_manual_formula():
    norm = _randomize(RMSNorm(6, video=True))
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    expected = x / rms * norm.gamma.view(1, 6, 1, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_attention_block_matches_per_frame_softmax_attention():
    c, h, w = 6, 3, 4
    block = _randomize(AttentionBlock(c))
    x = torch.randn(2, c, 3, h, w, dtype=torch.float64)
    out = block(x)
    for b in range(2):
        for t in range(3):
            frame = x[b, :, t].reshape(c, h * w)  # [C, L]
            normed = frame / frame.pow(2).mean(0, keepdim=True).sqrt() * block.norm.gamma.view(c, 1)
            qkv = block.to_qkv.weight.view(3 * c, c) @ normed + block.to_qkv.bias.view(3 * c, 1)
            q, k, v = qkv[:c], qkv[c : 2 * c], qkv[2 * c :]  # [C, L] each
            attn = torch.softmax(q.T @ k / c**0.5, dim=-1)  # [L, L]
            y = (attn @ v.T).T  # [C, L]
            y = block.proj.weight.view(c, c) @ y + block.proj.bias.view(c, 1)
            torch.testing.assert_close(out[b, :, t], (y + frame).view(c, h, w))


def _spatial_up(frame: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    # [C, H, W] -> [C/2, 2H, 2W]: nearest 2x then the 3x3 conv
    up = frame.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    return F.conv2d(up[None], conv.weight, conv.bias, padding=1)[0]


def test_upsample3d_frame_order_and_first_frame_rule():
    c = 4
    res = _randomize(Resample(c, "upsample3d"))
    with torch.no_grad():  # time conv: even frames = x_t + 0.5 x_{t-1}, odd frames = 2 x_t
        res.time_conv.weight.zero_()
        res.time_conv.bias.zero_()
        for i in range(c):
            res.time_conv.weight[i, i, 2] = 1.0
            res.time_conv.weight[i, i, 1] = 0.5
            res.time_conv.weight[c + i, i, 2] = 2.0
    assign_cache_slots(res)
    x = torch.randn(1, c, 4, 3, 3, dtype=torch.float64)
    out = res(x, caches=None, first_chunk=True)
    assert out.shape == (1, c // 2, 1 + 2 * 3, 6, 6)
    # frame 0 (latent 0) passes alone; latent 0 is not in the time conv's past either
    time_frames = [x[0, :, 0]]
    for t in range(1, 4):
        prev = x[0, :, t - 1] if t >= 2 else torch.zeros_like(x[0, :, 0])
        time_frames += [x[0, :, t] + 0.5 * prev, 2.0 * x[0, :, t]]
    conv = res.resample[1]
    for i, frame in enumerate(time_frames):
        torch.testing.assert_close(out[0, :, i], _spatial_up(frame, conv))
    # streaming in chunks of 1 frame gives the same frames, up to rounding: convolutions over a
    # shorter time axis may sum in another order (tests/numerics.py; ops = the two conv fan-ins)
    caches = [None]
    chunks = [res(x[:, :, t : t + 1], caches, first_chunk=(t == 0)) for t in range(4)]
    assert_close_dtype(torch.cat(chunks, dim=2), out, ops=fan_in_sum(res))


def test_downsample3d_windows_and_streaming():
    c = 3
    res = _randomize(Resample(c, "downsample3d"))
    assign_cache_slots(res)
    x = torch.randn(1, c, 9, 4, 4, dtype=torch.float64)
    out = res(x, caches=None, first_chunk=True)
    assert out.shape == (1, c, 5, 2, 2)
    conv = res.resample[1]
    spatial = [F.conv2d(F.pad(x[:, :, t], (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)[0] for t in range(9)]
    wt, bt = res.time_conv.weight[:, :, :, 0, 0], res.time_conv.bias  # [C, C, 3]
    torch.testing.assert_close(out[0, :, 0], spatial[0])
    for j in range(1, 5):  # latent j sees frames 2j-2, 2j-1, 2j
        window = torch.stack(spatial[2 * j - 2 : 2 * j + 1], dim=1)  # [C, 3, h, w]
        expected = torch.einsum("oik,ikhw->ohw", wt, window) + bt.view(c, 1, 1)
        torch.testing.assert_close(out[0, :, j], expected)
    caches = [None]
    parts = [res(x[:, :, :1], caches, True), res(x[:, :, 1:5], caches, False), res(x[:, :, 5:], caches, False)]
    # chunks of 1, 4 and 4 frames vs 9 at once: equal up to rounding (ops = the two conv fan-ins)
    assert_close_dtype(torch.cat(parts, dim=2), out, ops=fan_in_sum(res))


def test_causal_conv_pads_only_the_past():
    conv = _randomize(CausalConv3d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 5, 4, 4, dtype=torch.float64)
    expected = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), expected)
    y = x.clone()
    y[:, :, 3:] += 1.0
    # same shapes, so the same kernel in the same order: frames before the change are bit-identical
    assert torch.equal(conv(y)[:, :, :3], conv(x)[:, :, :3])


def test_resample_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown resample mode"):
        Resample(4, "upsample4d")
