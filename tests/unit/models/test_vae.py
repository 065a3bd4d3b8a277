"""Wan2.1 VAE: streaming vs full decode, causality, state size, real-size layout, bad input.

All numerical tests use ``VAEConfig.tiny()`` at 32x32 pixels (4x4 latents) with randomized weights
(every parameter perturbed, so zero-initialized projections and unit gammas are exercised too).

Which comparisons are exact (see tests/numerics.py):

* Streamed vs one-shot, or a prefix vs the whole clip, run the convolutions on time axes of other
  lengths. The CPU kernels (MKL's GEMM behind float64 conv3d, oneDNN in float32) choose their
  blocking, and so the summation order, by tensor size and by CPU. The results then agree to
  rounding only: on an AVX-512 AMD EPYC a float64 chunked decode differs from the one-shot decode
  by ~1e-14 (out of 3.9), while with ``MKL_CBWR=COMPATIBLE`` the two are bit-identical. They are
  checked in float64 with the bound ``ops * eps * max|expected|`` (``DECODE_OPS`` / ``ENCODE_OPS``,
  counted below), about 4e-12 relative; a negative control shows that a cache kept in float32, or
  one output value off by a single float32 rounding step, fails that check.
* Two calls with tensors of the same shapes run the same kernels in the same order, so an output
  whose inputs did not change is bit-identical (``torch.equal``): the causality checks perturb
  later inputs at an unchanged length.
"""

from __future__ import annotations

import pytest
import torch

from models.vae import DecoderState, VAEConfig, VAEInputError, WanVAE
from models.vae_blocks import AttentionBlock, RMSNorm
from tests.numerics import assert_close_dtype, fan_in_sum

pytestmark = pytest.mark.unit

LATENT_HW = 4  # latent height/width in the numerical tests (32x32 pixels)


def _op_count(*parts: torch.nn.Module) -> int:
    """The op-count factor (tests/numerics.py) of one pass through ``parts``: every conv fan-in, the
    channel sum of every RMS norm, and per attention block its q.k sum over C plus the softmax and
    attention-weighted sums over the frame's positions (the latent grid, LATENT_HW**2)."""
    ops = 0
    for part in parts:
        ops += fan_in_sum(part)
        for sub in part.modules():
            if isinstance(sub, RMSNorm):
                ops += sub.gamma.shape[0]
            elif isinstance(sub, AttentionBlock):
                ops += sub.proj.in_channels + 2 * LATENT_HW**2
    return ops


with torch.device("meta"):  # only the layer sizes are needed
    _TINY = WanVAE(VAEConfig.tiny())
DECODE_OPS = _op_count(_TINY.conv2, _TINY.decoder)  # ~2.0e4 for the tiny config
ENCODE_OPS = _op_count(_TINY.encoder, _TINY.conv1)  # ~1.5e4
del _TINY


def _tiny_vae(dtype: torch.dtype = torch.float64, seed: int = 0) -> WanVAE:
    # Module-scoped fixtures run before the autouse per-test thread setting; the thread count
    # changes CPU reduction order, so pin it here too for the exact comparisons.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    vae = WanVAE(VAEConfig.tiny()).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae.to(dtype)


def _stream_decode(vae: WanVAE, z: torch.Tensor, chunks: tuple[int, ...]) -> torch.Tensor:
    assert sum(chunks) == z.shape[2]
    state = vae.init_decode_state()
    outs, start = [], 0
    for n in chunks:
        frames = vae.decode_step(z[:, :, start : start + n], state, clamp=False)
        expected_frames = 1 + 4 * (n - 1) if start == 0 else 4 * n
        assert frames.shape[2] == expected_frames
        outs.append(frames)
        start += n
        assert state.latents_decoded == start
    return torch.cat(outs, dim=2)


@pytest.fixture(scope="module")
def vae64() -> WanVAE:
    return _tiny_vae(torch.float64)


