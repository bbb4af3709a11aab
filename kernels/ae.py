"""GPU decode of `ae` records, fused: each program dequantizes a tile of 8-bit latent vectors,
runs the decoder network on it (latent -> hidden -> SiLU -> head_dim, then the layer's
normalization undone) and writes fp16/bf16/fp32 straight into the output layout. One launch
decodes every record of a batch, whatever its layer: the weights of all layers lie stacked on
the device and each program picks its own. Entropy-coded latents are first decoded by the
shared lane decoder (`lane_decode`) into a float32 buffer, which the same network kernel then reads.

Matmuls accumulate in float32 ("ieee" precision, no TF32), in a different order from torch's:
the output matches the CPU decoder to float32 rounding, not bit for bit (the codec is lossy and
its CPU and GPU paths differ alike).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.codecs import quant
from kvcodec.codecs.device import Launch, where
from kvcodec.errors import CodecError
from kvcodec.kernels import jobs as J
from kvcodec.kernels.lane_decode import prepare_lanes
from kvcodec.kernels.lane_encode import encode_lanes
from kvcodec.kernels.rounding import to_output_dtype
from kvcodec.kernels.tiles import output_base, tile_of

# the column `prepare` adds: the latents' element offset (entropy-coded), or quant's group count
LATENTS_AT = N_GROUPS = J.extra_columns(1)[0]
TOKENS_PER_PROGRAM = 64
NUM_WARPS = 4
MAX_WIDTH = 256  # latent, hidden and head dims a program holds in registers


@triton.jit
def _ae_kernel(staged_ptr, params_ptr, latents_ptr, out_ptr, table_ptr, first_job, w_up, b_up, e_up, w_out, b_out,
               mean, std, NCOL: tl.constexpr, L: tl.constexpr, HID: tl.constexpr, D: tl.constexpr,
               SLOTS: tl.constexpr, LAYERS: tl.constexpr, GROUP: tl.constexpr, SHARED: tl.constexpr,
               DECODED: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    row, t0, bh, heads, in_job = tile_of(table_ptr, first_job, NCOL, BT)
    src = tl.load(row + J.SRC)
    tokens = tl.load(row + J.TOKENS)
    layer = tl.load(row + J.LAYER)
    tensor = tl.load(row + J.TENSOR)
    rows = tl.where(in_job, tokens - t0, 0)
    ti = tl.arange(0, BT)[:, None]
    li = tl.arange(0, BL)
    hi = tl.arange(0, BH)
    di = tl.arange(0, BD)
    vector = bh * tokens + t0 + ti
    mask = (ti < rows) & (li[None, :] < L)
    if DECODED:  # float32 latents [batch, heads, tokens, L] from their element offset on
        z = tl.load(latents_ptr + tl.load(row + LATENTS_AT) + vector * L + li[None, :], mask=mask, other=0)
    else:  # quant's value layout: one float16 minimum and scale per GROUP channels of a vector
        n_groups = tl.load(row + N_GROUPS)
        g = vector * ((L + GROUP - 1) // GROUP) + li[None, :] // GROUP
        params = params_ptr + src // 2
        lo = tl.load(params + g, mask=mask, other=0).to(tl.float32)
        scale = tl.load(params + n_groups + g, mask=mask, other=0).to(tl.float32)
        code = tl.load(staged_ptr + src + 4 * n_groups + vector * L + li[None, :], mask=mask, other=0)
        z = code.to(tl.float32) * scale + lo
    # the decoder network of this record's layer and tensor (slot 0 of each tensor when shared)
    net = tensor * SLOTS + (0 if SHARED else layer)
    at_layer = tensor * LAYERS + layer
    wu = tl.load(w_up + net * L * HID + li[:, None] * HID + hi[None, :], mask=(li[:, None] < L) & (hi[None, :] < HID),
                 other=0)
    bias = tl.load(b_up + net * HID + hi, mask=hi < HID, other=0)
    if SHARED:
        bias += tl.load(e_up + at_layer * HID + hi, mask=hi < HID, other=0)
    h = tl.dot(z, wu, input_precision="ieee") + bias[None, :]
    h = h * tl.sigmoid(h)
    wo = tl.load(w_out + net * HID * D + hi[:, None] * D + di[None, :], mask=(hi[:, None] < HID) & (di[None, :] < D),
                 other=0)
    y = tl.dot(h, wo, input_precision="ieee") + tl.load(b_out + net * D + di, mask=di < D, other=0)[None, :]
    y = y * tl.load(std + at_layer * D + di, mask=di < D, other=1)[None, :] \
        + tl.load(mean + at_layer * D + di, mask=di < D, other=0)[None, :]
    base = output_base(row, bh, heads) + t0 * D
    tl.store(out_ptr + base + ti * D + di[None, :], to_output_dtype(y, out_ptr), mask=(ti < rows) & (di[None, :] < D))


def _dims(codec, context) -> tuple[int, int, int] | None:
    """(latent, hidden, head dim) when both tensors' networks have one head dim, else None."""
    config = codec.network(context, "cpu").config
    dims = set(config.head_dim.values())
    return (config.latent_dim, config.hidden, dims.pop()) if len(dims) == 1 else None


