"""The audio stage: 16 kHz mono PCM in (any chunk size), one block of wav2vec2 features out per 0.48 s.

Each block's 7,680 samples are encoded alone, as the reference's live path does, so live audio never
needs the whole file and the output does not depend on how the PCM was chunked.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from torch import Tensor

from models.audio_encoder import AudioEncoderConfig, AudioStreamState, StreamingAudioEncoder


class BlockEncoder(Protocol):
    """What the stage encodes a block with: :class:`~models.audio_encoder.Wav2VecAudioEncoder` in
    process, or a service's adapter around a remote backend (the transport is injected).

    ``encode_block``: float32 ``[block_samples]`` -> ``[layers, audio_dim, block_frames]``.
    """

    config: AudioEncoderConfig

    def encode_block(self, block: Tensor) -> Tensor: ...


class AudioStage:
    """PCM -> per-block features ``[1, layers, audio_dim, 12]``, with explicit per-session state."""

    name = "audio"

    def __init__(self, encoder: BlockEncoder):
        self.streaming = StreamingAudioEncoder(encoder)
        self.state: AudioStreamState | None = None

    @property
    def block_samples(self) -> int:
        return self.streaming.encoder.config.block_samples

    def start_session(self) -> None:
        self.state = self.streaming.new_state()

    def push(self, pcm: np.ndarray) -> list[Tensor]:
        """Feed PCM (float32, 16 kHz, mono); returns the blocks completed by it, in order."""
        if self.state is None:
            raise RuntimeError("audio: no session started")
        return [f[None] for f in self.streaming.feed(self.state, pcm)]

    def flush(self) -> list[Tensor]:
        """Zero-pad and emit the last partial block, if any."""
        if self.state is None:
            raise RuntimeError("audio: no session started")
        last = self.streaming.flush(self.state)
        return [] if last is None else [last[None]]


class BlockPcm:
    """The PCM of blocks not yet handed out, in order, in constant memory.

    Runners keep each block's samples to mux them with its frames; a stream may run for hours, so
    samples are dropped as soon as their block is taken.
    """

    def __init__(self, block_samples: int, first_block: int = 0):
        self.block_samples = block_samples
        self.buf = np.zeros(0, dtype=np.float32)
        self.next_block = first_block         # block whose samples start buf

    def push(self, pcm: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, np.asarray(pcm, dtype=np.float32).reshape(-1)])

    def pad_partial(self) -> None:
        """Zero-pad a trailing partial block (the audio stage pads its features the same way)."""
        rest = len(self.buf) % self.block_samples
        if rest:
            self.buf = np.concatenate([self.buf, np.zeros(self.block_samples - rest, dtype=np.float32)])

    def take(self, block_index: int) -> np.ndarray:
        """The samples of ``block_index``, which must be the next block."""
        if block_index != self.next_block:
            raise ValueError(f"block {block_index} taken out of order (next is {self.next_block})")
        n = self.block_samples
        out, self.buf = self.buf[:n], self.buf[n:]
        self.next_block += 1
        return out
