"""wav2vec2 audio features for Live Avatar, per video frame, whole-file and streaming.

The frozen audio encoder is wav2vec2-large-xlsr-53-english (24 transformer layers, width 1024).
Live Avatar keeps **all** hidden states (the input to the first layer plus every layer's output:
25 states) and resamples them to the video rate (reference notes §1.4 step 1):

    16 kHz PCM -> wav2vec2 (320x conv downsampling) -> 50 Hz states  [L, T50, C]
               -> linear interpolation (align_corners=True) to 30 Hz  [L, C, T30]
               -> video frame k takes the 30 Hz vector nearest to time k / 25 s  [L, C, T_video]

Streaming (reference notes §4.5, §8.6): live audio is cut into blocks of 7,680 samples
(0.48 s = 12 video frames = 3 latent frames) and **each block is encoded alone**, exactly like the
reference's live path. So features for a block never depend on audio outside it, and a stream
needs no look-ahead and no whole file. :func:`encode_blocks` is the whole-file version of the same
split; :class:`StreamingAudioEncoder` gives bit-identical blocks for any chunking of the input.

Choices (documented deviations from the reference):

- Input normalisation: each encoded segment (a whole file in :meth:`Wav2VecAudioEncoder.encode`,
  a block in the streaming path) is normalised to zero mean / unit variance (eps 1e-7), which is
  what the wav2vec2 feature extractor does when the reference calls it on that segment.
- Frame sampling: as far as we can tell, the reference takes ``round(k * 30 / 25)`` and gives
  frames whose 30 Hz index falls past the end (``>= T30``) an all-zero feature. Because the conv
  stack loses ~0.02 s at the end (7,680 samples -> 23 frames at 50 Hz -> 13 at 30 Hz, while frame
  11 wants index 13), that would zero the **last frame of every 0.48 s block** encoded alone. Here
  the index is clamped to the last available 30 Hz vector instead, so no frame inside the audio
  gets zero features. Rounding is half-up (no ties occur for 30 / 25).
- ``pad_to_blocks``: the last partial block of a file (or of a stream at :meth:`flush`) is
  zero-padded with **silent PCM** up to 7,680 samples and encoded like any other block, so the
  output always covers whole blocks (12 frames each). The reference pads at the feature level
  instead (zero features for padded clips).
- Features are computed in the model's dtype and resampled in fp32; outputs are fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class AudioEncoderError(ValueError):
    """Bad audio-encoder input, config or model folder."""


class AudioModelFolderError(AudioEncoderError, FileNotFoundError):
    """The local wav2vec2 folder is missing or unusable (never fetched from the hub)."""


@dataclass(frozen=True)
class AudioEncoderConfig:
    """wav2vec2 encoder + resampling constants. Defaults: wav2vec2-large-xlsr-53-english at 16 kHz.

    The first group of fields uses the Hugging Face ``Wav2Vec2Config`` key names; the second group
    is the platform's timing: 16 kHz in, 30 Hz intermediate rate, 25 fps video, 12 frames per block.
    """

    # wav2vec2 architecture (HF config.json keys)
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = True
    feat_extract_norm: str = "layer"
    do_stable_layer_norm: bool = True
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    vocab_size: int = 33
    # platform timing
    sample_rate: int = 16000
    interp_rate: int = 30
    video_fps: int = 25
    block_frames: int = 12
    normalize_input: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_dim", tuple(self.conv_dim))
        object.__setattr__(self, "conv_kernel", tuple(self.conv_kernel))
        object.__setattr__(self, "conv_stride", tuple(self.conv_stride))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0:
            raise AudioEncoderError("conv_dim, conv_kernel and conv_stride must have the same non-zero length")
        if self.hidden_size % self.num_attention_heads:
            raise AudioEncoderError(
                f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if self.sample_rate % self.downsample:
            raise AudioEncoderError(f"sample_rate {self.sample_rate} not divisible by the conv stride product "
                                    f"{self.downsample}: the feature rate would not be an integer")
        if (self.block_frames * self.sample_rate) % self.video_fps:
            raise AudioEncoderError("block_frames * sample_rate must be divisible by video_fps")
        if self.interp_rate > self.feature_rate or self.video_fps > self.interp_rate:
            raise AudioEncoderError("rates must satisfy video_fps <= interp_rate <= feature_rate")

    @property
    def downsample(self) -> int:
        """Samples per wav2vec2 frame (320 = 5 * 2**6)."""
        return math.prod(self.conv_stride)

    @property
    def feature_rate(self) -> int:
        """wav2vec2 frame rate in Hz (50 at 16 kHz)."""
        return self.sample_rate // self.downsample

    @property
    def num_states(self) -> int:
        """Hidden states kept: the first layer's input plus every layer's output (25)."""
        return self.num_hidden_layers + 1

    @property
    def block_samples(self) -> int:
        """PCM samples per streaming block (7,680 = 0.48 s at 16 kHz)."""
        return self.block_frames * self.sample_rate // self.video_fps

    @classmethod
    def tiny(cls) -> AudioEncoderConfig:
        """CPU test preset: width 32, 4 layers, 16-channel conv stack with the same 320x downsampling."""
        return cls(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                   conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=8)

    def to_hf(self):
        """The matching ``transformers.Wav2Vec2Config`` (dropouts / layerdrop off: inference only)."""
        from transformers import Wav2Vec2Config

        hf_keys = {f.name for f in fields(self)} - {"sample_rate", "interp_rate", "video_fps", "block_frames",
                                                    "normalize_input"}
        kwargs = {k: getattr(self, k) for k in hf_keys}
        kwargs.update({k: list(kwargs[k]) for k in ("conv_dim", "conv_kernel", "conv_stride")})
        return Wav2Vec2Config(**kwargs, hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
                              feat_proj_dropout=0.0, layerdrop=0.0, apply_spec_augment=False,
                              mask_time_prob=0.0, mask_feature_prob=0.0)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> AudioEncoderConfig:
        """Architecture fields from a ``Wav2Vec2Config``; timing fields from ``overrides`` or defaults."""
        kwargs = {}
        for f in fields(cls):
            if f.name in overrides:
                kwargs[f.name] = overrides[f.name]
            elif hasattr(hf_config, f.name):
                kwargs[f.name] = getattr(hf_config, f.name)
        return cls(**kwargs)


def conv_output_length(config: AudioEncoderConfig, num_samples: int) -> int:
    """Number of wav2vec2 frames for ``num_samples`` input samples (valid convolutions)."""
    n = num_samples
    for k, s in zip(config.conv_kernel, config.conv_stride, strict=True):
        n = (n - k) // s + 1 if n >= k else 0
    return n


def min_samples(config: AudioEncoderConfig) -> int:
    """Fewest samples that give at least one 30 Hz vector (T30 = floor(T50 * 30 / 50) >= 1)."""
    t50 = -(-config.feature_rate // config.interp_rate)  # ceil(50 / 30) = 2 frames
    # invert the conv stack: frames -> samples
    n = t50
    for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
        n = (n - 1) * s + k
    return n


# ---------------------------------------------------------------------------------------------
# Pure resampling: 50 Hz hidden states -> one vector per video frame
# ---------------------------------------------------------------------------------------------


def nearest_interp_index(frame: int, interp_rate: int, video_fps: int) -> int:
    """Index of the intermediate-rate sample nearest to time ``frame / video_fps`` (half rounds up)."""
    return (2 * frame * interp_rate + video_fps) // (2 * video_fps)


def resample_to_video(states: torch.Tensor, num_frames: int, feature_rate: int = 50, interp_rate: int = 30,
                      video_fps: int = 25) -> torch.Tensor:
    """Hidden states at ``feature_rate`` -> one vector per video frame.

    Args:
        states: ``[L, T50, C]`` hidden states (any float dtype; computed in fp32).
        num_frames: video frames to produce.

    Returns:
        ``[L, C, num_frames]`` fp32.

    1. ``T30 = floor(T50 * interp_rate / feature_rate)``; linear interpolation with
       ``align_corners=True`` (first and last samples line up).
    2. Frame k takes 30 Hz index ``round(k * interp_rate / video_fps)`` clamped to ``T30 - 1``.
    """
    if states.dim() != 3:
        raise AudioEncoderError(f"states must be [L, T, C], got shape {tuple(states.shape)}")
    t50 = states.shape[1]
    t30 = t50 * interp_rate // feature_rate
    if t30 < 1:
        raise AudioEncoderError(f"{t50} feature frames are too few to resample to {interp_rate} Hz")
    if num_frames < 0:
        raise AudioEncoderError(f"num_frames must be >= 0, got {num_frames}")
    # 1. linear interpolation in time  [L, T50, C] -> [L, C, T50] -> [L, C, T30]
    x = states.float().transpose(1, 2)
    x = F.interpolate(x, size=t30, mode="linear", align_corners=True)
    # 2. nearest 30 Hz vector per video frame  [L, C, T30] -> [L, C, num_frames]
    idx = [min(nearest_interp_index(k, interp_rate, video_fps), t30 - 1) for k in range(num_frames)]
    return x[:, :, torch.tensor(idx, dtype=torch.long, device=x.device)]


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


def _as_pcm_tensor(wav, name: str = "wav") -> torch.Tensor:
    """Validate mono PCM (numpy or torch, 1-D) -> fp32 CPU-or-same-device tensor [N]."""
    if isinstance(wav, np.ndarray):
        if wav.dtype.kind != "f":
            raise AudioEncoderError(f"{name} must be float PCM in [-1, 1], got dtype {wav.dtype}")
        wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    elif isinstance(wav, torch.Tensor):
        if not wav.is_floating_point():
            raise AudioEncoderError(f"{name} must be float PCM in [-1, 1], got dtype {wav.dtype}")
        wav = wav.float()
    else:
        raise AudioEncoderError(f"{name} must be a numpy array or torch tensor, got {type(wav).__name__}")
    if wav.dim() != 1:
        raise AudioEncoderError(f"{name} must be mono [N], got shape {tuple(wav.shape)}")
    if wav.device.type != "meta" and not bool(torch.isfinite(wav).all()):
        raise AudioEncoderError(f"{name} contains NaN or inf samples")
    return wav


class Wav2VecAudioEncoder(nn.Module):
    """Frozen wav2vec2 (HF ``Wav2Vec2Model``) -> all hidden states -> per-video-frame features.

    Build with :meth:`random` (seeded random weights, e.g. the tiny config) or
    :meth:`from_pretrained` (a local HF folder such as ``wav2vec2-large-xlsr-53-english``).
    """

    def __init__(self, config: AudioEncoderConfig, wav2vec2: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.wav2vec2 = wav2vec2.eval()
        self.requires_grad_(False)

    @classmethod
    def random(cls, config: AudioEncoderConfig | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Wav2VecAudioEncoder:
        """Random weights drawn from ``seed`` (the global RNG state is left untouched)."""
        from transformers import Wav2Vec2Model

        config = config or AudioEncoderConfig.tiny()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Wav2Vec2Model(config.to_hf())
        return cls(config, model.to(dtype))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.bfloat16, **timing) -> Wav2VecAudioEncoder:
        """Load a local HF wav2vec2 CTC folder (``config.json`` + weights). Never touches the hub.

        ``timing`` may override the platform fields (``sample_rate``, ``video_fps``, ...).
        """
        from transformers import Wav2Vec2ForCTC

        folder = Path(folder)
        if not folder.is_dir():
            raise AudioModelFolderError(f"wav2vec2 model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise AudioModelFolderError(f"wav2vec2 model folder has no config.json: {folder}")
        try:
            ctc = Wav2Vec2ForCTC.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise AudioModelFolderError(f"cannot load wav2vec2 from {folder}: {exc}") from exc
        config = AudioEncoderConfig.from_hf(ctc.config, **timing)
        model = ctc.wav2vec2  # the CTC head (lm_head) is not used
        model.config.layerdrop = 0.0
        return cls(config, model.to(device))

    @property
    def _first_weight(self) -> torch.Tensor:
        return self.wav2vec2.feature_extractor.conv_layers[0].conv.weight

    @property
    def device(self) -> torch.device:
        return self._first_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_weight.dtype

    def normalize(self, wav: torch.Tensor) -> torch.Tensor:
        """Zero mean / unit variance per segment (eps 1e-7), in float64 then fp32. [N] -> [N]."""
        if not self.config.normalize_input:
            return wav
        w = wav.double()
        return ((w - w.mean()) / torch.sqrt(w.var(unbiased=False) + 1e-7)).float()

    @torch.no_grad()
    def hidden_states(self, wav) -> torch.Tensor:
        """Mono PCM ``[N]`` at ``sample_rate`` -> all hidden states ``[L, T50, C]`` in the model dtype."""
        wav = _as_pcm_tensor(wav)
        need = min_samples(self.config)
        if wav.shape[0] < need:
            raise AudioEncoderError(f"audio segment too short: {wav.shape[0]} samples, need >= {need}")
        # 1. normalise the segment  [N] -> [1, N]
        x = self.normalize(wav).to(device=self.device, dtype=self.dtype)[None]
        # 2. wav2vec2 with every hidden state  -> L x [1, T50, C]
        out = self.wav2vec2(x, output_hidden_states=True)
        # 3. stack  -> [L, T50, C]
        return torch.cat(out.hidden_states, dim=0)

    @torch.no_grad()
    def encode(self, wav, num_frames: int | None = None) -> torch.Tensor:
        """Encode one segment at once: ``[N]`` PCM -> ``[L, C, T_video]`` fp32.

        ``num_frames`` defaults to ``floor(N * video_fps / sample_rate)`` (12 for one 7,680-sample block).
        """
        cfg = self.config
        wav = _as_pcm_tensor(wav)
        if num_frames is None:
            num_frames = wav.shape[0] * cfg.video_fps // cfg.sample_rate
        states = self.hidden_states(wav)  # [L, T50, C]
        return resample_to_video(states, num_frames, cfg.feature_rate, cfg.interp_rate, cfg.video_fps)

    @torch.no_grad()
    def encode_block(self, block) -> torch.Tensor:
        """One streaming block of exactly ``block_samples`` samples -> ``[L, C, block_frames]``."""
        block = _as_pcm_tensor(block, "block")
        if block.shape[0] != self.config.block_samples:
            raise AudioEncoderError(f"a block must have {self.config.block_samples} samples, got {block.shape[0]}")
        return self.encode(block, self.config.block_frames)


def encode_blocks_batch(encoder: Wav2VecAudioEncoder, blocks: torch.Tensor) -> torch.Tensor:
    """Differentiable batch of streaming blocks (training): ``[N, block_samples]`` -> ``[N, L, C, block_frames]``.

    The same computation as :meth:`Wav2VecAudioEncoder.encode_block` on each row (per-row
    normalisation, wav2vec2, resampling to video frames), batched and without ``no_grad`` so the
    encoder can be trained with the DiT.
    """
    cfg = encoder.config
    if blocks.dim() != 2 or blocks.shape[1] != cfg.block_samples:
        raise AudioEncoderError(f"blocks must be [N, {cfg.block_samples}], got {tuple(blocks.shape)}")
    # 1. per-row zero mean / unit variance (as normalize(), in float64)  [N, S]
    x = blocks.double()
    if cfg.normalize_input:
        x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-7)
    x = x.float().to(device=encoder.device, dtype=encoder.dtype)
    # 2. every hidden state  L x [N, T50, C] -> [L, N, T50, C]
    states = torch.stack(encoder.wav2vec2(x, output_hidden_states=True).hidden_states, dim=0)
    n_layers, n, t50, c = states.shape
    # 3. resample each row to video frames  [L*N, T50, C] -> [L*N, C, F] -> [N, L, C, F]
    video = resample_to_video(states.reshape(n_layers * n, t50, c), cfg.block_frames, cfg.feature_rate,
                              cfg.interp_rate, cfg.video_fps)
    return video.view(n_layers, n, c, cfg.block_frames).transpose(0, 1)


def split_blocks(wav, block_samples: int, pad_to_blocks: bool = True) -> list[torch.Tensor]:
    """Cut PCM ``[N]`` into ``block_samples`` pieces; the last partial piece is zero-padded
    (``pad_to_blocks=True``) or dropped (``False``)."""
    wav = _as_pcm_tensor(wav)
    n_full = wav.shape[0] // block_samples
    blocks = [wav[i * block_samples:(i + 1) * block_samples] for i in range(n_full)]
    rest = wav[n_full * block_samples:]
    if pad_to_blocks and rest.numel():
        blocks.append(torch.cat([rest, rest.new_zeros(block_samples - rest.numel())]))
    return blocks


@torch.no_grad()
def encode_blocks(encoder: Wav2VecAudioEncoder, wav, pad_to_blocks: bool = True) -> torch.Tensor:
    """Whole-file counterpart of the streaming path: ``[N]`` -> ``[L, C, 12 * num_blocks]``.

    Splits exactly like :class:`StreamingAudioEncoder` (each 7,680-sample block encoded alone; the
    last partial block zero-padded when ``pad_to_blocks``) and concatenates the blocks in time.
    """
    cfg = encoder.config
    blocks = split_blocks(wav, cfg.block_samples, pad_to_blocks)
    if not blocks:
        return torch.zeros(cfg.num_states, cfg.hidden_size, 0)
    return torch.cat([encoder.encode_block(b) for b in blocks], dim=2)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


@dataclass
class AudioStreamState:
    """Per-session streaming state.

    Attributes:
        pending: samples received but not yet part of a full block (fewer than ``block_samples``).
        samples_received: total samples fed so far.
        blocks_emitted: blocks returned so far (the next block's index).
        finished: set by :meth:`StreamingAudioEncoder.flush`; no more input is accepted.
    """

    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    samples_received: int = 0
    blocks_emitted: int = 0
    finished: bool = False


class StreamingAudioEncoder:
    """Turns PCM arriving in arbitrary chunks into one feature block per 7,680 samples.

    Usage::

        stream = StreamingAudioEncoder(encoder)
        state = stream.new_state()
        for chunk in chunks:                  # any sizes, including 0
            for block in stream.feed(state, chunk):
                ...                           # block: [L, C, 12] fp32
        last = stream.flush(state)            # zero-padded final partial block, or None

    The output equals :func:`encode_blocks` on the concatenated input, bit for bit.
    """

    def __init__(self, encoder: Wav2VecAudioEncoder) -> None:
        self.encoder = encoder

    def new_state(self) -> AudioStreamState:
        return AudioStreamState()

    def feed(self, state: AudioStreamState, pcm) -> list[torch.Tensor]:
        """Append ``pcm`` ``[n]`` and return the blocks it completes (possibly none)."""
        if state.finished:
            raise AudioEncoderError("audio stream already flushed; start a new state")
        chunk = _as_pcm_tensor(pcm, "pcm").cpu().numpy()
        size = self.encoder.config.block_samples
        buf = np.concatenate([state.pending, chunk]) if state.pending.size else chunk
        n_full = buf.shape[0] // size
        blocks = [self.encoder.encode_block(torch.from_numpy(buf[i * size:(i + 1) * size].copy()))
                  for i in range(n_full)]
        state.pending = buf[n_full * size:].copy()
        state.samples_received += chunk.shape[0]
        state.blocks_emitted += n_full
        return blocks

    def flush(self, state: AudioStreamState) -> torch.Tensor | None:
        """End of stream: zero-pad the partial block (if any) to a full block and encode it."""
        if state.finished:
            raise AudioEncoderError("audio stream already flushed")
        state.finished = True
        if state.pending.size == 0:
            return None
        size = self.encoder.config.block_samples
        block = np.zeros(size, dtype=np.float32)
        block[: state.pending.size] = state.pending
        state.pending = np.zeros(0, dtype=np.float32)
        state.blocks_emitted += 1
        return self.encoder.encode_block(torch.from_numpy(block))
