"""What every way of running a lane offers its caller: sessions in, blocks out.

Two runners satisfy :class:`Runner`: :class:`pipeline_stages.sequential.SequentialRunner` (every stage
in one process, the reference) and :class:`pipeline_stages.tpp.TPPLane` (the stages as processes of a
TPP lane). A caller (``liveavatar generate``, the benchmarks) drives either through this protocol and
gets the same blocks for the same inputs and seed; :func:`open_runner` builds one or the other.

Both are context managers (the lane starts and stops its processes there; the sequential runner has
nothing to start) and run one session at a time::

    with open_runner(config, lane=False) as runner:
        init = runner.start_session(spec)          # MP4 init segment (b"" without packaging)
        for res in runner.generate(pcm):           # BlockResult per 0.48 s of audio, in order
            ...
        tail = runner.close_session()              # the last MP4 bytes
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from models.generator import GenerationOptions, LeadFn

if TYPE_CHECKING:
    import torch

    from models.liveavatar import LiveAvatarConfig
    from pipeline_stages.sink import SinkInputs


@dataclass
class SessionSpec:
    """What a session is made of: the reference image, a prompt, a seed and the method switches."""

    image_rgb: np.ndarray                 # uint8 [H, W, 3], any size (resized by the area rule)
    prompt: str = ""
    seed: int = 0
    options: GenerationOptions = field(default_factory=GenerationOptions)
    leads: LeadFn | Sequence[int] | None = None


@dataclass
class BlockResult:
    block_index: int
    latent: Tensor                        # [1, C, 3, h, w] final latent
    step_latents: list[Tensor]            # latent after each denoising step (empty where not kept)
    frames: Tensor                        # [12, H, W, 3] uint8
    audio: np.ndarray                     # the block's 7,680 PCM samples (16 kHz)
    fragment: bytes = b""                 # the block's fMP4 fragment (when packaging)


@runtime_checkable
class Runner(Protocol):
    """One session at a time through every stage of a lane: audio in, :class:`BlockResult` out, in order."""

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def start_session(self, spec: SessionSpec) -> bytes:
        """Encode the sink, prefill every stage; returns the MP4 init segment (b"" without packaging)."""
        ...

    def start_session_from_sink(self, sink: SinkInputs, size: tuple[int, int], spec: SessionSpec) -> bytes:
        """Like :meth:`start_session` with the sink already encoded (``size`` is the video's (H, W))."""
        ...

    def push_audio(self, pcm: np.ndarray) -> list[BlockResult]:
        """Feed 16 kHz mono float32 PCM of any length; returns the blocks finished so far, in order."""
        ...

    def collect(self, block: bool) -> list[BlockResult]:
        """The blocks finished since the last call; with ``block``, wait for the next unfinished one."""
        ...

    def finish(self) -> list[BlockResult]:
        """Zero-pad the last partial block and return every block not yet returned."""
        ...

    def generate(self, pcm: np.ndarray) -> Iterator[BlockResult]:
        """The whole audio, block by block, yielding each block as it is finished."""
        ...

    def close_session(self) -> bytes:
        """End the session; returns the last MP4 bytes (b"" without packaging)."""
        ...


def open_runner(config: LiveAvatarConfig, *, lane: bool, device: str = "cpu", dtype: torch.dtype | None = None,
                seed: int = 0, checkpoint: str | None = None, lora: str | None = None, threads: int = 1,
                decode_threads: int | None = None, package: bool = True, shape: str | None = None) -> Runner:
    """A runner for ``config``: a local TPP lane (``lane``) or the sequential runner, used as a context manager.

    ``seed`` seeds the weights when there is no checkpoint; ``threads`` is each lane rank's torch threads
    (the sequential runner uses the caller's), ``decode_threads`` the lane's decoder's; ``shape`` the lane's
    shape (``"4+1"`` when None; :class:`pipeline_stages.tpp.LaneShape`).
    """
    import torch

    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    if lane:
        from pipeline_stages.tpp import TPPLane

        return TPPLane(config, device=device, dtype=dtype, seed=seed, checkpoint=checkpoint, lora=lora,
                       threads_per_rank=threads, decode_threads=decode_threads, package=package, shape=shape)
    from models.liveavatar import build_models
    from pipeline_stages.sequential import SequentialRunner

    models = build_models(config, device=torch.device(device), dtype=dtype, seed=seed, checkpoint=checkpoint,
                          lora=lora)
    return SequentialRunner(models, package=package)
