"""Typed, versioned wire messages for every Kafka topic.

A message on the wire is::

    b"LA" | version (1 byte) | header length (4 bytes, big endian) | header JSON | payload bytes

The header is a pydantic model (``extra="forbid"``) naming the message kind, the session, a monotonic
sequence number (chunk or block index) and, for each tensor, its dtype, shape, compression and byte
range in the payload. Tensors travel as raw little-endian bytes; ``bfloat16`` is carried as its 16-bit
pattern. Nothing here imports torch: the session API uses these messages without it (torch tensors
are converted at the edges by :func:`tensor_from_torch` / :func:`tensor_to_torch`).

Golden fixtures of every message kind live in ``tests/fixtures/messages/v1/``; a change that alters
their bytes must bump :data:`WIRE_VERSION`.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MAGIC = b"LA"
WIRE_VERSION = 1
_PREFIX = struct.Struct(">2sBI")

DType = Literal["float32", "bfloat16", "float16", "uint8", "int64", "int16"]
_NP_DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "u1", "int64": "<i8", "int16": "<i2", "bfloat16": "<u2"}


class WireError(ValueError):
    """A message that cannot be decoded: wrong magic, version, schema or payload size."""


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: DType
    shape: list[int]
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    compression: Literal["none", "zlib"] = "none"


class Tensor:
    """A named array on the wire: raw bytes plus dtype and shape (bf16 kept as its bit pattern)."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: tuple[int, ...], data: bytes):
        self.dtype, self.shape, self.data = dtype, tuple(shape), data
        expected = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_NP_DTYPES[dtype]).itemsize
        if len(data) != expected:
            raise WireError(f"tensor of {dtype}{list(self.shape)} needs {expected} bytes, got {len(data)}")

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> Tensor:
        name = {np.dtype("float32"): "float32", np.dtype("float16"): "float16", np.dtype("uint8"): "uint8",
                np.dtype("int64"): "int64", np.dtype("int16"): "int16"}.get(a.dtype)
        if name is None:
            raise WireError(f"unsupported array dtype {a.dtype}")
        return cls(name, a.shape, np.ascontiguousarray(a, dtype=_NP_DTYPES[name]).tobytes())

    def numpy(self) -> np.ndarray:
        if self.dtype == "bfloat16":
            raise WireError("bfloat16 has no numpy dtype; use tensor_to_torch")
        return np.frombuffer(self.data, dtype=_NP_DTYPES[self.dtype]).reshape(self.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tensor) and (self.dtype, self.shape, self.data) == (other.dtype, other.shape, other.data)

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}, {list(self.shape)})"


def tensor_from_torch(t) -> Tensor:
    """A torch tensor -> :class:`Tensor` (bf16 as its 16-bit pattern)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return Tensor("bfloat16", tuple(t.shape), t.view(torch.int16).numpy().tobytes())
    return Tensor.from_numpy(t.numpy())


def tensor_to_torch(x: Tensor):
    import torch

    if x.dtype == "bfloat16":
        return torch.frombuffer(bytearray(x.data), dtype=torch.int16).view(torch.bfloat16).reshape(x.shape).clone()
    return torch.from_numpy(x.numpy().copy())


# ---------------------------------------------------------------------------------------------
# Headers (one per message kind)
# ---------------------------------------------------------------------------------------------


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    session_id: str = Field(min_length=1, max_length=64)
    tenant_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=-1, description="chunk sequence number or block index (monotonic per session)")
    tensors: list[TensorSpec] = Field(default_factory=list)


class AudioIn(_Header):
    """Topic ``audio``: the session's input events, in order. ``seq`` numbers them per session."""

    topic: Literal["audio"] = "audio"
    kind: Literal["start", "pcm", "end_utterance", "interrupt", "end"]
    sample_rate: int = 16000
    options: dict[str, Any] | None = None          # for kind=start: seed, prompt, idle behaviour, ...


class Features(_Header):
    """Topic ``audio-features`` (partition = lane): session start/end markers and per-block features.

    For kind=block the tensors are ``features`` [1, layers, audio_dim, 12] and ``pcm`` [7680] float32.
    """

    topic: Literal["audio-features"] = "audio-features"
    kind: Literal["start", "block", "end"]
    lane_id: str


class Frames(_Header):
    """Topic ``frames``: one decoded block, or end.

    A block from the lane's decode rank carries its video already encoded (:func:`h264_tensors`):
    ``h264`` uint8 [N] (the block's H.264 access units in AVCC form, one per frame, back to back),
    ``h264_sizes`` int64 [T] (the byte length of each), ``avcc`` uint8 [n] (the codec configuration, an
    AVCDecoderConfigurationRecord), and ``pcm`` [T * 640] float32. The older raw form, ``frames``
    [T, H, W, 3] uint8 + ``pcm``, is still accepted by the packager (it then encodes). ``latent`` rides
    along when the lane's ``emit_latents`` is set (tests).
    """

    topic: Literal["frames"] = "frames"
    kind: Literal["block", "end"]
    lane_id: str
    fps: int = 25


