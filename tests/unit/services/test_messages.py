"""Wire messages: golden fixtures per schema version, round trips, and clear errors for bad bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.messages import (
    AudioIn,
    Features,
    Frames,
    Media,
    Tensor,
    WireError,
    decode,
    encode,
    h264_tensors,
    tensor_from_torch,
    tensor_to_torch,
)

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "messages" / "v1"


def examples() -> dict[str, tuple]:
    """One deterministic example of every message kind (inputs of the golden fixtures)."""
    pcm = (np.arange(16, dtype=np.float32) / 16.0).astype(np.float32)
    feats = np.arange(2 * 3 * 12, dtype=np.float32).reshape(1, 2, 3, 12)
    frames = (np.arange(12 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(12, 4, 4, 3)
    latent = torch.arange(16 * 3 * 2 * 2, dtype=torch.float32).reshape(1, 16, 3, 2, 2).to(torch.bfloat16)
    return {
        "audio_start": (AudioIn(session_id="s1", tenant_id="t1", seq=0, kind="start", options={"seed": 3}), {}),
        "audio_pcm": (AudioIn(session_id="s1", tenant_id="t1", seq=1, kind="pcm"), {"pcm": Tensor.from_numpy(pcm)}),
        "features_block": (Features(session_id="s1", tenant_id="t1", seq=0, kind="block", lane_id="lane-0"),
                           {"features": Tensor.from_numpy(feats), "pcm": Tensor.from_numpy(pcm)}),
        "frames_block": (Frames(session_id="s1", tenant_id="t1", seq=4, kind="block", lane_id="lane-1"),
                         {"frames": Tensor.from_numpy(frames), "latent": tensor_from_torch(latent)}),
        # the lane's form: the block's H.264 access units (here stand-in bytes), their sizes, the avcC, PCM
        "frames_h264_block": (Frames(session_id="s1", tenant_id="t1", seq=4, kind="block", lane_id="lane-1"),
                              {**h264_tensors([b"\x00\x00\x00\x02\x65\x88", b"\x00\x00\x00\x01\x41"],
                                              b"\x01\x42\xc0\x0a"), "pcm": Tensor.from_numpy(pcm)}),
        "media_fragment": (Media(session_id="s1", tenant_id="t1", seq=4, kind="fragment", start_time_s=1.92),
                           {"data": Tensor("uint8", (5,), b"moof!")}),
    }


@pytest.mark.parametrize("name", sorted(examples()))
def test_golden_fixture(name):
    header, tensors = examples()[name]
    raw = encode(header, tensors)
    path = FIXTURES / f"{name}.bin"
    if os.environ.get("LIVEAVATAR_WRITE_FIXTURES") == "1":   # regenerate deliberately, then bump WIRE_VERSION
        path.write_bytes(raw)
    assert path.exists(), f"missing golden fixture {path}"
    assert raw == path.read_bytes(), "the wire format changed: bump WIRE_VERSION and add a v2 fixture set"
    msg = decode(path.read_bytes())
    assert msg.header == header.model_copy(update={"tensors": msg.header.tensors})
    assert msg.tensors == tensors


def test_bf16_and_compression_round_trip():
    x = torch.randn(1, 16, 3, 8, 8).to(torch.bfloat16)
    assert torch.equal(tensor_to_torch(tensor_from_torch(x)), x)
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    h = Frames(session_id="s", tenant_id="t", seq=0, kind="block", lane_id="l")
    packed = encode(h, {"frames": Tensor.from_numpy(frames)}, compress={"frames"})
    assert len(packed) < frames.nbytes // 10
    assert np.array_equal(decode(packed).tensors["frames"].numpy(), frames)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"XX" + b[2:], "magic"),
    (lambda b: b[:2] + bytes([9]) + b[3:], "version"),
    (lambda b: b[:-3], "past the end"),
    (lambda b: b[:3], "shorter"),
    (lambda b: b[:8] + b"!" + b[9:], "header"),
])
def test_bad_bytes_give_a_wire_error(mutate, match):
    header, tensors = examples()["audio_pcm"]
    with pytest.raises(WireError, match=match):
        decode(mutate(encode(header, tensors)))


def test_headers_reject_extra_fields_and_bad_values():
    with pytest.raises(ValueError):
        AudioIn(session_id="s", tenant_id="t", seq=0, kind="start", surprise=1)
    with pytest.raises(ValueError):
        AudioIn(session_id="", tenant_id="t", seq=0, kind="pcm")
    with pytest.raises(ValueError):
        Media(session_id="s", tenant_id="t", seq=-2, kind="init")
    with pytest.raises(WireError, match="needs"):
        Tensor("float32", (4,), b"abc")