@pytest.fixture(scope="module")
def latents64() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 16, LATENT_HW, LATENT_HW, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def full64(vae64: WanVAE, latents64: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae64.decode(latents64, clamp=False)


# ---------------------------------------------------------------- streaming decode


@pytest.mark.parametrize("chunks", [(7, 3, 3, 3), (1,) * 16, (2, 5, 9)], ids=["7-3-3-3", "1x16", "2-5-9"])
def test_streaming_decode_matches_full_decode_float64(vae64, latents64, full64, chunks):
    with torch.no_grad():
        streamed = _stream_decode(vae64, latents64, chunks)
    assert full64.shape == (1, 3, 1 + 4 * 15, 8 * LATENT_HW, 8 * LATENT_HW)
    # other time-axis lengths -> other kernel blocking: equal up to rounding, not bit for bit
    assert_close_dtype(streamed, full64, ops=DECODE_OPS, msg=f"chunks {chunks}")


def test_decode_tolerance_fails_on_a_float32_cache_and_on_one_wrong_value(vae64, latents64, full64):
    """Negative controls for the check above: realistic small bugs are far outside its tolerance."""
    with torch.no_grad():
        state = vae64.init_decode_state()
        outs = []
        for start, n in ((0, 7), (7, 3), (10, 3), (13, 3)):
            outs.append(vae64.decode_step(latents64[:, :, start : start + n], state, clamp=False))
            # the bug: the carried frames lose precision between chunks (a cache of the wrong dtype)
            state.conv_caches[:] = [t.float().double() for t in state.conv_caches]
        f32_cache = torch.cat(outs, dim=2)
        good = _stream_decode(vae64, latents64, (7, 3, 3, 3))
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_close_dtype(f32_cache, full64, ops=DECODE_OPS)
    # one value of a correct stream off by one float32 rounding step at the output's scale
    wrong = good.clone()
    wrong[0, 1, 30, 7, 9] += torch.finfo(torch.float32).eps * full64.abs().max()
    with pytest.raises(AssertionError, match="Mismatched elements: 1 / "):
        assert_close_dtype(wrong, full64, ops=DECODE_OPS)
    assert_close_dtype(good, full64, ops=DECODE_OPS)


def test_streaming_decode_float32_matches_within_rounding():
    vae = _tiny_vae(torch.float32)
    z = torch.randn(1, 16, 10, LATENT_HW, LATENT_HW)
    with torch.no_grad():
        full = vae.decode(z, clamp=False)
        streamed = _stream_decode(vae, z, (7, 3))
    # Same math; only the CPU kernels' summation order differs with the chunk length.
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_decode_is_causal_prefix_and_later_latents_do_not_leak(vae64, latents64, full64):
    k = 5
    with torch.no_grad():
        prefix = vae64.decode(latents64[:, :, :k], clamp=False)
        changed = latents64.clone()
        changed[:, :, k:] += 1.0
        decoded_changed = vae64.decode(changed, clamp=False)
    n_frames = 1 + 4 * (k - 1)
    # a shorter time axis than the full decode: equal up to rounding
    assert_close_dtype(prefix, full64[:, :, :n_frames], ops=DECODE_OPS)
    # same shapes as the full decode, so the same kernels in the same order: the frames whose
    # latents did not change are bit-identical
    assert torch.equal(decoded_changed[:, :, :n_frames], full64[:, :, :n_frames])
    # latent k feeds the very next frame group
    assert not torch.allclose(decoded_changed[:, :, n_frames], full64[:, :, n_frames])


def test_decode_state_size_is_constant_and_holds_no_views(vae64):
    g = torch.Generator().manual_seed(2)
    state = vae64.init_decode_state()
    sizes = []
    with torch.no_grad():
        for step in range(12):
            n = 1 if step < 6 else 3
            z = torch.randn(1, 16, n, 2, 2, generator=g, dtype=torch.float64)
            vae64.decode_step(z, state)
            sizes.append(state.nbytes())
    assert state.latents_decoded == 6 + 6 * 3
    assert len(state.conv_caches) == vae64.num_decoder_caches
    assert all(t is not None for t in state.conv_caches)
    assert sizes[1] > 0 and all(s == sizes[1] for s in sizes[1:]), sizes
    for t in state.conv_caches:
        # each cache is its own small tensor, not a view keeping a whole activation alive
        assert t.shape[2] == 2
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_decode_state_is_explicit_dataclass(vae64):
    state = vae64.init_decode_state()
    assert isinstance(state, DecoderState)
    assert state.first_chunk and state.latents_decoded == 0 and state.nbytes() == 0


# ---------------------------------------------------------------- encode


def test_encode_shape_and_causality(vae64):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 13, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z = vae64.encode(video)
        assert z.shape == (2, 16, 4, 4, 4)
        # frames 1..4 -> latent 1, frames 5..8 -> latent 2: perturbing frame 5 keeps latents 0, 1
        late = video.clone()
        late[:, :, 5] = -late[:, :, 5]
        z_late = vae64.encode(late)
        # perturbing frame 4 keeps latent 0 only; frame 0 alone makes latent 0
        mid = video.clone()
        mid[:, :, 4] = -mid[:, :, 4]
        z_mid = vae64.encode(mid)
        first_only = vae64.encode(video[:, :, :1])
    # same video shape as z: same kernels in the same order, so unchanged latents are bit-identical
    assert torch.equal(z_late[:, :, :2], z[:, :, :2])
    assert not torch.allclose(z_late[:, :, 2], z[:, :, 2])
    assert torch.equal(z_mid[:, :, :1], z[:, :, :1])
    assert not torch.allclose(z_mid[:, :, 1], z[:, :, 1])
    # one frame instead of 13: other kernel blocking, equal up to rounding
    assert_close_dtype(first_only, z[:, :, :1], ops=ENCODE_OPS)


def test_streaming_encode_matches_full_encode(vae64):
    g = torch.Generator().manual_seed(4)
    video = torch.rand(1, 3, 17, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        full = vae64.encode(video)
        state = vae64.init_encode_state()
        parts = [
            vae64.encode_step(video[:, :, :5], state),  # 1 + 4 frames -> 2 latents
            vae64.encode_step(video[:, :, 5:9], state),  # 4 frames -> 1 latent
            vae64.encode_step(video[:, :, 9:], state),  # 8 frames -> 2 latents
        ]
    assert [p.shape[2] for p in parts] == [2, 1, 2]
    assert state.frames_encoded == 17
    # chunks of 5, 4 and 8 frames vs 17 at once: equal up to rounding, not bit for bit
    assert_close_dtype(torch.cat(parts, dim=2), full, ops=ENCODE_OPS)


def test_encode_normalizes_with_the_configured_statistics(vae64):
    # encode() = (raw posterior mean - mean) / std; undo it with the config's constants
    video = torch.zeros(1, 3, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        z = vae64.encode(video)
        raw = vae64.conv1(vae64.encoder(video))[:, :16]
    cfg = vae64.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z * std + mean, raw)
    torch.testing.assert_close(vae64.denormalize(vae64.normalize(raw)), raw)


def test_roundtrip_shapes_and_clamp():
    vae = _tiny_vae(torch.float32)
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        out = vae.decode(z)
    assert z.shape == (2, 16, 3, 4, 6) and z.dtype == torch.float32
    assert out.shape == video.shape
    assert out.min() >= -1.0 and out.max() <= 1.0


# ---------------------------------------------------------------- real-size layout


def test_real_config_on_meta_matches_official_sizes():
    cfg = VAEConfig()
    assert cfg.z_dim == 16 and cfg.stride == (4, 8, 8) and len(cfg.latents_mean) == 16
    with torch.device("meta"):
        vae = WanVAE(cfg)
    assert all(p.is_meta for p in vae.parameters())
    total = sum(p.numel() for p in vae.parameters())
    decoder = sum(p.numel() for p in vae.decoder.parameters())
    assert abs(total - 126.9e6) < 0.1e6, total
    assert abs(decoder - 73.3e6) < 0.1e6, decoder
    sd = vae.state_dict()
    prefixes = ("encoder.conv1.", "encoder.downsamples.", "encoder.middle.", "encoder.head.",
                "conv1.", "conv2.", "decoder.conv1.", "decoder.middle.", "decoder.upsamples.", "decoder.head.")  # fmt: skip
    assert all(k.startswith(prefixes) for k in sd), [k for k in sd if not k.startswith(prefixes)]
    expected_shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.8.resample.1.weight": (384, 384, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.residual.2.weight": (384, 192, 3, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.upsamples.11.time_conv.weight" not in sd  # last upsample is spatial only
    assert "latents_mean" not in sd  # normalization constants are not checkpoint tensors


def test_tiny_config_keeps_latent_space():
    tiny = VAEConfig.tiny()
    assert tiny.z_dim == VAEConfig().z_dim and tiny.stride == VAEConfig().stride
    with pytest.raises(ValueError, match="unknown config keys"):
        VAEConfig.from_dict({"dim": 8, "temporal_downsample": [False, True, True]})
    with pytest.raises(ValueError, match="temperal_downsample"):
        VAEConfig(temperal_downsample=(True,))


def test_narrow_decoder_keeps_the_encoder_and_streams_like_its_full_decode():
    """``decoder_dim`` (v5's 8 beside an encoder of 12) narrows the decoder alone: the encoder's weights
    and so its latents are those of the full-width VAE, the decoder has fewer parameters, and its
    streaming decode matches its one-shot decode to float64 rounding."""
    wide = VAEConfig.tiny()
    narrow = VAEConfig(**{**wide.__dict__, "decoder_dim": wide.dim // 2})
    assert narrow.dec_dim == wide.dim // 2 and wide.dec_dim == wide.dim
    with torch.device("meta"):
        a, b = WanVAE(wide), WanVAE(narrow)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(a.encoder) == shapes(b.encoder) and shapes(a.conv1) == shapes(b.conv1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 3.0 < count(a.decoder) / count(b.decoder) < 4.5     # conv weights scale with the width squared
    assert VAEConfig.from_dict({k: v for k, v in wide.__dict__.items() if k != "decoder_dim"}) == wide
    assert VAEConfig.from_dict(dict(narrow.__dict__)) == narrow
    with pytest.raises(ValueError, match="decoder_dim must be > 0"):
        VAEConfig(decoder_dim=0)
    with pytest.raises(ValueError, match="even"):
        VAEConfig(dim=8, decoder_dim=3)

    torch.set_num_threads(1)
    torch.manual_seed(2)
    vae = WanVAE(narrow).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vae = vae.double()
    z = torch.randn(1, 16, 7, LATENT_HW, LATENT_HW, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        full = vae.decode(z, clamp=False)
        streamed = _stream_decode(vae, z, (1, 3, 3))
    assert_close_dtype(streamed, full, ops=_op_count(vae.conv2, vae.decoder), msg="narrow decoder")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 4, 5, 32, 32), "channels"),
        ((1, 3, 5, 30, 32), "multiples of 8"),
        ((1, 3, 5, 32, 36), "multiples of 8"),
        ((1, 3, 6, 32, 32), "1 \\+ 4k"),
        ((3, 5, 32, 32), "\\[B, C, T, H, W\\]"),
    ],
)
def test_encode_rejects_bad_shapes(shape, message):
    vae = WanVAE(VAEConfig.tiny())
    with pytest.raises(VAEInputError, match=message):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latents():
    vae = WanVAE(VAEConfig.tiny())
    assert issubclass(VAEInputError, ValueError)
    with pytest.raises(ValueError, match="16 latent channels"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="latent tensor"):
        vae.decode(torch.zeros(16, 2, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        vae.decode(torch.zeros(1, 16, 0, 4, 4))
    state = vae.init_decode_state()
    with torch.no_grad():
        vae.decode_step(torch.zeros(1, 16, 1, 2, 2), state)
    with pytest.raises(ValueError, match="differs from the stream"):
        vae.decode_step(torch.zeros(1, 16, 1, 3, 2), state)


def test_encode_step_rejects_misaligned_chunks():
    vae = WanVAE(VAEConfig.tiny())
    state = vae.init_encode_state()
    with pytest.raises(ValueError, match="first chunk must hold 1 \\+ 4k"):
        vae.encode_step(torch.zeros(1, 3, 4, 16, 16), state)
    with torch.no_grad():
        vae.encode_step(torch.zeros(1, 3, 1, 16, 16), state)
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode_step(torch.zeros(1, 3, 5, 16, 16), state)
    with pytest.raises(ValueError, match="differs from the stream"):
        vae.encode_step(torch.zeros(1, 3, 4, 16, 24), state)
