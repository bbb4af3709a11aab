"""float32 -> output dtype as the CPU decoders convert (`kvcodec.dtypes.to_dtype`, spec 8):
round to nearest even, saturating at the dtype's largest finite magnitude, NaN kept.

The bfloat16 case is done with integer operations: Triton's interpreter (how CI runs the
kernels) truncates when it converts to bfloat16, while GPUs round to nearest even."""

import triton
import triton.language as tl

FP16_MAX = tl.constexpr(65504.0)
BF16_MAX = tl.constexpr(3.3895313892515355e38)  # 0x7F7F0000
FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _saturated(x, top):
    return tl.where(x > top, top, tl.where(x < -top, -top, x))  # comparisons with NaN are false: NaN stays


@triton.jit
def to_output_dtype(x, out_ptr):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = _saturated(x, BF16_MAX).to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the rounding would carry it to 0)
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif out_ptr.dtype.element_ty == tl.float16:
        return _saturated(x, FP16_MAX).to(tl.float16)
    else:
        return _saturated(x, FP32_MAX).to(out_ptr.dtype.element_ty)
