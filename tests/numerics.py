"""Comparing floating-point results in tests: when to demand bit-equality, and how wide a tolerance is.

Rule
----
* ``torch.equal`` (bit-equality) only where both sides run the same operations in the same order on
  the same values: the same call twice, the same per-block code driven two ways, a save/load round
  trip, or an output position whose inputs did not change under an op of unchanged shapes. The test
  says in a comment why the order is the same.
* Everything else (chunked vs one-shot, different tensor shapes or batch sizes, different thread
  counts, another process or machine) may run other kernels: MKL, oneDNN and ATen choose blocking
  and vector width by tensor size and by CPU, and so the summation order. Those results are
  compared with :func:`assert_close_dtype`, whose tolerance follows from the dtype and an op count,
  never from what one machine happened to produce.

Derivation of the tolerance
---------------------------
With unit roundoff ``u = eps / 2``, a sum or dot product of ``n`` terms computed in *any* order
satisfies ``|fl(s) - s| <= gamma_n * sum|terms|`` with ``gamma_n = n u / (1 - n u)`` (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1). Two evaluation orders
therefore differ by at most ``2 gamma_n sum|terms| ~= n * eps * sum|terms|``. A network chains such
reductions; to first order, and with layers of gain about one (normalized activations, residual
blocks: the tiny test networks here), the errors of successive layers add, so two evaluation orders
of the whole computation differ by at most about::

    atol = ops * eps(dtype) * scale

* ``ops``: the op-count factor, the summed reduction lengths along the computation (for a network:
  every conv/linear fan-in plus norm and attention reductions; :func:`fan_in_sum` counts the first
  part). The caller states it and how it was counted.
* ``scale``: the magnitude of the summed terms. The default, ``max|expected|``, is right when the
  activations stay of the output's order (normalized layers); pass a larger one otherwise.

It is a worst-case first-order bound: observed differences are typically 10^2 to 10^4 times smaller
(rounding errors partly cancel), so the check does not depend on which kernels a CPU picks. It
still catches real bugs: in a float64 computation with ``ops ~ 2e4`` the bound is ~4e-12 relative,
while one float32 rounding anywhere on the path (a cache kept in the wrong dtype) is ~6e-8 relative.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def tolerance(dtype: torch.dtype, ops: int, scale: float) -> float:
    """The absolute tolerance ``ops * eps(dtype) * scale`` (see the module docstring)."""
    if not dtype.is_floating_point:
        raise TypeError(f"tolerance: {dtype} is not a floating-point dtype; compare integers exactly")
    if ops < 1 or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"tolerance: need ops >= 1 and a finite scale >= 0, got ops={ops}, scale={scale}")
    return ops * torch.finfo(dtype).eps * scale


def fan_in_sum(module: torch.nn.Module) -> int:
    """Sum of the reduction lengths of every conv and linear layer under ``module``.

    A conv's output element sums ``in_channels / groups * prod(kernel_size)`` products, a linear's
    ``in_features``. Norm and attention reductions are not counted: add them yourself.
    """
    total = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.conv._ConvNd):
            total += sub.in_channels // sub.groups * math.prod(sub.kernel_size)
        elif isinstance(sub, torch.nn.Linear):
            total += sub.in_features
    return total


def assert_close_dtype(actual, expected, *, ops: int, scale: float | None = None, msg: str = "") -> None:
    """Assert ``|actual - expected| <= ops * eps(dtype) * scale`` everywhere (no relative term).

    ``actual`` and ``expected`` are tensors (or numpy arrays) of the same shape and dtype; ``scale``
    defaults to ``max|expected|``. An absolute bound scaled by the magnitude is used instead of an
    element-wise relative one: summation-order errors are relative to the summed terms, not to an
    output that may happen to cancel to near zero.
    """
    actual = torch.from_numpy(actual) if isinstance(actual, np.ndarray) else actual
    expected = torch.from_numpy(expected) if isinstance(expected, np.ndarray) else expected
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{msg}: dtype {actual.dtype} != expected {expected.dtype}".lstrip(": "))
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = tolerance(expected.dtype, ops, scale)
    eps = torch.finfo(expected.dtype).eps
    detail = f"tolerance {atol:.3g} = ops {ops} * eps({expected.dtype}) {eps:.3g} * scale {scale:.3g}"
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol,
                               msg=lambda m: f"{msg}\n{m}\n{detail}" if msg else f"{m}\n{detail}")
