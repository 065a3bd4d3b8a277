"""wav2vec2 audio features: resampling vs float64 numpy, streaming == whole-file, loading, bad input."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from models.audio_encoder import (
    AudioEncoderConfig,
    AudioEncoderError,
    AudioModelFolderError,
    StreamingAudioEncoder,
    Wav2VecAudioEncoder,
    encode_blocks,
    min_samples,
    nearest_interp_index,
    resample_to_video,
)
from services.common.examples import examples_dir

pytestmark = pytest.mark.unit

EXAMPLES = examples_dir()


def _numpy_resample_f64(states: np.ndarray, num_frames: int) -> np.ndarray:
    """Independent float64 version: np.interp on the 30 Hz grid, nearest 30 Hz sample per frame."""
    n_layers, t50, ch = states.shape
    t30 = int(Fraction(t50 * 30, 50))  # floor
    out = np.zeros((n_layers, ch, num_frames))
    for k in range(num_frames):
        j = min(int(Fraction(k * 30, 25) + Fraction(1, 2)), t30 - 1)  # nearest 30 Hz sample to t = k/25
        pos = 0.0 if t30 == 1 else j * (t50 - 1) / (t30 - 1)  # align_corners=True mapping into 50 Hz
        for layer in range(n_layers):
            for c in range(ch):
                out[layer, c, k] = np.interp(pos, np.arange(t50), states[layer, :, c])
    return out


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.set_num_threads(1)
    return Wav2VecAudioEncoder.random(AudioEncoderConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def speech_16k():
    """First ~3.7 s of a real example (24 kHz float WAV) decoded and resampled to 16 kHz."""
    from models.inputs import load_audio

    wav = load_audio(EXAMPLES / "cyclops_baker.wav", max_seconds=60)
    return wav[: 3 * 7680 + 5000]


def test_nearest_index_rule():
    for k in range(200):
        exact = Fraction(k * 30, 25)
        assert nearest_interp_index(k, 30, 25) == int(exact + Fraction(1, 2))
        assert abs(nearest_interp_index(k, 30, 25) - exact) <= Fraction(1, 2)


@pytest.mark.parametrize("t50,num_frames", [(23, 12), (50, 25), (101, 50), (2, 3), (300, 150)])
def test_resample_matches_float64_numpy(t50, num_frames):
    rng = np.random.default_rng(t50)
    states = rng.standard_normal((3, t50, 5))
    got = resample_to_video(torch.from_numpy(states).float(), num_frames)
    ref = _numpy_resample_f64(states.astype(np.float32).astype(np.float64), num_frames)
    assert got.shape == (3, 5, num_frames) and got.dtype == torch.float32
    # torch computes the source position j * (T50 - 1) / (T30 - 1) in fp32: ~1e-7 relative error of a
    # position up to 300 times neighbour differences of a few units -> up to ~2e-4 absolute
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=5e-4)


def test_resample_rejects_too_short():
    with pytest.raises(AudioEncoderError, match="too few"):
        resample_to_video(torch.zeros(2, 1, 4), 1)


def test_encode_block_matches_manual_pipeline(tiny_encoder, speech_16k):
    """Normalise in numpy float64, run the HF model, resample in numpy float64: same features."""
    cfg = tiny_encoder.config
    block = speech_16k[7680:2 * 7680]
    got = tiny_encoder.encode_block(block)
    assert got.shape == (cfg.num_states, cfg.hidden_size, cfg.block_frames) == (5, 32, 12)

    x = block.astype(np.float64)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    with torch.no_grad():
        out = tiny_encoder.wav2vec2(torch.from_numpy(x).float()[None], output_hidden_states=True)
    states = torch.cat(out.hidden_states).double().numpy()  # [L, T50, C]
    assert states.shape[1] == 23  # 7,680 samples -> 23 frames at 50 Hz
    np.testing.assert_allclose(got.numpy(), _numpy_resample_f64(states, 12), rtol=1e-4, atol=1e-5)


def test_streaming_equals_whole_file_bit_for_bit(tiny_encoder, speech_16k):
    cfg = tiny_encoder.config
    whole = encode_blocks(tiny_encoder, speech_16k, pad_to_blocks=True)
    n_blocks = -(-len(speech_16k) // cfg.block_samples)
    assert whole.shape == (5, 32, 12 * n_blocks)

    rng = np.random.default_rng(0)
    for trial in range(3):
        stream = StreamingAudioEncoder(tiny_encoder)
        state = stream.new_state()
        blocks, pos = [], 0
        while pos < len(speech_16k):
            size = int(rng.choice([0, 1, 333, 7679, 7680, 7681, 20000]))
            blocks += stream.feed(state, speech_16k[pos:pos + size])
            pos += size
            assert state.blocks_emitted == len(blocks) and len(state.pending) < cfg.block_samples
        last = stream.flush(state)
        assert last is not None
        blocks.append(last)
        streamed = torch.cat(blocks, dim=2)
        # exact: the stream and encode_blocks hand the same 7,680 samples of every block to the same
        # encode_block call (same shapes), so the same kernels run in the same order
        assert torch.equal(streamed, whole), f"trial {trial}"
        assert state.samples_received == len(speech_16k)


def test_pad_to_blocks_semantics(tiny_encoder, speech_16k):
    cfg = tiny_encoder.config
    wav = speech_16k[: 2 * cfg.block_samples + 1000]
    padded = encode_blocks(tiny_encoder, wav, pad_to_blocks=True)
    dropped = encode_blocks(tiny_encoder, wav, pad_to_blocks=False)
    assert padded.shape[2] == 36 and dropped.shape[2] == 24
    assert torch.equal(padded[:, :, :24], dropped)
    tail = np.zeros(cfg.block_samples, dtype=np.float32)
    tail[:1000] = wav[2 * cfg.block_samples:]
    assert torch.equal(padded[:, :, 24:], tiny_encoder.encode_block(tail))
    # a stream that ends exactly on a block boundary has nothing to flush
    stream = StreamingAudioEncoder(tiny_encoder)
    state = stream.new_state()
    assert len(stream.feed(state, wav[: cfg.block_samples])) == 1
    assert stream.flush(state) is None


def test_blocks_are_encoded_alone(tiny_encoder, speech_16k):
    """Changing audio in block 0 leaves block 1's features untouched (no cross-block context)."""
    wav = speech_16k[: 2 * 7680].copy()
    a = encode_blocks(tiny_encoder, wav)
    wav[:7680] = np.random.default_rng(1).standard_normal(7680).astype(np.float32) * 0.3
    b = encode_blocks(tiny_encoder, wav)
    assert torch.equal(a[:, :, 12:], b[:, :, 12:])  # block 1 alone, same samples and shapes: exact
    assert not torch.allclose(a[:, :, :12], b[:, :, :12])


