"""KV ring buffer and sink cache: which frames are visible, sizes, and flat memory over time."""

import numpy as np
import pytest
import torch

from models.config import DiTConfig, ModelInputError
from models.dit import CausalWanS2V
from models.kv_cache import KVCache, SinkCache, sink_positions
from models.motioner import framepack_positions

pytestmark = pytest.mark.unit

TINY = DiTConfig.tiny()
HW = (8, 8)          # latent grid -> 4x4 patch grid -> 16 tokens per frame


def _marked(frames, fsl, heads, hd):
    """K/V whose every token carries its absolute frame index (an independent record)."""
    v = torch.tensor(frames, dtype=torch.float32).repeat_interleave(fsl)
    return v[None, :, None, None].expand(1, len(v), heads, hd).clone()


def _visible_frames(kv, window):
    k, v = kv.read(0, window)
    marks = k[0, :, 0, 0].tolist()
    assert marks == v[0, :, 0, 0].tolist()
    frames = sorted(set(int(m) for m in marks))
    assert all(marks.count(f) == kv.frame_seq_len for f in frames)   # whole frames only
    return frames


@pytest.mark.parametrize("block", [3, 5, 12])
def test_ring_holds_exactly_the_last_capacity_frames(block):
    kv = KVCache.allocate(TINY, 1, HW)
    fsl, cap = kv.frame_seq_len, TINY.kv_cache_frames
    nbytes = kv.nbytes()
    for start in range(0, 40 * block, block):
        frames = list(range(start, start + block))
        window = kv.advance(start, block)
        mark = _marked(frames, fsl, TINY.num_heads, TINY.head_dim)
        kv.write(0, window, mark, mark)
        end = start + block
        assert _visible_frames(kv, window) == list(range(max(0, end - cap), end))
        assert kv.nbytes() == nbytes
    assert (kv.start_frame, kv.end_frame) == (end - cap, end)


def test_rerun_gap_and_out_of_range_blocks():
    kv = KVCache.allocate(TINY, 1, HW)
    fsl = kv.frame_seq_len
    for s in (0, 3, 6, 9, 12, 15):
        w = kv.advance(s, 3)
        m = _marked(range(s, s + 3), fsl, TINY.num_heads, TINY.head_dim)
        kv.write(0, w, m, m)
    # re-running a held block keeps older frames and forgets the later ones
    w = kv.advance(9, 3)
    assert _visible_frames(kv, w) == list(range(6, 12))
    with pytest.raises(ModelInputError, match="gap"):
        kv.advance(30, 3)
    with pytest.raises(ModelInputError, match="older"):
        kv.advance(0, 3)
    with pytest.raises(ModelInputError, match="1..12"):
        kv.advance(12, 13)
    # an empty cache may start anywhere (a stage rebuilt mid-stream)
    kv.reset()
    w = kv.advance(3000, 3)
    m = _marked(range(3000, 3003), fsl, TINY.num_heads, TINY.head_dim)
    kv.write(0, w, m, m)
    assert _visible_frames(kv, w) == [3000, 3001, 3002]


def test_real_size_cache_geometry_on_meta():
    cfg = DiTConfig()
    kv = KVCache.allocate(cfg, 1, (48, 88), device="meta", dtype=torch.bfloat16)
    assert kv.k[0].shape == (1, 12 * 1056, 40, 128)
    assert kv.nbytes() == 40 * 2 * 12672 * 5120 * 2               # 10.38 GB (§2.2)
    sink = SinkCache.allocate(cfg, 1, (48, 88), device="meta", dtype=torch.bfloat16)
    assert (sink.num_tokens, sink.num_ref_tokens) == (2640, 1056)  # 1056 + 1056 + 264 + 264
    assert sink_positions(cfg, (90, 50))[0].t.shape == (2778,)     # exact 720x400 grid (§1.5)
    with pytest.raises(ModelInputError, match="multiples"):
        KVCache.allocate(cfg, 1, (45, 88))


def test_framepack_positions_at_384x704():
    pos = framepack_positions(DiTConfig(), (48, 88))
    t, h, w = pos.t.numpy(), pos.h.numpy(), pos.w.numpy()
    post, x2, x4 = slice(0, 1056), slice(1056, 1320), slice(1320, 1584)
    assert len(pos) == 1584
    assert set(t[post]) == {-1} and set(t[x2]) == {-3}
    assert [int((t[x4] == v).sum()) for v in (-19, -14, -9, -4)] == [66] * 4
    assert sorted(set(h[post])) == list(range(24)) and sorted(set(w[post])) == list(range(44))
    # compressed buckets spread over the whole 24x44 patch grid, first and last row included
    for sl, n_h, n_w in ((x2, 12, 22), (x4, 6, 11)):
        hs, ws = sorted(set(h[sl])), sorted(set(w[sl]))
        assert len(hs) == n_h and len(ws) == n_w
        assert hs[0] == 0 and hs[-1] == 23 and ws[0] == 0 and ws[-1] == 43
        assert np.all(np.diff(hs) >= 1)


def test_sink_ref_group_moves_and_motion_stays():
    sink = SinkCache.allocate(TINY, 1, HW)
    before = sink.positions.t.clone()
    moved = sink.positions_at(1234)
    n = sink.num_ref_tokens
    assert (moved.t[:n] == 1234).all() and (before[:n] == TINY.ref_rope_time).all()
    assert torch.equal(moved.t[n:], before[n:]) and (before[n:] < 0).all()
    assert torch.equal(sink.positions.t, before)                  # not mutated


def test_cache_bytes_are_flat_while_a_stream_advances():
    torch.manual_seed(0)
    model = CausalWanS2V(TINY)
    g = torch.Generator().manual_seed(0)
    text = model.embed_text(torch.randn(1, 5, TINY.text_dim, generator=g))
    sink = SinkCache.allocate(TINY, 1, HW)
    kv = KVCache.allocate(TINY, 1, HW)
    with torch.no_grad():
        model.prefill_sink(torch.randn(1, 16, 1, *HW, generator=g), torch.randn(1, 16, 19, *HW, generator=g),
                           text, sink)
        sizes = set()
        for b in range(12):
            f0 = 3 * b
            out = model.forward_block(torch.randn(1, 16, 3, *HW, generator=g), 900.0,
                                      torch.randn(1, 5, TINY.audio_dim, 12, generator=g), text, kv, sink,
                                      f0, model.sink_ref_time(f0, 4 + b))
            assert torch.isfinite(out).all()
            sizes.add((kv.nbytes(), sink.nbytes(), len(kv.k), kv.k[0].shape, sink.k[0].shape))
    assert len(sizes) == 1
    assert kv.num_frames == TINY.kv_cache_frames
