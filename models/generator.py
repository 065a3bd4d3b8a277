"""Streaming generation with the causal DiT: the documented Python API of the Live Avatar method.

One session streams 3-latent-frame blocks, one after another, each denoised in 4 flow-matching Euler
steps. Everything a session needs lives in a :class:`GeneratorSession`:

- ``kv[i]``: the KV ring buffer of denoising step ``i`` ("timestep forcing": step i's cache holds the
  K/V of its *own* noisy inputs at its own timestep, never a clean re-encoding);
- ``sink``: the un-roped K/V of the cond tokens (reference latent + FramePack motion latents). It is
  the same for every step (cond tokens always use t = 0), so one copy serves all four;
- the text embedding, computed once per session;
- ``block_index`` and the re-anchoring state.

The rolling sink frame (RSFM), as the reference does it:

1. prefill the sink from the user's reference latent;
2. on every forward, move the reference's RoPE time index to ``lead`` latent frames ahead of the
   current block, ``lead`` drawn from ``[4, 30]`` by a seeded, counter-based generator
   (:func:`models.dit.draw_sink_lead`: a pure function of (seed, frame, step), so a sequential run and
   every TPP stage draw the same value), or taken from a sequence the caller gives;
3. after the first clip (``reanchor_block`` = 4 blocks), re-prefill the sink once with the first
   generated latent frame (block 0's final latent, frame 0) as the new reference.

Memory per session is constant (ring buffers and a fixed sink), and RoPE angles are computed on the
fly from integer positions (:mod:`models.rope`), so positions never run out of range.

Example::

    gen = LiveAvatarGenerator(dit, FlowMatchScheduler())
    session = gen.start(ref_latent, motion_latents, text_context, seed=42)
    for audio_block in audio_blocks:                     # [1, layers, audio_dim, 12] each
        out = gen.step_block(session, audio_block)       # out.latent: [1, 16, 3, h, w]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.config import DiTConfig, ModelInputError
from models.dit import CausalWanS2V, draw_sink_lead
from models.kv_cache import KVCache, SinkCache
from models.scheduler import FlowMatchScheduler

#: A caller-supplied lead: ``f(block_index, step) -> lead`` in [sink_lead_min, sink_lead_max].
LeadFn = Callable[[int, int], int]


@dataclass(frozen=True)
class GenerationOptions:
    """Per-session switches of the method (defaults = the reference's TPP behaviour).

    The switches exist for the rolling-sink ablation; production sessions keep the defaults.
    """

    rolling_sink: bool = True     # move the ref's RoPE time with the block (off: ref stays at ref_rope_time)
    reanchor: bool = True         # replace the sink's ref by the first generated latent frame
    reanchor_block: int | None = None  # block index at which re-anchoring happens (None: one clip = kv_cache_blocks)
    sink: bool = True             # attend to the sink at all (off: the "no sink" ablation)


#: The block whose final latent gives the re-anchored sink: its first latent frame becomes the new reference.
ANCHOR_BLOCK = 0


def anchor_from_block(block_index: int, final_latent: Tensor) -> Tensor | None:
    """The re-anchor latent this block provides, or None: frame 0 of block 0's final latent.

    final_latent [B, C, F, h, w] -> [B, C, 1, h, w] (a view) for block :data:`ANCHOR_BLOCK`, None for
    every other block. The one place that says which latent re-anchors the sink: the generator, the
    sequential runner and the TPP decode rank all take it from here.
    """
    if block_index != ANCHOR_BLOCK:
        return None
    return final_latent[:, :, :1]


def block_noise(seed: int, block_index: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Tensor:
    """Gaussian noise of one block, a pure function of (seed, block_index).

    Drawn on the CPU from a generator seeded by ``SeedSequence([seed, block_index])`` and then moved,
    so every process and device gets the same numbers for the same block.
    """
    if seed < 0 or block_index < 0:
        raise ModelInputError(f"seed and block_index must be >= 0, got {seed}, {block_index}")
    state = np.random.SeedSequence([seed, block_index]).generate_state(1, np.uint64)[0]
    g = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


@dataclass
class GeneratorSession:
    """All per-session state of streaming generation (constant size)."""

    seed: int
    latent_hw: tuple[int, int]
    text_emb: Tensor                 # [B, text_len, dim]
    motion_latents: Tensor           # [B, C, 19, h, w], kept to re-prefill the sink
    sink: SinkCache
    kv: list[KVCache | None]         # one per denoising step (None: a step this process does not run)
    options: GenerationOptions
    lead_fn: LeadFn | None = None    # explicit leads; None = seeded draw
    block_index: int = 0             # next block to generate
    anchor_latent: Tensor | None = None  # [B, C, 1, h, w] once block 0 is done
    reanchored: bool = False

    @property
    def batch_size(self) -> int:
        return self.text_emb.shape[0]

    def nbytes(self) -> int:
        """Total tensor bytes held by the session (flat over time)."""
        tensors = [self.text_emb, self.motion_latents]
        if self.anchor_latent is not None:
            tensors.append(self.anchor_latent)
        return (sum(t.numel() * t.element_size() for t in tensors) + self.sink.nbytes()
                + sum(c.nbytes() for c in self.kv if c is not None))


@dataclass
class BlockOutput:
    """One generated block."""

    block_index: int
    latent: Tensor                               # [B, C, F, h, w] final (clean) latent
    step_latents: list[Tensor] = field(default_factory=list)  # the latent after each denoising step
    reanchored: bool = False                     # the sink was re-anchored before this block


class LiveAvatarGenerator:
    """Block-by-block streaming generation with the causal DiT and a flow-matching Euler scheduler."""

    def __init__(self, dit: CausalWanS2V, scheduler: FlowMatchScheduler | None = None):
        self.dit = dit
        self.config: DiTConfig = dit.config
        self.scheduler = scheduler if scheduler is not None else FlowMatchScheduler()

    @property
    def num_steps(self) -> int:
        return self.scheduler.num_steps

    # ---- session set-up -----------------------------------------------------------------
    @torch.no_grad()
    def start(self, ref_latent: Tensor, motion_latents: Tensor, text_context: Tensor, seed: int,
              options: GenerationOptions | None = None, leads: LeadFn | Sequence[int] | None = None,
              steps: Sequence[int] | None = None) -> GeneratorSession:
        """Prefill a new session.

        ref_latent [B, C, 1, h, w]; motion_latents [B, C, Fm, h, w]; text_context [B, Lt, text_dim]
        (umT5 output, trimmed). ``leads``: None for the seeded draw, a callable
        ``(block_index, step) -> lead``, or a flat sequence indexed by ``block_index * steps + step``.
        ``steps``: the denoising steps this process runs (default all); a TPP stage passes its own
        one, so it allocates one KV cache instead of four.
        """
        if not isinstance(seed, int) or seed < 0:
            raise ModelInputError(f"seed must be an int >= 0, got {seed!r}")
        h, w = ref_latent.shape[-2:]
        latent_hw = self.config.check_latent_hw((int(h), int(w)))
        batch = ref_latent.shape[0]
        dit = self.dit
        text_emb = dit.embed_text(text_context)
        sink = SinkCache.allocate(self.config, batch, latent_hw, device=dit.device, dtype=dit.dtype)
        dit.prefill_sink(ref_latent.to(dit.device), motion_latents.to(dit.device), text_emb, sink)
        owned = set(range(self.num_steps) if steps is None else steps)
        if not owned <= set(range(self.num_steps)):
            raise ModelInputError(f"steps must be within 0..{self.num_steps - 1}, got {sorted(owned)}")
        kv = [KVCache.allocate(self.config, batch, latent_hw, device=dit.device, dtype=dit.dtype) if i in owned
              else None for i in range(self.num_steps)]
        return GeneratorSession(seed=seed, latent_hw=latent_hw, text_emb=text_emb,
                                motion_latents=motion_latents.to(dit.device), sink=sink, kv=kv,
                                options=options or GenerationOptions(), lead_fn=self._lead_fn(leads))

    def _lead_fn(self, leads: LeadFn | Sequence[int] | None) -> LeadFn | None:
        if leads is None or callable(leads):
            return leads
        seq = list(leads)
        steps = self.num_steps

        def from_sequence(block_index: int, step: int) -> int:
            i = block_index * steps + step
            if i >= len(seq):
                raise ModelInputError(f"the explicit sink-lead sequence has {len(seq)} entries; "
                                      f"block {block_index} step {step} needs entry {i}")
            return int(seq[i])

        return from_sequence

    @torch.no_grad()
    def reanchor(self, session: GeneratorSession, ref_latent: Tensor) -> None:
        """Re-prefill the sink with a new reference latent [B, C, 1, h, w]; motion latents stay."""
        self.dit.prefill_sink(ref_latent.to(self.dit.device), session.motion_latents, session.text_emb,
                              session.sink)
        session.reanchored = True

    def reanchor_block(self, session: GeneratorSession) -> int:
        """The block index before which the sink is re-anchored (one clip by default)."""
        rb = session.options.reanchor_block
        return self.config.kv_cache_blocks if rb is None else rb

    def reanchor_due(self, session: GeneratorSession, block_index: int) -> bool:
        """True when the sink must be re-anchored before ``block_index``: once, at the first block of the
        second clip or later (a session resumed past that point re-anchors at its first block)."""
        return (session.options.reanchor and not session.reanchored
                and block_index >= self.reanchor_block(session))

    def prepare_block(self, session: GeneratorSession, block_index: int) -> bool:
        """Re-anchor the sink if it is due before this block; returns whether it happened.

        The anchor (block 0's first final latent frame) must have been recorded with
        :meth:`set_anchor` by then; in a TPP lane it travels from the last stage to the others.
        """
        if not self.reanchor_due(session, block_index):
            return False
        if session.anchor_latent is None:
            raise ModelInputError(f"block {block_index} needs the re-anchored sink latent, which has not arrived")
        self.reanchor(session, session.anchor_latent)
        return True

    @staticmethod
    def set_anchor(session: GeneratorSession, anchor: Tensor) -> None:
        """Record the re-anchor latent [B, C, 1, h, w], as :func:`anchor_from_block` gives it."""
        if anchor.ndim != 5 or anchor.shape[2] != 1:
            raise ModelInputError(f"the re-anchor latent must be [B, C, 1, h, w], got {tuple(anchor.shape)}")
        session.anchor_latent = anchor.clone()

    # ---- one denoising step (what one TPP stage runs) ------------------------------------
    def sink_lead(self, session: GeneratorSession, block_index: int, step: int) -> int:
        if session.lead_fn is not None:
            return session.lead_fn(block_index, step)
        return draw_sink_lead(session.seed, block_index * self.config.frames_per_block, step, self.config)

    def ref_time(self, session: GeneratorSession, block_index: int, step: int) -> int:
        """RoPE time of the sink's reference group for this forward call."""
        if not session.options.rolling_sink:
            return self.config.ref_rope_time
        frame_start = block_index * self.config.frames_per_block
        return self.dit.sink_ref_time(frame_start, self.sink_lead(session, block_index, step))

    @torch.no_grad()
    def denoise_step(self, session: GeneratorSession, step: int, block_index: int, x: Tensor,
                     audio: Tensor) -> Tensor:
        """One Euler step of block ``block_index`` at denoising step ``step`` with that step's cache.

        x [B, C, F, h, w] is the block's latent at sigma[step]; returns it at sigma[step + 1].
        """
        kv = session.kv[step]
        if kv is None:
            raise ModelInputError(f"this session was started without denoising step {step}")
        t = torch.full((x.shape[0],), self.scheduler.timestep(step), dtype=torch.float32)
        v = self.dit.forward_block(x, t, audio, session.text_emb, kv, session.sink,
                                   frame_start=block_index * self.config.frames_per_block,
                                   ref_time=self.ref_time(session, block_index, step),
                                   use_sink=session.options.sink)
        return self.scheduler.step(x, v.to(x.dtype), step)

    # ---- one block (all steps) -------------------------------------------------------------
    def noise_shape(self, session: GeneratorSession) -> tuple[int, ...]:
        return (session.batch_size, self.config.in_dim, self.config.frames_per_block, *session.latent_hw)

    @torch.no_grad()
    def step_block(self, session: GeneratorSession, audio: Tensor, noise: Tensor | None = None) -> BlockOutput:
        """Generate the next block. audio [B, num_audio_layers, audio_dim, 4 * frames_per_block].

        ``noise`` defaults to :func:`block_noise` of (seed, block_index). Returns the latent after
        every denoising step and the final one.
        """
        b = session.block_index
        reanchored_now = self.prepare_block(session, b)
        if noise is None:
            noise = block_noise(session.seed, b, self.noise_shape(session), self.dit.dtype, self.dit.device)
        elif tuple(noise.shape) != self.noise_shape(session):
            raise ModelInputError(f"noise must be {self.noise_shape(session)}, got {tuple(noise.shape)}")
        x = noise.to(device=self.dit.device, dtype=self.dit.dtype)
        steps = []
        for i in range(self.num_steps):
            x = self.denoise_step(session, i, b, x, audio)
            steps.append(x)
        anchor = anchor_from_block(b, x)
        if anchor is not None:
            self.set_anchor(session, anchor)
        session.block_index += 1
        return BlockOutput(block_index=b, latent=x, step_latents=steps, reanchored=reanchored_now)
