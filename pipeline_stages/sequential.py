"""The sequential runner: every stage of a lane, in order, in one process.

It is the reference the TPP lane is compared against, and what ``liveavatar generate`` runs without
``--tpp``. For each completed 0.48 s of audio it runs::

    audio stage -> denoise-0 -> denoise-1 -> denoise-2 -> denoise-3 -> decode -> package

and hands back a :class:`BlockResult` (final latent, latent after each step, frames, MP4 fragment).
Audio may arrive in any chunk size (a live feed); the output does not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from models.generator import LiveAvatarGenerator, anchor_from_block, block_noise
from models.liveavatar import LiveAvatarModels
from models.scheduler import FlowMatchScheduler
from pipeline_stages.audio_stage import AudioStage, BlockPcm
from pipeline_stages.decode_stage import DecodeStage
from pipeline_stages.denoise_stage import DenoiseStage
from pipeline_stages.package_stage import PackageStage, make_package_stage
from pipeline_stages.runner import BlockResult, SessionSpec
from pipeline_stages.sink import SinkInputs, prepare_sink

__all__ = ["BlockResult", "SequentialRunner", "SessionSpec", "generate_blocks"]


class SequentialRunner:
    """One session at a time through all stages in one process (a :class:`~pipeline_stages.runner.Runner`)."""

    def __init__(self, models: LiveAvatarModels, package: bool = True):
        self.models = models
        self.generator = LiveAvatarGenerator(models.dit, FlowMatchScheduler(models.config.scheduler))
        self.audio = AudioStage(models.audio)
        self.denoise = [DenoiseStage(self.generator, i) for i in range(self.generator.num_steps)]
        self.decode = DecodeStage(models.vae)
        self.package_enabled = package
        self.package: PackageStage | None = None
        self.spec: SessionSpec | None = None
        self.size: tuple[int, int] | None = None
        self.sink: SinkInputs | None = None
        self.next_block = 0
        self._pcm = BlockPcm(self.audio.block_samples)

    # ---- lifecycle (nothing to start or stop: the same shape as the TPP lane's) ------------------
    def __enter__(self) -> SequentialRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    # ---- session ----------------------------------------------------------------------------
    def start_session(self, spec: SessionSpec) -> bytes:
        """Prefill every stage; returns the MP4 init segment (empty without packaging)."""
        sink, size = prepare_sink(self.models, spec)
        return self.start_session_from_sink(sink, size, spec)

    def start_session_from_sink(self, sink: SinkInputs, size: tuple[int, int], spec: SessionSpec) -> bytes:
        """Prefill every stage from an encoded sink; ``size`` is the video's (H, W)."""
        self.spec, self.sink, self.size = spec, sink, size
        for stage in self.denoise:
            stage.start_session(sink, spec.seed, spec.options, spec.leads)
        self.decode.start_session(sink.motion_latents)
        self.audio.start_session()
        self.next_block = 0
        self._pcm = BlockPcm(self.audio.block_samples)
        if self.package_enabled:
            cfg = self.models.config
            self.package = make_package_stage(size[1], size[0], cfg.fps, cfg.audio.block_frames,
                                              tiny=size[0] * size[1] <= 128 * 128)
        return self.package.init_segment() if self.package is not None else b""

    # ---- audio in, blocks out ---------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray) -> list[BlockResult]:
        """Feed 16 kHz mono float32 PCM; runs and returns every block it completes."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._pcm.push(pcm)
        return [self._run(feats) for feats in self.audio.push(pcm)]

    def collect(self, block: bool) -> list[BlockResult]:
        """Always empty: :meth:`push_audio` returns every block it completes at once."""
        return []

    def finish(self) -> list[BlockResult]:
        """Zero-pad the last partial block of audio and run it."""
        self._pcm.pad_partial()
        return [self._run(feats) for feats in self.audio.flush()]

    def generate(self, pcm: np.ndarray) -> Iterator[BlockResult]:
        """The whole audio, fed one block at a time, yielding each block as it is made."""
        n = self.audio.block_samples
        for i in range(0, len(pcm), n):
            yield from self.push_audio(pcm[i:i + n])
        yield from self.finish()

    def close_session(self) -> bytes:
        """The packager's last bytes (empty without packaging)."""
        return self.package.close() if self.package is not None else b""

    def run_block(self, block_index: int, audio_features: Tensor, noise: Tensor | None = None) -> Tensor:
        """Denoise one block through the 4 stages in order; returns its final latent."""
        spec = self.spec
        if noise is None:
            dit = self.models.dit
            noise = block_noise(spec.seed, block_index, self.generator.noise_shape(self.denoise[0].session),
                                dit.dtype, dit.device)
        x = noise
        steps = []
        for stage in self.denoise:
            x = stage.run(block_index, x, audio_features)
            steps.append(x)
        anchor = anchor_from_block(block_index, x)
        if anchor is not None:
            for stage in self.denoise:
                stage.set_anchor(anchor)
        self._last_steps = steps
        return x

    def _run(self, features: Tensor) -> BlockResult:
        b = self.next_block
        latent = self.run_block(b, features)
        frames = self.decode.run(latent)
        audio = self._pcm.take(b)
        fragment = self.package.push_block(frames.numpy(), audio) if self.package is not None else b""
        self.next_block += 1
        return BlockResult(b, latent, list(self._last_steps), frames, audio, fragment)


@torch.no_grad()
def generate_blocks(models: LiveAvatarModels, spec: SessionSpec, pcm: np.ndarray, chunk: int | None = None,
                    package: bool = False) -> list[BlockResult]:
    """Convenience: the whole audio through a fresh sequential runner (``chunk`` samples at a time)."""
    runner = SequentialRunner(models, package=package)
    runner.start_session(spec)
    step = chunk or runner.audio.block_samples
    out = []
    for i in range(0, len(pcm), step):
        out.extend(runner.push_audio(pcm[i:i + step]))
    out.extend(runner.finish())
    return out