class Media(_Header):
    """Topic ``media``: the fMP4 init segment (seq -1), one fragment per block (seq = block), or the tail."""

    topic: Literal["media"] = "media"
    kind: Literal["init", "fragment", "end"]
    start_time_s: float = 0.0


HEADERS: dict[str, type[_Header]] = {"audio": AudioIn, "audio-features": Features, "frames": Frames, "media": Media}


class Message:
    """A header plus its named tensors (and, for media, its opaque bytes as the tensor ``data``)."""

    __slots__ = ("header", "tensors")

    def __init__(self, header: _Header, tensors: dict[str, Tensor] | None = None):
        self.header, self.tensors = header, dict(tensors or {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and self.header == other.header and self.tensors == other.tensors


def h264_tensors(access_units, avcc: bytes) -> dict[str, Tensor]:
    """The tensors of one encoded block of :class:`Frames`: its access units and codec configuration."""
    units = [bytes(au) for au in access_units]
    if not units or not all(units) or not avcc:
        raise WireError("an encoded block needs at least one non-empty access unit and a codec configuration")
    data = b"".join(units)
    return {"h264": Tensor("uint8", (len(data),), data),
            "h264_sizes": Tensor.from_numpy(np.array([len(u) for u in units], dtype=np.int64)),
            "avcc": Tensor("uint8", (len(avcc),), bytes(avcc))}


def h264_from_tensors(tensors: dict[str, Tensor]) -> tuple[list[bytes], bytes]:
    """(access units, codec configuration) of an encoded :class:`Frames` block; inconsistent sizes raise
    :class:`WireError`."""
    try:
        data, sizes, avcc = tensors["h264"], tensors["h264_sizes"], tensors["avcc"]
    except KeyError as exc:
        raise WireError(f"encoded block without tensor {exc}") from exc
    if (data.dtype, sizes.dtype, avcc.dtype) != ("uint8", "int64", "uint8") or len(sizes.shape) != 1:
        raise WireError("encoded block: h264/avcc must be uint8 bytes and h264_sizes int64 [T]")
    lengths = sizes.numpy().tolist()
    if not lengths or min(lengths) <= 0 or sum(lengths) != len(data.data) or not avcc.data:
        raise WireError(f"encoded block: access unit sizes {lengths} do not split {len(data.data)} bytes")
    offsets = np.cumsum([0] + lengths).tolist()
    return [data.data[a:b] for a, b in zip(offsets[:-1], offsets[1:])], avcc.data


def encode(header: _Header, tensors: dict[str, Tensor] | None = None, compress: set[str] | None = None) -> bytes:
    """Serialize a message; tensors named in ``compress`` are zlib-compressed (level 1)."""
    specs, chunks, offset = [], [], 0
    for tname, t in (tensors or {}).items():
        data, comp = t.data, "none"
        if compress and tname in compress:
            packed = zlib.compress(data, 1)
            if len(packed) < len(data):
                data, comp = packed, "zlib"
        specs.append(TensorSpec(name=tname, dtype=t.dtype, shape=list(t.shape), offset=offset, nbytes=len(data),
                                compression=comp))
        chunks.append(data)
        offset += len(data)
    h = header.model_copy(update={"tensors": specs})
    head = json.dumps(h.model_dump(mode="json"), separators=(",", ":"), sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, WIRE_VERSION, len(head)) + head + b"".join(chunks)


def decode(raw: bytes) -> Message:
    """Parse a message; any inconsistency raises :class:`WireError` (never a bare exception)."""
    if len(raw) < _PREFIX.size:
        raise WireError("message shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise WireError("not a LiveAvatar message (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version} is not supported (this build speaks {WIRE_VERSION})")
    end = _PREFIX.size + hlen
    try:
        raw_header = json.loads(raw[_PREFIX.size:end])
        cls = HEADERS[raw_header["topic"]]
        header = cls.model_validate(raw_header)
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"bad message header: {exc}") from exc
    payload = memoryview(raw)[end:]
    tensors = {}
    for spec in header.tensors:
        if spec.offset + spec.nbytes > len(payload):
            raise WireError(f"tensor {spec.name!r} runs past the end of the payload")
        data = bytes(payload[spec.offset:spec.offset + spec.nbytes])
        if spec.compression == "zlib":
            try:
                data = zlib.decompress(data)
            except zlib.error as exc:
                raise WireError(f"tensor {spec.name!r}: corrupt zlib data") from exc
        tensors[spec.name] = Tensor(spec.dtype, tuple(spec.shape), data)
    return Message(header, tensors)


def peek_topic_kind(raw: bytes) -> tuple[str, str]:
    """(topic, kind) of a message without decoding its tensors (for routing and metrics)."""
    msg_header = decode(raw[: _PREFIX.size + _PREFIX.unpack_from(raw)[2]]).header if len(raw) >= _PREFIX.size else None
    if msg_header is None:
        raise WireError("message shorter than its prefix")
    return msg_header.topic, msg_header.kind