def test_whole_file_encode_shape_and_rate(tiny_encoder, speech_16k):
    out = tiny_encoder.encode(speech_16k)  # one pass over the whole segment
    assert out.shape == (5, 32, len(speech_16k) * 25 // 16000)
    assert torch.isfinite(out).all()


def test_determinism_and_seed(speech_16k):
    block = speech_16k[:7680]
    a = Wav2VecAudioEncoder.random(seed=3).encode_block(block)
    b = Wav2VecAudioEncoder.random(seed=3).encode_block(block)
    c = Wav2VecAudioEncoder.random(seed=4).encode_block(block)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_real_config_on_meta():
    cfg = AudioEncoderConfig()
    assert (cfg.num_states, cfg.hidden_size, cfg.feature_rate, cfg.block_samples) == (25, 1024, 50, 7680)
    assert min_samples(cfg) == 720
    with torch.device("meta"):
        enc = Wav2VecAudioEncoder.random(cfg)
    n_params = sum(p.numel() for p in enc.parameters())
    assert 3.1e8 < n_params < 3.2e8  # wav2vec2-large: ~315 M without the CTC head
    assert enc.wav2vec2.config.num_hidden_layers == 24
    feats = enc.encode(torch.zeros(7680, device="meta"))
    assert feats.shape == (25, 1024, 12)


def test_from_pretrained_local_folder(tmp_path, speech_16k):
    from transformers import Wav2Vec2ForCTC

    cfg = AudioEncoderConfig.tiny()
    torch.manual_seed(11)
    ctc = Wav2Vec2ForCTC(cfg.to_hf()).eval()
    ctc.save_pretrained(tmp_path / "w2v")
    enc = Wav2VecAudioEncoder.from_pretrained(tmp_path / "w2v", dtype=torch.float32)
    assert enc.config == cfg
    ref = Wav2VecAudioEncoder(cfg, ctc.wav2vec2)
    block = speech_16k[:7680]
    assert torch.equal(enc.encode_block(block), ref.encode_block(block))


def test_missing_model_folder_is_clear(tmp_path):
    with pytest.raises(AudioModelFolderError, match="not found.*nowhere"):
        Wav2VecAudioEncoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioModelFolderError, match="no config.json"):
        Wav2VecAudioEncoder.from_pretrained(tmp_path / "empty")
    assert issubclass(AudioModelFolderError, ValueError)


def test_bad_audio_inputs(tiny_encoder):
    with pytest.raises(AudioEncoderError, match="too short"):
        tiny_encoder.encode(np.zeros(719, dtype=np.float32))
    with pytest.raises(AudioEncoderError, match="NaN or inf"):
        tiny_encoder.encode(np.full(8000, np.nan, dtype=np.float32))
    with pytest.raises(AudioEncoderError, match="float PCM"):
        tiny_encoder.encode(np.zeros(8000, dtype=np.int16))
    with pytest.raises(AudioEncoderError, match="mono"):
        tiny_encoder.encode(np.zeros((2, 8000), dtype=np.float32))
    with pytest.raises(AudioEncoderError, match="7680 samples"):
        tiny_encoder.encode_block(np.zeros(7000, dtype=np.float32))
    stream = StreamingAudioEncoder(tiny_encoder)
    state = stream.new_state()
    stream.flush(state)
    with pytest.raises(AudioEncoderError, match="already flushed"):
        stream.feed(state, np.zeros(10, dtype=np.float32))
