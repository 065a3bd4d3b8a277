"""The lane's messages, and how each travels between ranks (:mod:`pipeline_stages.transport`).

What enters the head rank (from its source)::

    StartSession | Block | EndSession | Shutdown

What leaves the decode rank (to its output)::

    SessionStarted | BlockDone | AnchorReady | SessionEnded

On the forward channel (rank ``i`` -> its downstream rank), in lane order, as ``(Header, tensors)``::

    SESSION_START  [ref_latent, motion_latents, text_context, meta, leads?, anchor?, tag?]   flags: START_HAS_*
    BLOCK          [latent, audio_features?, pcm?]                                       flags: BLOCK_*
    HEARTBEAT      []                    the head idles: proves the upstream ranks are alive
    SESSION_END    []
    SHUTDOWN       []

and on the anchor channel (decode rank -> every denoise rank)::

    ANCHOR         [anchor_latent]       block 0's first latent frame, [1, C, 1, h, w]

:func:`to_wire` and :func:`from_wire` are exact inverses for every forward-channel message
(:class:`StartSession`, :class:`LaneBlock`, :class:`Heartbeat`, :class:`EndSession`, :class:`Shutdown`)
and for :class:`AnchorReady` on the anchor channel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from models.generator import ANCHOR_BLOCK, GenerationOptions
from pipeline_stages.sink import SinkInputs
from pipeline_stages.transport import Header, MsgKind

#: BLOCK flags: the block only re-warms the caches after a restart (its frames are not emitted);
#: the audio features follow the latent; the block's PCM follows.
FLAG_REPLAY, BLOCK_HAS_AUDIO, BLOCK_HAS_PCM = 1, 2, 4
#: SESSION_START flags saying which optional tensors follow [ref, motion, text, meta].
START_HAS_LEADS, START_HAS_ANCHOR, START_HAS_TAG = 1, 2, 4

# ---------------------------------------------------------------------------------------------
# Into the head rank
# ---------------------------------------------------------------------------------------------


@dataclass
class StartSession:
    session_no: int
    seed: int
    sink: SinkInputs
    options: GenerationOptions = dataclasses.field(default_factory=GenerationOptions)
    leads: list[int] | None = None
    anchor: torch.Tensor | None = None   # a resumed session's re-anchored latent [1, C, 1, h, w], if known
    tag: str = ""                        # opaque session label the decoder hands back (e.g. the session id)


@dataclass
class Block:
    session_no: int
    block_index: int
    audio: torch.Tensor              # [1, layers, audio_dim, 12]
    pcm: torch.Tensor | None = None  # [7680] float32: travels to the decoder with the block (for packaging)
    replay: bool = False             # re-warm caches only (after a restart); not emitted


@dataclass
class EndSession:
    session_no: int


@dataclass
class Shutdown:
    pass


# ---------------------------------------------------------------------------------------------
# Between ranks only
# ---------------------------------------------------------------------------------------------


@dataclass
class LaneBlock:
    """A block in flight: its latent at the noise level of the next step to run, and what travels with it."""

    session_no: int
    block_index: int
    latent: torch.Tensor                  # [1, C, 3, h, w]
    audio: torch.Tensor | None = None     # [1, layers, audio_dim, 12]; dropped before the decode rank
    pcm: torch.Tensor | None = None       # [7680] float32
    replay: bool = False


@dataclass
class Heartbeat:
    """Nothing to do yet: the head proves it (and every rank it passes) is alive."""

    session_no: int
    block_index: int                      # the last block the head ran (-1: none yet)


# ---------------------------------------------------------------------------------------------
# Out of the decode rank
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockDone:
    session_no: int
    block_index: int
    latent: torch.Tensor             # [1, C, 3, h, w]
    frames: torch.Tensor             # [12, H, W, 3] uint8
    pcm: torch.Tensor | None = None  # the block's PCM, when the source sent it


@dataclass
class AnchorReady:
    """The session's re-anchored latent, known once block 0 is decoded-ready (so a restart can resume past
    the re-anchor block); also what the decode rank sends every denoise rank on the anchor channel."""

    session_no: int
    latent: torch.Tensor             # [1, C, 1, h, w]


@dataclass
class SessionStarted:
    session_no: int
    tag: str = ""


@dataclass
class SessionEnded:
    session_no: int


# ---------------------------------------------------------------------------------------------
# To and from the wire
# ---------------------------------------------------------------------------------------------

ForwardMessage = StartSession | LaneBlock | Heartbeat | EndSession | Shutdown


def _meta_tensor(seed: int, o: GenerationOptions) -> torch.Tensor:
    return torch.tensor([seed, int(o.rolling_sink), int(o.reanchor),
                         -1 if o.reanchor_block is None else o.reanchor_block, int(o.sink)], dtype=torch.int64)


def _from_meta(meta: torch.Tensor) -> tuple[int, GenerationOptions]:
    seed, rolling, reanchor, rb, sink = meta.tolist()
    return seed, GenerationOptions(rolling_sink=bool(rolling), reanchor=bool(reanchor),
                                   reanchor_block=None if rb < 0 else rb, sink=bool(sink))


def to_wire(item: ForwardMessage | AnchorReady) -> tuple[Header, list[torch.Tensor]]:
    """A message -> the header and tensors that carry it."""
    if isinstance(item, StartSession):
        t, flags = [*item.sink.tensors(), _meta_tensor(item.seed, item.options)], 0
        if item.leads is not None:
            t.append(torch.tensor(item.leads, dtype=torch.int64))
            flags |= START_HAS_LEADS
        if item.anchor is not None:
            t.append(item.anchor)
            flags |= START_HAS_ANCHOR
        if item.tag:
            t.append(torch.tensor(list(item.tag.encode()), dtype=torch.uint8))
            flags |= START_HAS_TAG
        return Header(MsgKind.SESSION_START, item.session_no, flags=flags), t
    if isinstance(item, LaneBlock):
        t, flags = [item.latent], FLAG_REPLAY if item.replay else 0
        if item.audio is not None:
            t.append(item.audio)
            flags |= BLOCK_HAS_AUDIO
        if item.pcm is not None:
            t.append(item.pcm)
            flags |= BLOCK_HAS_PCM
        return Header(MsgKind.BLOCK, item.session_no, item.block_index, flags), t
    if isinstance(item, Heartbeat):
        return Header(MsgKind.HEARTBEAT, item.session_no, item.block_index), []
    if isinstance(item, EndSession):
        return Header(MsgKind.SESSION_END, item.session_no), []
    if isinstance(item, Shutdown):
        return Header(MsgKind.SHUTDOWN), []
    if isinstance(item, AnchorReady):
        return Header(MsgKind.ANCHOR, item.session_no, ANCHOR_BLOCK), [item.latent]
    raise TypeError(f"{type(item).__name__} does not travel between ranks")


def from_wire(header: Header, tensors: list[torch.Tensor]) -> ForwardMessage | AnchorReady:
    """The header and tensors of a received message -> the message (the inverse of :func:`to_wire`)."""
    kind, rest = header.kind, list(tensors)
    if kind == MsgKind.SESSION_START:
        ref, motion, text, meta = rest[:4]
        rest = rest[4:]
        seed, options = _from_meta(meta)
        leads = rest.pop(0).tolist() if header.flags & START_HAS_LEADS else None
        anchor = rest.pop(0) if header.flags & START_HAS_ANCHOR else None
        tag = bytes(rest.pop(0).cpu().tolist()).decode() if header.flags & START_HAS_TAG else ""
        return StartSession(header.session_no, seed, SinkInputs(ref, motion, text), options, leads, anchor, tag)
    if kind == MsgKind.BLOCK:
        latent = rest.pop(0)
        audio = rest.pop(0) if header.flags & BLOCK_HAS_AUDIO else None
        pcm = rest.pop(0) if header.flags & BLOCK_HAS_PCM else None
        return LaneBlock(header.session_no, header.block_index, latent, audio, pcm,
                         replay=bool(header.flags & FLAG_REPLAY))
    if kind == MsgKind.HEARTBEAT:
        return Heartbeat(header.session_no, header.block_index)
    if kind == MsgKind.SESSION_END:
        return EndSession(header.session_no)
    if kind == MsgKind.SHUTDOWN:
        return Shutdown()
    if kind == MsgKind.ANCHOR:
        return AnchorReady(header.session_no, rest[0])
    raise TypeError(f"no message of kind {kind!r}")
