"""Small helpers shared by the Triton kernel files: torch→Triton dtype mapping and IEEE-exact jit math."""

import torch
import triton
import triton.language as tl

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.bool: tl.int8,  # a bool tensor is one byte per element; loaded as int8 and compared with 0
}


def tl_dtype(dtype):
    """The Triton element type of a torch dtype (bool maps to int8, its storage)."""
    return TL_DTYPE[dtype]


def compute_dtype(dtype):
    """Kernels compute in float64 for float64 tensors and in float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def f64(x):
    """A float64 scalar from a `tl.float64`-annotated argument (compiled) or a Python float (interpreter, which
    ignores the annotation and would otherwise round the value to float32)."""
    return tl.full((), x, tl.float64)


@triton.jit
def div_rn(a, b, CD: tl.constexpr):
    """IEEE division: `/` is approximate for float32 on GPU, exact for float64."""
    if CD == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt_rn(x, CD: tl.constexpr):
    """IEEE square root: `tl.sqrt` is approximate for float32 on GPU, exact for float64."""
    if CD == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def lerp(a, b, w):
    """torch.lerp(a, b, w) for a scalar weight w in the compute dtype, as ATen's vectorised CPU kernel computes it:
    fma(w, b - a, a) when |w| < 0.5, else fma(w - 1, b - a, b) (exact at w = 1)."""
    small = tl.abs(w) < 0.5
    coeff = tl.where(small, w, w - 1.0)
    base = tl.where(small, a, b)
    return tl.fma(coeff, b - a, base)


@triton.jit
def cast(x, DTYPE: tl.constexpr):
    """x.to(DTYPE) rounding to nearest even, also for bfloat16, where the interpreter's cast truncates: the bit
    arithmetic is torch's own fp32 -> bf16 rounding (NaN kept quiet), identical to the GPU's cvt.rn.bf16.f32."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(is_nan, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
