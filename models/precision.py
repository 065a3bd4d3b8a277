"""Numeric precision of the DiT on a GPU: the bf16 error model and the FP8 linear path.

bf16 error model (what the bf16 tests and the GPU checks compare against)
    bfloat16 keeps 8 significant bits: machine epsilon 2^-7, unit round-off u = 2^-8. Rounding a
    value to bf16 changes it by at most u relatively, and by at most u / sqrt(3) in relative RMS
    (the absolute error is uniform on +-half an ulp; for Gaussian-like data the RMS is about 0.74
    of that, see tests/unit/models/test_precision.py). A network that rounds its
    signal ``n`` times in sequence, with independent errors that add in quadrature, ends up with a
    relative RMS error of about ``u / sqrt(3) * sqrt(n)`` against the same network in float32.
    :func:`bf16_tolerance` returns ``safety * u / sqrt(3) * sqrt(n)`` with ``safety = 3`` for the
    amplification through layer norms, softmax and the modulation gates, which this first-order
    model leaves out. What ``n`` is for each network:

    * DiT: the residual stream is cast to bf16 once per block (models/dit.py's dtype policy keeps
      the in-block residual in fp32), plus the token embedding and the head input: ``n = layers + 2``.
    * VAE decoder: every convolution's output is bf16 and nothing is kept in fp32 between them:
      ``n`` = the number of convolutions the decoder runs (:func:`count_rounding_convs`).

    The relative error is ``||a - b||_2 / ||b||_2`` over a whole output tensor (:func:`relative_error`).

FP8 linears (``linear_precision="fp8"``, CUDA with compute capability >= 8.9 only)
    Weights are quantised once, when the model is loaded, to ``float8_e4m3fn`` with a float32
    scale, either one per tensor (``scaling="tensor"``, what the reference's ``--fp8`` does) or one
    per output row (``scaling="row"``). Activations are quantised on the fly the same way (one
    scale per tensor, or per token row). The matmul is ``torch._scaled_mm`` with bf16 output:

        y = (x_q * s_x) @ (w_q * s_w)^T + b,   x_q = e4m3(x / s_x),  s_x = amax|x| / 448

    e4m3 keeps 4 significant bits (eps 2^-3, u = 2^-4) and its largest finite value is 448, so a
    quantise-dequantise round trip errs by at most ``2^-4 * |x|`` for normal numbers and by half a
    subnormal step, ``2^-10 * scale``, below the normal range (:func:`e4m3_roundtrip_bound`).
    :func:`fp8_linear_reference` is the same computation done by dequantising and multiplying in
    float32; the CPU tests hold the quantisation to it and the GPU tests hold ``_scaled_mm`` to it.
    Layers kept in bf16 (as in the reference): the text and time embeddings, the time projection,
    the output head and the audio encoder's final linear; we also keep the declared fp32 modules
    (``models.dit.FP32_MODULES``) and any linear whose sizes are not multiples of 16 (a
    ``_scaled_mm`` requirement) out of FP8.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

BF16_UNIT_ROUNDOFF = 2.0 ** -8
BF16_SAFETY = 3.0
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)          # 448
E4M3_UNIT_ROUNDOFF = 2.0 ** -4                                   # 3 stored mantissa bits
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10                            # half of the smallest subnormal 2^-9
FP8_MIN_CAPABILITY = (8, 9)                                      # Ada (sm_89) and Hopper (sm_90)
SCALINGS = ("tensor", "row")

#: nn.Linear modules the FP8 path leaves in bf16 (the reference's exclusions; glob patterns).
FP8_EXCLUDED = ("text_embedding.*", "time_embedding.*", "time_projection.*", "head.head",
                "casual_audio_encoder.*final_linear")


class PrecisionError(RuntimeError):
    """A precision mode was requested that this device or build cannot run."""


# ---------------------------------------------------------------------------------------------
# bf16 error model
# ---------------------------------------------------------------------------------------------

def bf16_tolerance(roundings: int, safety: float = BF16_SAFETY) -> float:
    """Relative RMS error bound of a bf16 network against float32 after ``roundings`` sequential
    roundings of its signal: ``safety * u / sqrt(3) * sqrt(roundings)`` (see the module doc)."""
    if roundings < 1:
        raise ValueError(f"roundings must be >= 1, got {roundings}")
    return safety * BF16_UNIT_ROUNDOFF / math.sqrt(3.0) * math.sqrt(roundings)


def dit_bf16_roundings(num_layers: int) -> int:
    """bf16 roundings of the DiT's signal: one residual cast per block, the embedding, the head input."""
    return num_layers + 2


