"""3D RoPE: on-the-fly float64 angles vs the reference-style 45000-row table, and far positions.

The table comparisons are exact (``torch.equal``) because both sides run the same element-wise
operations on every entry: one float64 product ``position * frequency`` and ``torch.polar``'s
per-element cos/sin, in one process. There is no reduction, so the tensor shapes (which differ in
the mixed-axes case) do not change a value.
"""

import pytest
import torch

from models.rope import RopeFactors, RopePositions, apply_rope, rope_factors, rope_split, rope_table

pytestmark = pytest.mark.unit

TABLE_LEN = 45000


def test_band_split():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(16) == (8, 4, 4)
    with pytest.raises(ValueError):
        rope_split(7)


@pytest.mark.parametrize("head_dim", [128, 16])
def test_on_the_fly_equals_table_where_defined(head_dim):
    table = rope_table(TABLE_LEN, head_dim)                      # complex128 [45000, d/2]
    p = torch.arange(TABLE_LEN)
    f = rope_factors(RopePositions(p, p, p), head_dim)           # every axis at position p
    assert torch.equal(f.cos, table.real) and torch.equal(f.sin, table.imag)
    # mixed axes: token (t, h, w) takes each band from its own axis row of the table
    t, h, w = torch.randint(0, TABLE_LEN, (3, 500))
    f = rope_factors(RopePositions(t, h, w), head_dim)
    nt, nh, _ = (n // 2 for n in rope_split(head_dim))
    want = torch.cat([table[t, :nt], table[h, nt:nt + nh], table[w, nt + nh:]], dim=1)
    assert torch.equal(f.cos, want.real) and torch.equal(f.sin, want.imag)


def test_negative_positions_are_table_conjugates():
    """Motion tokens: the reference looks up |p| and conjugates."""
    table = rope_table(64, 128)
    p = torch.tensor([-1, -3, -19, -14, -9, -4])
    f = rope_factors(RopePositions(p, p, p), 128)
    ref = table[-p].conj()
    assert torch.equal(f.cos, ref.real) and torch.equal(f.sin, ref.imag)


def test_fp16_quantised_factors_match_reference_rounding():
    table = rope_table(TABLE_LEN, 128)
    p = torch.arange(TABLE_LEN)
    f = rope_factors(RopePositions(p, p, p), 128, fp16=True)
    assert torch.equal(f.cos, table.real.half().double())
    assert torch.equal(f.sin, table.imag.half().double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_apply_rope_is_the_adjacent_pair_complex_product(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 3, 128, generator=g, dtype=torch.float64)
    t, h, w = torch.randint(0, 1000, (3, 50), generator=g)
    f = rope_factors(RopePositions(t, h, w), 128)
    table = rope_table(1000, 128)
    nt, nh, _ = (n // 2 for n in rope_split(128))
    freqs = torch.cat([table[t, :nt], table[h, nt:nt + nh], table[w, nt + nh:]], dim=1)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 50, 3, 64, 2)) * freqs[None, :, None])
    out = apply_rope(x.to(dtype), f)
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), ref.reshape(2, 50, 3, 128), atol=tol, rtol=tol)


@pytest.mark.parametrize("far", [75_000 * 3, 75_000 * 3 * 10])
def test_far_positions_are_finite_and_keep_rope_relative_property(far):
    """Beyond the reference table (45000 frames), angles stay exact enough that attention
    scores depend only on position differences, exactly as near the origin."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 4, 128, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 128, generator=g, dtype=torch.float64)

    def score(pq, pk):
        fq = rope_factors(RopePositions(*(torch.tensor([v]) for v in pq)), 128)
        fk = rope_factors(RopePositions(*(torch.tensor([v]) for v in pk)), 128)
        return (apply_rope(q, fq) * apply_rope(k, fk)).sum(-1)

    for delta in (0, 1, 5, 29):
        near = score((delta, 3, 7), (0, 3, 7))
        far_s = score((far + delta, 3, 7), (far, 3, 7))
        torch.testing.assert_close(far_s, near, atol=1e-8, rtol=1e-8)
    for fp16 in (False, True):
        f = rope_factors(RopePositions(torch.tensor([far, -far]), torch.tensor([0, 5]), torch.tensor([1, 2])),
                         128, fp16=fp16)
        assert torch.isfinite(f.cos).all() and torch.isfinite(f.sin).all()
        assert ((f.cos ** 2 + f.sin ** 2 - 1).abs() < (2e-3 if fp16 else 1e-12)).all()


def test_factor_shape_mismatch_is_a_clear_error():
    f = RopeFactors(torch.ones(3, 64, dtype=torch.float64), torch.zeros(3, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="RoPE factors"):
        apply_rope(torch.zeros(1, 4, 1, 128), f)