def supports(codec, context, table: np.ndarray, itemsize: int) -> np.ndarray:
    """8-bit or entropy-coded latents, networks narrow enough for one program's registers."""
    dims = _dims(codec, context) if codec.bits == 8 or codec.entropy else None
    return J.fits_grid(table) & (dims is not None and max(dims) <= MAX_WIDTH)


_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> its stacked tensors


def stacked_weights(codec, context, device) -> dict[str, torch.Tensor]:
    """The key and value networks' tensors stacked along a first axis of 2 (key, value), kept
    as long as the network is."""
    ae = codec.network(context, device)
    if ae not in _STACKED:
        nets = [ae.nets[name] for name in ("key", "value")]
        stack = {name: torch.stack([getattr(n, name).detach().float() for n in nets]).contiguous()
                 for name in ("w_up", "b_up", "w_out", "b_out", "mean", "std")}
        embed = torch.stack([n.embed_up.detach().float() for n in nets]).contiguous()
        stack["e_up"] = embed if embed.numel() else torch.zeros(1, device=device)
        _STACKED[ae] = stack
    return _STACKED[ae]


def prepare(codec, context, table: np.ndarray, staged: torch.Tensor, out: torch.Tensor) -> Launch:
    config = codec.network(context, "cpu").config
    latent, hidden, head_dim = _dims(codec, context)
    b, h, t, d = (table[:, c] for c in (J.BATCH, J.HEADS, J.TOKENS, J.HEAD_DIM))
    misfit = np.flatnonzero((table[:, J.LAYER] >= config.layers) | (h != config.heads) | (d != head_dim))
    if misfit.size:
        raise CodecError(f"ae: the record of {where(table[misfit[0]])} does not fit the weights "
                         f"({config.layers} layers of {config.heads} heads x {head_dim})")
    g = codec.group_size
    steps, checks = [], []
    if codec.entropy:  # the lane decoder decodes the latents of every record into one buffer
        n = b * h * t * latent
        at = np.cumsum(n) - n
        latent_table = table.copy()
        latent_table[:, J.HEAD_DIM], latent_table[:, J.DST] = latent, at
        latent_table[:, J.STRIDE_B], latent_table[:, J.STRIDE_H] = h * t * latent, t * latent
        latents = torch.empty(max(1, int(n.sum())), dtype=torch.float32, device=out.device)
        no_sinks = np.zeros(len(table), np.int64)
        decode_latents = prepare_lanes(context.latent_tables, latent_table, no_sinks, staged, latents, codec.name)
        steps.append(decode_latents)
        checks = decode_latents.checks
        table = J.with_columns(table, at)
    else:
        groups = quant.group_count(False, b, h, t, latent, g)  # quant's value layout
        expected = quant.payload_length(False, b, h, t, latent, g, 8)
        bad = np.flatnonzero(table[:, J.LENGTH] != expected)
        if bad.size:
            raise CodecError(f"ae payload of {where(table[bad[0]])} is {int(table[bad[0], J.LENGTH])} bytes; "
                             f"its shape needs {int(expected[bad[0]])}")
        latents = out  # unused
        table = J.with_columns(table, groups)
    weights = stacked_weights(codec, context, out.device)
    bt = TOKENS_PER_PROGRAM
    launches = J.tile_launches(table, t, bt)
    args = (staged, staged.view(torch.float16), latents, out, J.to_device(table, out.device))
    stack = [weights[k] for k in ("w_up", "b_up", "e_up", "w_out", "b_out", "mean", "std")]

    def run():
        for first, grid in launches:
            _ae_kernel[grid](*args, first, *stack, NCOL=table.shape[1], L=latent, HID=hidden, D=head_dim,
                             SLOTS=1 if config.shared else config.layers, LAYERS=config.layers, GROUP=g,
                             SHARED=config.shared, DECODED=codec.entropy, BT=bt, BL=max(16, J.block(latent)),
                             BH=max(16, J.block(hidden)), BD=max(16, J.block(head_dim)), num_warps=NUM_WARPS)
    steps.append(run)
    return Launch(steps, checks)


@torch.no_grad()
def encode(codec, chunk: torch.Tensor, info, context) -> bytes:
    """ae's payload of a chunk on the GPU: latents by the network there; entropy-coded lanes by
    the GPU lane encoder, 8-bit latents by `quant` (which quantizes on the latents' device)."""
    if not codec.entropy:
        return codec.encode(chunk, info, context)
    ae = codec.network(context, chunk.device, encoding=True)
    latent_info = codec.latent_info(ae, info)
    latent = ae.encode(info.tensor, info.layer, chunk)
    return encode_lanes(latent, context.latent_tables.for_chunk(latent_info, codec.name),
                        f"ae: layer {info.layer} {info.tensor} latents")
