"""Speed settings of the DiT's denoising step: FP8 linears, torch.compile, CUDA-graph replay.

All three are off by default and are switched on per process with :class:`AccelOptions` and
:func:`accelerate` (or ``build_models(..., accel=AccelOptions(...))``)::

    dit = build_models(config, device="cuda", dtype=torch.bfloat16, parts={"dit"}).dit
    report = accelerate(dit, AccelOptions(linear_precision="fp8", compile=True, cuda_graphs=True))

What runs where
    ``CausalWanS2V.forward_block`` does steps 1-4 (patch embedding, audio encoder, time modulation,
    RoPE factors, the ring window) eagerly, then hands steps 5-6 (the 40 blocks with audio
    injection, the head) to ``dit.core_runner``. :func:`accelerate` installs a :class:`StepRunner`
    there. Steps 5-6 hold all but ~0.1 % of a step's FLOPs.

``compile=True`` (regional compilation)
    ``WanAttentionBlock.forward`` is compiled once with ``torch.compile(dynamic=False)`` and the same
    compiled code serves all blocks (parameters are graph inputs). Self-attention's cache work
    (RoPE, ring write and read, the sink, SDPA) stays eager behind ``torch.compiler.disable``: its
    Python state (ring window, layer index) would otherwise specialise the graph per layer and per
    ring phase. So the compiled code is the modulation, norms, projections, text cross-attention
    and FFN; shapes never change for a given latent grid, so nothing recompiles while streaming.
    Compiling the whole 40-layer step as one graph was tried on the CPU first and did not finish in
    10 minutes even for the tiny model, hence the regional form. The audio injector and the head run
    eagerly.

``cuda_graphs=True`` (steady state only)
    Steps 5-6 are captured into one CUDA graph per (ring phase, cache buffers) and replayed. Which
    buffers are static, per lane process:

    * KV ring buffers (``KVCache.k/v``, one per denoising step): preallocated at session start with
      a fixed shape (``kv_cache_frames x frame_seq_len`` tokens per layer) and written in place, so
      their addresses are static for the life of a session. A new session allocates new rings; the
      runner keys its graphs on the ring and sink addresses, captures again for the new ones and
      drops the graphs of rings that no longer exist (weak references). NOT static across
      sessions today.
    * Sink cache (``SinkCache.k/v``): preallocated, re-anchoring copies into it in place: static
      for the session.
    * Ring window: the write slots and the read order depend on the ring phase (block index mod
      ``kv_cache_blocks``, 4 phases at steady state). One graph per phase. Blocks 0..2 of a stream
      (ring not yet full: 3, 6, 9 cached frames) run eagerly.
    * Per-call inputs (noisy tokens, time modulation ``e``/``e0``, text embedding, audio tokens,
      RoPE factors of the block and of the rolled sink): computed eagerly each call, then copied
      into static input buffers (one set per shape signature) that every graph reads.
    * Output: a static buffer per graph, cloned after each replay.
    Capture runs ``graph_warmup`` eager passes on a side stream first (they rewrite the same ring
    slots with the same values, so they are harmless), then captures and replays once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from models.attention import AttentionContext, StreamingStep
from models.precision import SCALINGS, PrecisionError, convert_linears_to_fp8, require_fp8
from models.rope import RopeFactors

LINEAR_PRECISIONS = ("bf16", "fp8")


class AccelOptionError(ValueError):
    """An acceleration option has a bad value."""


@dataclass(frozen=True)
class AccelOptions:
    """Speed settings of the denoising step (all off by default).

    linear_precision  "bf16": linears run in the model's dtype (bfloat16 on a GPU, float32 in CPU
                      tests). "fp8": e4m3 weights quantised at load, ``torch._scaled_mm``
                      (CUDA, compute capability >= 8.9; see models/precision.py).
    fp8_scaling       "tensor" (one scale per weight and per activation tensor, as the reference)
                      or "row" (per output row of the weight, per token of the activations).
    compile           regional ``torch.compile`` of the transformer blocks.
    cuda_graphs       capture and replay steady-state steps as CUDA graphs (CUDA only).
    graph_warmup      eager passes before each capture.
    """

    linear_precision: str = "bf16"
    fp8_scaling: str = "tensor"
    compile: bool = False
    cuda_graphs: bool = False
    graph_warmup: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.linear_precision not in LINEAR_PRECISIONS:
            problems.append(f"linear_precision must be one of {LINEAR_PRECISIONS}, got {self.linear_precision!r}")
        if self.fp8_scaling not in SCALINGS:
            problems.append(f"fp8_scaling must be one of {SCALINGS}, got {self.fp8_scaling!r}")
        for name in ("compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.graph_warmup, int) or isinstance(self.graph_warmup, bool) or self.graph_warmup < 1:
            problems.append(f"graph_warmup must be an int >= 1, got {self.graph_warmup!r}")
        if problems:
            raise AccelOptionError("invalid AccelOptions: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.linear_precision != "bf16" or self.compile or self.cuda_graphs

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AccelOptions:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - names)
        if unknown:
            raise AccelOptionError(f"unknown acceleration option(s): {', '.join(unknown)}")
        return cls(**raw)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def accelerate(dit, options: AccelOptions) -> dict[str, Any]:
    """Apply ``options`` to ``dit`` (a CausalWanS2V) in place; returns what was done.

    Raises :class:`PrecisionError` with the reason when FP8 or CUDA graphs cannot run on the
    model's device (checked before anything is changed).
    """
    device = dit.device
    if options.linear_precision == "fp8":
        require_fp8(device)
        if dit.dtype != torch.bfloat16:
            raise PrecisionError(f"linear_precision='fp8' needs a bfloat16 model, this one is {dit.dtype}")
    if options.cuda_graphs and device.type != "cuda":
        raise PrecisionError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    report: dict[str, Any] = {"options": options.as_dict(), "device": str(device)}
    if options.linear_precision == "fp8":
        conv = convert_linears_to_fp8(dit, options.fp8_scaling)
        report["fp8_converted"], report["fp8_kept"] = len(conv["converted"]), conv["kept"]
    dit.core_runner = StepRunner(dit, options) if (options.compile or options.cuda_graphs) else None
    return report


class _LayerAttention(AttentionContext):
    """Hides the attention context from torch.compile: one opaque call per layer (see module doc)."""

    __slots__ = ("ctx", "layer")

    def __init__(self, ctx: AttentionContext, layer: int):
        self.ctx, self.layer = ctx, layer

    @torch.compiler.disable
    def attend(self, _layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.ctx.attend(self.layer, q, k, v)


@dataclass
class _StaticInputs:
    """Input buffers every graph of one shape signature reads."""

    tokens: Tensor
    e: Tensor
    e0: Tensor
    text: Tensor
    audio: tuple[Tensor, Tensor] | None
    rope: RopeFactors
    sink_rope: RopeFactors

    def fill(self, tokens, e, e0, text, audio, rope: RopeFactors, sink_rope: RopeFactors) -> None:
        for dst, src in ((self.tokens, tokens), (self.e, e), (self.e0, e0), (self.text, text),
                         (self.rope.cos, rope.cos), (self.rope.sin, rope.sin),
                         (self.sink_rope.cos, sink_rope.cos), (self.sink_rope.sin, sink_rope.sin)):
            dst.copy_(src)
        if audio is not None:
            self.audio[0].copy_(audio[0])
            self.audio[1].copy_(audio[1])


@dataclass
class _Graph:
    graph: Any                                  # torch.cuda.CUDAGraph
    out: Tensor
    refs: list[weakref.ref] = field(default_factory=list)   # the caches it writes and reads

    def alive(self) -> bool:
        return all(r() is not None for r in self.refs)


def _ptrs(tensors) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


class StepRunner:
    """Steps 5-6 of ``forward_block`` with regional compile and/or CUDA-graph replay.

    Install with :func:`accelerate`; ``stats`` counts eager calls, captures and replays.
    """

    def __init__(self, dit, options: AccelOptions):
        from models.dit import WanAttentionBlock

        self.dit = dit
        self.options = options
        forward = WanAttentionBlock.forward
        self._block = torch.compile(forward, dynamic=False) if options.compile else forward
        self._static: dict[tuple, _StaticInputs] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.stats = {"eager": 0, "captures": 0, "replays": 0}

    # ---- the computation (eager or with compiled blocks) ---------------------------------------
    def core(self, tokens: Tensor, e: Tensor, e0: Tensor, text_emb: Tensor, ctx: AttentionContext,
             audio_tokens: tuple[Tensor, Tensor] | None, frames: int, grid: tuple[int, int]) -> Tensor:
        """Same result as ``CausalWanS2V._core`` (blocks, audio injection, head, unpatchify)."""
        dit = self.dit
        x = tokens
        for i, block in enumerate(dit.blocks):
            # layer index 0 is a placeholder: the real one travels inside the opaque context
            x = self._block(block, x, e0, text_emb, _LayerAttention(ctx, i), 0)
            if audio_tokens is not None and i in dit.audio_injector.block_to_injector:
                x = dit.audio_injector(i, x, *audio_tokens)
        return dit.unpatchify(dit.head(x, e), frames, grid)

    def __call__(self, tokens: Tensor, e: Tensor, e0: Tensor, text_emb: Tensor, ctx: AttentionContext,
                 audio_tokens: tuple[Tensor, Tensor] | None, frames: int, grid: tuple[int, int]) -> Tensor:
        if self.options.cuda_graphs and self._graphable(tokens, ctx):
            return self._replay(tokens, e, e0, text_emb, ctx, audio_tokens, frames, grid)
        self.stats["eager"] += 1
        return self.core(tokens, e, e0, text_emb, ctx, audio_tokens, frames, grid)

    # ---- CUDA graphs -----------------------------------------------------------------------------
    @staticmethod
    def _graphable(tokens: Tensor, ctx: AttentionContext) -> bool:
        return (tokens.is_cuda and not torch.is_grad_enabled() and isinstance(ctx, StreamingStep)
                and ctx.kv.num_frames == ctx.kv.capacity_frames)

    def _signature(self, tokens, e, e0, text, audio, ctx: StreamingStep, frames, grid) -> tuple:
        shapes = [tuple(t.shape) + (t.dtype,) for t in (tokens, e, e0, text, ctx.rope.cos, ctx.sink_rope.cos)]
        if audio is not None:
            shapes += [tuple(a.shape) + (a.dtype,) for a in audio]
        return (tuple(shapes), frames, tuple(grid), str(tokens.device))

    def _static_inputs(self, sig, tokens, e, e0, text, audio, ctx: StreamingStep) -> _StaticInputs:
        if sig not in self._static:
            def like(t):
                return torch.empty_like(t)
            self._static[sig] = _StaticInputs(
                like(tokens), like(e), like(e0), like(text),
                None if audio is None else (like(audio[0]), like(audio[1])),
                RopeFactors(like(ctx.rope.cos), like(ctx.rope.sin)),
                RopeFactors(like(ctx.sink_rope.cos), like(ctx.sink_rope.sin)))
        return self._static[sig]

    def _replay(self, tokens, e, e0, text, ctx: StreamingStep, audio, frames, grid) -> Tensor:
        sig = self._signature(tokens, e, e0, text, audio, ctx, frames, grid)
        static = self._static_inputs(sig, tokens, e, e0, text, audio, ctx)
        static.fill(tokens, e, e0, text, audio, ctx.rope, ctx.sink_rope)
        key = (sig, ctx.window, ctx.use_sink, _ptrs(ctx.kv.k), _ptrs(ctx.kv.v), _ptrs(ctx.sink.k),
               _ptrs(ctx.sink.v))
        entry = self._graphs.get(key)
        if entry is None or not entry.alive():
            entry = self._capture(static, ctx, frames, grid)
            self._graphs[key] = entry
        entry.graph.replay()
        self.stats["replays"] += 1
        return entry.out.clone()

    def _capture(self, static: _StaticInputs, ctx: StreamingStep, frames: int, grid) -> _Graph:
        # drop graphs whose caches are gone (a finished session), so their memory can be reused
        self._graphs = {k: g for k, g in self._graphs.items() if g.alive()}
        device = static.tokens.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        sctx = StreamingStep(ctx.kv, ctx.window, ctx.sink, static.rope, static.sink_rope, ctx.use_sink)
        args = (static.tokens, static.e, static.e0, static.text, sctx, static.audio, frames, grid)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.options.graph_warmup):
                self.core(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.core(*args)
        self.stats["captures"] += 1
        refs = [weakref.ref(t) for t in (*ctx.kv.k, *ctx.kv.v, *ctx.sink.k, *ctx.sink.v)]
        return _Graph(graph, out, refs)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
