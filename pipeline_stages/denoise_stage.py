"""One TPP denoising stage: a fixed step index, its own KV cache, one Euler step per block.

Pure compute: no I/O. A lane runs 4 of these (one per step, one per GPU) plus a decode stage; the
sequential runner runs all of them in one process. Both paths call exactly the same methods.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from models.generator import GenerationOptions, GeneratorSession, LeadFn, LiveAvatarGenerator
from pipeline_stages.sink import SinkInputs


class DenoiseStage:
    """Denoising step ``step`` for one session at a time."""

    def __init__(self, generator: LiveAvatarGenerator, step: int):
        if not 0 <= step < generator.num_steps:
            raise ValueError(f"step must be in 0..{generator.num_steps - 1}, got {step}")
        self.generator = generator
        self.step = step
        self.session: GeneratorSession | None = None

    @property
    def name(self) -> str:
        return f"denoise-{self.step}"

    def start_session(self, sink: SinkInputs, seed: int, options: GenerationOptions | None = None,
                      leads: LeadFn | Sequence[int] | None = None) -> None:
        """Prefill the sink and start empty caches (a session switch resets everything)."""
        self.session = self.generator.start(sink.ref_latent, sink.motion_latents, sink.text_context, seed,
                                            options=options, leads=leads, steps=[self.step])

    def end_session(self) -> None:
        self.session = None

    def needs_anchor(self, block_index: int) -> bool:
        """True when this block cannot run until the re-anchor latent has arrived."""
        s = self._require()
        return self.generator.reanchor_due(s, block_index) and s.anchor_latent is None

    def set_anchor(self, anchor: Tensor) -> None:
        """Record the re-anchor latent [B, C, 1, h, w] (:func:`models.generator.anchor_from_block`)."""
        self.generator.set_anchor(self._require(), anchor)

    def run(self, block_index: int, x: Tensor, audio: Tensor) -> Tensor:
        """x [B, C, F, h, w] at sigma[step] -> the same block at sigma[step + 1]."""
        s = self._require()
        self.generator.prepare_block(s, block_index)
        out = self.generator.denoise_step(s, self.step, block_index, x, audio)
        s.block_index = block_index + 1
        return out

    def _require(self) -> GeneratorSession:
        if self.session is None:
            raise RuntimeError(f"{self.name}: no session started")
        return self.session
