"""Point-to-point messages between the ranks of a lane, over ``torch.distributed``.

A message is a fixed-size int64 header followed by the tensors it announces. The header carries the
message kind, the lane-local session number, the block index, flags, and each tensor's dtype and
shape, so a receiver never needs to know shapes in advance::

    header [HEADER_LEN] int64 = [kind, session_no, block_index, flags, n_tensors,
                                 (dtype_code, ndim, d0, d1, d2, d3, d4) * MAX_TENSORS]

Sends are asynchronous (``isend``): a rank hands its block to the next rank and goes straight back to
compute, instead of waiting for the receiver to post its ``recv`` as the reference's blocking
``send``/``recv`` does. Every wait has a timeout, so a dead or hung peer is noticed in bounded time.

Backend: gloo on CPU, NCCL on GPU (:func:`backend_for`). Rendezvous uses a ``file://`` store for local
lanes (no listening store socket), and ``GLOO_SOCKET_IFNAME=lo`` keeps gloo's own pair sockets on
loopback; on Kubernetes the rendezvous goes through the group leader's address.
"""

from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

MAX_TENSORS = 6
MAX_DIMS = 5
_TENSOR_SLOTS = 2 + MAX_DIMS  # dtype code, ndim, dims
HEADER_LEN = 5 + MAX_TENSORS * _TENSOR_SLOTS

#: Tag of the forward channel (rank i -> rank i+1) and of the anchor channel (decode rank -> denoise ranks).
TAG_FORWARD = 0
TAG_ANCHOR = 1

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8]
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


class MsgKind(enum.IntEnum):
    """What a message is. The order of kinds on a link is the order of events in the lane."""

    BLOCK = 1          # one block: latent, audio features
    SESSION_START = 2  # a new session on this lane: sink inputs follow
    SESSION_END = 3    # the session is over: drain, reset caches
    ANCHOR = 4         # the re-anchored sink latent (decode rank -> denoise ranks)
    SHUTDOWN = 5       # stop the lane
    HEARTBEAT = 6      # nothing to do yet: proves the upstream ranks are alive while a session idles


class LinkError(RuntimeError):
    """The link to ``peer`` failed: the peer is dead or hung."""

    def __init__(self, peer: int, message: str):
        super().__init__(message)
        self.peer = peer


class LinkTimeout(LinkError):
    """A peer did not send or receive within the timeout: it is dead or hung."""

    def __init__(self, peer: int, what: str, timeout_s: float):
        super().__init__(peer, f"rank {peer} did not complete {what} within {timeout_s:.1f} s")


class LinkClosed(LinkError):
    """The peer's end of the connection closed: it exited or crashed."""

    def __init__(self, peer: int, what: str):
        super().__init__(peer, f"rank {peer} closed the connection while we waited for {what}")


@dataclass(frozen=True)
class Header:
    """The fixed-size part of every message."""

    kind: MsgKind
    session_no: int = 0
    block_index: int = 0
    flags: int = 0
    specs: tuple[tuple[torch.dtype, tuple[int, ...]], ...] = field(default_factory=tuple)

    def encode(self) -> torch.Tensor:
        if len(self.specs) > MAX_TENSORS:
            raise ValueError(f"a message carries at most {MAX_TENSORS} tensors, got {len(self.specs)}")
        h = torch.zeros(HEADER_LEN, dtype=torch.int64)
        h[:5] = torch.tensor([int(self.kind), self.session_no, self.block_index, self.flags, len(self.specs)])
        for i, (dtype, shape) in enumerate(self.specs):
            if len(shape) > MAX_DIMS:
                raise ValueError(f"tensor {i} has {len(shape)} dims; at most {MAX_DIMS} travel in a header")
            base = 5 + i * _TENSOR_SLOTS
            h[base] = _DTYPE_CODE[dtype]
            h[base + 1] = len(shape)
            h[base + 2: base + 2 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        return h

    @classmethod
    def decode(cls, h: torch.Tensor) -> Header:
        vals = h.tolist()
        n = vals[4]
        specs = []
        for i in range(n):
            base = 5 + i * _TENSOR_SLOTS
            ndim = vals[base + 1]
            specs.append((_DTYPES[vals[base]], tuple(vals[base + 2: base + 2 + ndim])))
        return cls(MsgKind(vals[0]), vals[1], vals[2], vals[3], tuple(specs))


@dataclass
class Message:
    header: Header
    tensors: list[torch.Tensor]


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


class Link:
    """Async sends to, and timed receives from, peer ranks on one channel (tag)."""

    def __init__(self, device: torch.device, timeout_s: float, tag: int = TAG_FORWARD, max_in_flight: int = 1):
        self.device = device
        self.max_in_flight = max_in_flight   # back-pressure: a fast rank may run this many messages ahead
        self.timeout = _dt.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.tag = tag
        self._pending: list[tuple[int, list, list[torch.Tensor]]] = []  # (peer, works, tensors kept alive)

    def send(self, peer: int, header: Header, tensors: list[torch.Tensor] = ()) -> None:
        """Queue a message to ``peer`` and return at once; the tensors are copied (contiguous) first."""
        tensors = [t.detach().to(self.device).contiguous() for t in tensors]
        header = Header(header.kind, header.session_no, header.block_index, header.flags,
                        tuple((t.dtype, tuple(t.shape)) for t in tensors))
        payload = [header.encode().to(self.device)] + tensors
        works = [dist.isend(t, peer, tag=self.tag) for t in payload]
        self._pending.append((peer, works, payload))
        self._reap()
        while len(self._pending) > self.max_in_flight:     # wait for the oldest message to be taken
            old_peer, old_works, _ = self._pending.pop(0)
            for w in old_works:
                self._wait(w, old_peer, "a send", self.timeout)

    def recv(self, peer: int, timeout_s: float | None = None) -> Message:
        """Block until the next message from ``peer`` arrives, or raise :class:`LinkTimeout`."""
        timeout = self.timeout if timeout_s is None else _dt.timedelta(seconds=timeout_s)
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(h, peer, tag=self.tag), peer, "a message header", timeout)
        header = Header.decode(h.cpu())
        tensors = []
        for dtype, shape in header.specs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait(dist.irecv(t, peer, tag=self.tag), peer, f"a {tuple(shape)} tensor", timeout)
            tensors.append(t)
        return Message(header, tensors)

    def flush(self) -> None:
        """Wait until every queued send has been received (bounded by the timeout)."""
        for peer, works, _ in self._pending:
            for w in works:
                self._wait(w, peer, "a send", self.timeout)
        self._pending.clear()

    def _reap(self) -> None:
        self._pending = [p for p in self._pending if not all(w.is_completed() for w in p[1])]

    def _wait(self, work, peer: int, what: str, timeout: _dt.timedelta) -> None:
        try:
            if self.device.type == "cuda":
                work.wait()  # NCCL: bounded by the process group's timeout (TORCH_NCCL_BLOCKING_WAIT=1)
            else:
                work.wait(timeout)
        except RuntimeError as exc:
            text = str(exc)
            if "Timed out" in text or "timeout" in text.lower():
                raise LinkTimeout(peer, what, timeout.total_seconds()) from exc
            if "Connection closed by peer" in text or "Connection reset" in text:
                raise LinkClosed(peer, what) from exc
            raise