def count_rounding_convs(module: nn.Module) -> int:
    """Convolutions in ``module`` (each rounds its bf16 output once)."""
    return sum(1 for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b||_2 / ||b||_2`` in float64 (``b`` is the reference)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if a64.shape != b64.shape:
        raise ValueError(f"shapes differ: {tuple(a64.shape)} vs {tuple(b64.shape)}")
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# FP8 quantisation
# ---------------------------------------------------------------------------------------------

def _check_scaling(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"FP8 scaling must be one of {SCALINGS}, got {scaling!r}")


def fp8_scale(x: Tensor, scaling: str = "tensor") -> Tensor:
    """float32 scale(s) mapping ``x``'s largest magnitude to 448: a 0-d tensor, or ``[rows, 1]``
    for ``scaling="row"`` on a 2-D ``x``. All-zero rows get scale 1 (any scale is exact for 0)."""
    _check_scaling(scaling)
    xf = x.detach().float().abs()
    if scaling == "tensor":
        amax = xf.amax()
    else:
        if x.ndim != 2:
            raise ValueError(f"row scaling needs a 2-D tensor, got shape {tuple(x.shape)}")
        amax = xf.amax(dim=1, keepdim=True)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_fp8(x: Tensor, scaling: str = "tensor", scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` -> (``float8_e4m3fn`` values, float32 scale) with ``x ~= q.float() * scale``.

    ``x / scale`` is clamped to [-448, 448] before the cast (the cast does not saturate), so a
    given ``scale`` smaller than ``amax / 448`` clips instead of producing NaN.
    """
    s = fp8_scale(x, scaling) if scale is None else scale.float()
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scale.float()).to(dtype)


def e4m3_roundtrip_bound(x: Tensor, scale: Tensor) -> Tensor:
    """Elementwise bound on ``|x - dequantize(quantize(x))|`` for ``|x| <= 448 * scale``:
    ``max(2^-4 |x|, 2^-10 scale)`` (relative half-ulp for normals, half a subnormal step below)."""
    return torch.maximum(E4M3_UNIT_ROUNDOFF * x.float().abs(), E4M3_SUBNORMAL_HALF_STEP * scale.float())


def fp8_linear_reference(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None,
                         scaling: str = "tensor", out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """What the FP8 linear computes, done the slow way: quantise the activations like
    :class:`FP8Linear` does, dequantise both operands and multiply in float32 (exact products,
    float32 accumulation). ``x [..., in]``, ``weight_q [out, in]`` e4m3 -> ``[..., out]``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    xq, xs = quantize_fp8(x2, scaling)
    y = dequantize_fp8(xq, xs) @ dequantize_fp8(weight_q, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*shape[:-1], weight_q.shape[0])


# ---------------------------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------------------------

def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """None if FP8 linears can run on ``device``, else why not (one sentence)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"FP8 linears need a CUDA GPU with compute capability >= "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}; the model is on {device}")
    if not torch.cuda.is_available():
        return "FP8 linears need CUDA, and torch.cuda.is_available() is False"
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch build ({torch.__version__}) has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < FP8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; FP8 "
                f"matmuls need >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada or Hopper)")
    return None


def require_fp8(device: torch.device | str) -> None:
    """Raise :class:`PrecisionError` saying why, unless FP8 linears can run on ``device``."""
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        raise PrecisionError(f"linear_precision='fp8' is not available: {reason}. "
                             f"Use linear_precision='bf16'.")


# ---------------------------------------------------------------------------------------------
# The FP8 linear layer and the model conversion
# ---------------------------------------------------------------------------------------------

class FP8Linear(nn.Module):
    """``nn.Linear`` with e4m3 weights and a float32 scale; ``torch._scaled_mm`` at call time.

    Buffers ``weight_fp8 [out, in]`` and ``weight_scale`` (0-d, or ``[out, 1]`` for row scaling);
    ``bias`` stays bf16. The output is bf16. There is deliberately no ``weight`` attribute: code
    that reads a linear's weight directly must not run on an FP8 layer unnoticed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scaling: str = "tensor",
                 device: torch.device | str | None = None, fast_accum: bool = True):
        super().__init__()
        _check_scaling(scaling)
        self.in_features, self.out_features, self.scaling = in_features, out_features, scaling
        self.fast_accum = fast_accum           # the reference uses use_fast_accum=True
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
        scale_shape = () if scaling == "tensor" else (out_features, 1)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "tensor", fast_accum: bool = True) -> FP8Linear:
        """Quantise ``linear``'s weight (once) into a new layer on the same device."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scaling, w.device,
                    fast_accum)
        q, s = quantize_fp8(w, scaling)
        layer.weight_fp8.copy_(q)
        layer.weight_scale.copy_(s.reshape(layer.weight_scale.shape))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().to(torch.bfloat16))
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scaling={self.scaling}"

    def reference_forward(self, x: Tensor) -> Tensor:
        """The dequantise-and-multiply emulation (:func:`fp8_linear_reference`); any device."""
        return fp8_linear_reference(x, self.weight_fp8, self.weight_scale, self.bias, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out] bf16, via ``torch._scaled_mm`` (CUDA only)."""
        if x.device.type != "cuda":
            require_fp8(x.device)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        xq, xs = quantize_fp8(x2, self.scaling)
        if self.scaling == "tensor":
            scale_a, scale_b, bias = xs, self.weight_scale, self.bias
        else:   # scale_a [M, 1], scale_b [1, N]; the bias is added after (not every build fuses it here)
            scale_a, scale_b, bias = xs, self.weight_scale.reshape(1, -1), None
        # mat2 must be column-major: the transpose of the row-major [out, in] weight is.
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                             out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        if self.scaling == "row" and self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def fp8_exclusions() -> tuple[str, ...]:
    """The reference's exclusions plus the declared fp32 modules of the DiT."""
    from models.dit import FP32_MODULES

    return FP8_EXCLUDED + tuple(FP32_MODULES)


def convert_linears_to_fp8(model: nn.Module, scaling: str = "tensor", exclude: Iterable[str] | None = None,
                           check_device: bool = True, fast_accum: bool = True) -> dict[str, list[str]]:
    """Replace every eligible ``nn.Linear`` of ``model`` by an :class:`FP8Linear` (in place).

    ``check_device=False`` skips :func:`require_fp8` (CPU tests of the quantisation only; the
    converted model then cannot run its forward off CUDA). Returns the names converted and the
    names kept, with the reason, as ``{"converted": [...], "kept": ["name (reason)", ...]}``.
    """
    _check_scaling(scaling)
    patterns = tuple(fp8_exclusions() if exclude is None else exclude)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if check_device and linears:
        require_fp8(linears[0][1].weight.device)
    converted, kept = [], []
    for name, lin in linears:
        if _excluded(name, patterns):
            kept.append(f"{name} (excluded)")
            continue
        if lin.in_features % 16 or lin.out_features % 16:
            kept.append(f"{name} (sizes {lin.in_features}x{lin.out_features} not multiples of 16)")
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, FP8Linear.from_linear(lin, scaling, fast_accum))
        converted.append(name)
    return {"converted": converted, "kept": kept}


def fp8_parameter_share(model: nn.Module) -> float:
    """Fraction of the model's linear parameters that are FP8 (a quick check of a conversion)."""
    fp8 = sum(m.weight_fp8.numel() for m in model.modules() if isinstance(m, FP8Linear))
    bf = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    return fp8 / max(1, fp8 + bf)


__all__ = [
    "BF16_UNIT_ROUNDOFF", "E4M3_MAX", "FP8_EXCLUDED", "FP8Linear", "PrecisionError", "bf16_tolerance",
    "convert_linears_to_fp8", "count_rounding_convs", "dequantize_fp8", "dit_bf16_roundings",
    "e4m3_roundtrip_bound", "fp8_linear_reference", "fp8_scale", "fp8_unavailable_reason", "quantize_fp8",
    "fp8_parameter_share", "relative_error", "require_fp8",
]
