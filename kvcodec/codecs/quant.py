"""`quant`: asymmetric grouped integer quantization (2/3/4/8 bits), bit-packed.

Keys are grouped per channel along tokens and values per token along channels: key outliers
sit in fixed channels, value outliers do not (KIVI). Group minima and scales are float16 so
that `code * scale` is exact in float32 and every decoder, fused or not, is bit-exact.

Payload (spec 8.4): every group's float16 minimum, then every group's float16 scale, then the
codes bit-packed; `group_count` and `payload_length` are its one definition, for the CPU
decoder and (on arrays of records) the GPU kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.codecs import bitpack
from kvcodec.codecs.base import ChunkInfo, Codec, check_payload_length
from kvcodec.dtypes import to_dtype
from kvcodec.errors import CodecError

FP16_MAX = 65504.0


def group_count(is_key, batch, heads, tokens, head_dim, group_size):
    """Groups of a chunk (ints, or numpy arrays over records): keys group tokens per channel,
    values channels per token."""
    return np.where(is_key, batch * heads * (-(-tokens // group_size)) * head_dim,
                    batch * heads * tokens * (-(-head_dim // group_size)))


def payload_length(is_key, batch, heads, tokens, head_dim, group_size, bits):
    """Bytes of a chunk's payload: two float16 per group, then the packed codes."""
    return 4 * group_count(is_key, batch, heads, tokens, head_dim, group_size) + \
        bitpack.packed_length(batch * heads * tokens * head_dim, bits)


def _round_to_half(x: torch.Tensor, toward: float) -> torch.Tensor:
    """float32 -> float16 rounded toward -inf (toward < 0) or +inf (toward > 0)."""
    h = x.to(torch.float16)
    off = h.float() > x if toward < 0 else h.float() < x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, toward * float("inf"))), h)


class QuantCodec(Codec):
    codec_id = 4
    name = "quant"
    lossless = False
    description = "grouped asymmetric integer quantization; keys per channel, values per token"
    max_expansion = 16.0  # float32 output from 2-bit codes
    blob_count = 0
    device_decoder = "kvcodec.kernels.quant"

    @classmethod
    def presets(cls, options: dict | None = None) -> list[dict]:
        return [{"bits": b} for b in sorted(bitpack.SUPPORTED_BITS, reverse=True)]

    def __init__(self, bits: int = 4, group_size: int = 64):
        if bits not in bitpack.SUPPORTED_BITS or isinstance(bits, bool):
            raise ValueError(f"bits must be one of {bitpack.SUPPORTED_BITS}, not {bits!r}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or not 1 <= group_size <= 65536:
            raise ValueError(f"group_size must be an integer from 1 to 65536, not {group_size!r}")
        self.bits = bits
        self.group_size = group_size

    # Groups run along tokens (axis 2) for keys and along channels (axis 3) for values.
    def _axis(self, info: ChunkInfo) -> int:
        return 2 if info.tensor == "key" else 3

    def _param_shape(self, info: ChunkInfo) -> tuple[int, ...]:
        shape = list(info.shape)
        axis = self._axis(info)
        shape[axis] = -(-shape[axis] // self.group_size)
        return tuple(shape)

    def payload_length(self, info: ChunkInfo) -> int:
        return int(payload_length(info.tensor == "key", *info.shape, self.group_size, self.bits))

    def encode(self, chunk, info, context):
        x = chunk.detach().to(torch.float32)  # on the chunk's device: a GPU encodes the same bytes
        if not torch.isfinite(x).all() or x.abs().max() > FP16_MAX:
            raise CodecError(
                f"quant: layer {info.layer} {info.tensor} holds NaN, infinity or magnitudes beyond float16; "
                "use a lossless codec"
            )
        axis, g = self._axis(info), self.group_size
        n = x.shape[axis]
        ng = -(-n // g)
        pad = ng * g - n
        if pad:  # repeat the last element so padding does not widen any group's range
            x = torch.cat([x, x.narrow(axis, n - 1, 1).expand(*[pad if a == axis else s for a, s in enumerate(x.shape)])], axis)
        grouped = x.unflatten(axis, (ng, g))
        lo = _round_to_half(grouped.amin(axis + 1), -1)
        hi = grouped.amax(axis + 1)
        levels = (1 << self.bits) - 1
        # a tensor divisor: CUDA divides by a Python scalar through its reciprocal, which rounds differently
        scale = _round_to_half((hi - lo.float()) / torch.full_like(hi, levels), +1)
        m = lo.float().unsqueeze(axis + 1)
        s = scale.float().unsqueeze(axis + 1)
        q = torch.where(s > 0, torch.round((grouped - m) / torch.where(s > 0, s, 1.0)), 0.0)
        q = q.clamp_(0, levels).to(torch.uint8).flatten(axis, axis + 1).narrow(axis, 0, n)
        return b"".join(
            (lo.contiguous().cpu().numpy().tobytes(), scale.contiguous().cpu().numpy().tobytes(),
             bitpack.pack(q.contiguous().cpu().numpy().reshape(-1), self.bits))
        )

    def decode(self, payload, info, context):
        check_payload_length(payload, self.payload_length(info), info, self.name)
        pshape = self._param_shape(info)
        n_groups = int(np.prod(pshape))
        params = np.frombuffer(payload, dtype=np.float16, count=2 * n_groups)
        m = torch.from_numpy(params[:n_groups].astype(np.float32)).reshape(pshape)
        s = torch.from_numpy(params[n_groups:].astype(np.float32)).reshape(pshape)
        codes = bitpack.unpack(memoryview(payload)[4 * n_groups:], info.numel, self.bits)
        q = torch.from_numpy(codes.astype(np.float32)).reshape(info.shape)
        axis = self._axis(info)
        n = info.shape[axis]
        m = m.repeat_interleave(self.group_size, axis).narrow(axis, 0, n)
        s = s.repeat_interleave(self.group_size, axis).narrow(axis, 0, n)
        return to_dtype(q.mul_(s).add_(m), info.dtype)

    def dequantize_8bit(self, payload, info: ChunkInfo, device) -> torch.Tensor:
        """`decode` of an 8-bit payload with tensor operations on `device` (8-bit codes need no
        unpacking: ae moves its latents to the GPU as they are and dequantizes them there)."""
        if self.bits != 8:
            raise CodecError(f"quant: dequantize_8bit needs 8-bit codes, not {self.bits}")
        check_payload_length(payload, self.payload_length(info), info, self.name)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        pshape = self._param_shape(info)
        n = int(np.prod(pshape))
        lo, scale = data[:4 * n].view(torch.float16).float().reshape(2, *pshape)
        codes = data[4 * n:4 * n + info.numel].float().reshape(info.shape)  # codes are padded to whole bytes of 8
        axis = self._axis(info)
        size = info.shape[axis]
        m = lo.repeat_interleave(self.group_size, axis).narrow(axis, 0, size)
        s = scale.repeat_interleave(self.group_size, axis).narrow(axis, 0, size)
        return to_dtype(codes * s + m, info.dtype)
