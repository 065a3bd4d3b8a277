"""The dtype-derived tolerance in tests/numerics.py: it accepts a reordered sum and rejects real errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.numerics import assert_close_dtype, fan_in_sum, tolerance

pytestmark = pytest.mark.unit


def test_tolerance_is_ops_times_eps_times_scale():
    assert tolerance(torch.float64, 100, 2.0) == 100 * 2.0**-52 * 2.0
    assert tolerance(torch.float32, 100, 2.0) == 100 * 2.0**-23 * 2.0
    with pytest.raises(TypeError, match="floating-point"):
        tolerance(torch.int64, 1, 1.0)
    with pytest.raises(ValueError, match="ops >= 1"):
        tolerance(torch.float64, 0, 1.0)


def test_fan_in_sum_counts_conv_and_linear_reductions():
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, (3, 1, 2)), torch.nn.Conv2d(8, 8, 3, groups=2),
                              torch.nn.Linear(5, 2), torch.nn.LayerNorm(2))
    assert fan_in_sum(net) == 4 * 3 * 1 * 2 + 4 * 3 * 3 + 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_summation_orders_pass_and_a_single_rounding_sized_error_fails(dtype):
    n = 4096
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    blocked = x.sum(dim=0)  # ATen's vectorized, blocked reduction
    sequential = torch.cumsum(x, dim=0)[-1]  # strictly left-to-right: another order
    scale = x.abs().sum(dim=0).max().item()  # the sum of |terms|, as the derivation requires
    assert_close_dtype(sequential, blocked, ops=n, scale=scale)
    # negative control: one element off by half the bound passes at the full bound and fails at a
    # tenth of it, so the check is exactly as wide as stated
    atol = tolerance(dtype, n, scale)
    wrong = blocked.clone()
    wrong[3] += 0.5 * atol
    assert_close_dtype(wrong, blocked, ops=n, scale=scale)
    with pytest.raises(AssertionError, match="Mismatched elements: 1 / 8"):
        assert_close_dtype(wrong, blocked, ops=n // 10, scale=scale)
    if dtype == torch.float64:  # one float32 rounding in a float64 result is far outside the bound
        rounded = blocked.float().double()
        assert (rounded != blocked).all()
        with pytest.raises(AssertionError, match="Mismatched elements: 8 / 8"):
            assert_close_dtype(rounded, blocked, ops=n, scale=scale)


def test_shape_dtype_nan_and_numpy_inputs():
    a = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_dtype(a.float(), a, ops=1)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_dtype(torch.ones(4, dtype=torch.float64), a, ops=1)
    with pytest.raises(AssertionError):
        assert_close_dtype(torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), a, ops=1)
    assert_close_dtype(np.ones(3), np.ones(3) + 1e-16, ops=1)
    with pytest.raises(AssertionError, match="my context"):
        assert_close_dtype(np.ones(3), np.ones(3) + 1e-9, ops=1, msg="my context")
