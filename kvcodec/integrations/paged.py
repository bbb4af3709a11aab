"""Paged KV buffers as serving engines keep them: each attention layer's keys and values in
fixed-size blocks of tokens, a request's tokens spread over the blocks its block table lists.
Read and written token by token, for a connector moving one request's KV to or from a store."""

from __future__ import annotations

import torch

from kvcodec.cache import LayerKV
from kvcodec.errors import InputError

# How an attention backend lays keys and values in a layer's standardized [blocks, heads,
# block_size, C] view (C = 2 x head_dim): "tiles", each (block, head) tile holds its keys as
# [head_dim, block_size] (transposed) and then its values as [block_size, head_dim] (vLLM's CPU
# backend with its "vec"/"vec16" kernels); "columns", the first head_dim of C are the key and the
# rest the value (FlashAttention, Triton and FlexAttention backends).
KV_SPLITS = {("CPU_ATTN", "vec"): "tiles", ("CPU_ATTN", "vec16"): "tiles", ("FLASH_ATTN", None): "columns",
             ("TRITON_ATTN", None): "columns", ("FLEX_ATTENTION", None): "columns"}


def token_slots(block_ids: list[int], block_size: int, start: int, stop: int) -> torch.Tensor:
    """The slot (block x block_size + offset) of each token in [start, stop) of a request whose
    block table is `block_ids`."""
    t = torch.arange(start, stop)
    return torch.tensor(block_ids, dtype=torch.int64)[t // block_size] * block_size + t % block_size


class PagedLayer:
    """One attention layer's paged KV buffer, read and written token by token."""

    def __init__(self, name: str, kv: torch.Tensor, split: str, head_dim: int):
        """`kv`: the layer's [blocks, heads, block_size, 2 x head_dim] view (any strides), its keys
        and values split as `split` (a value of KV_SPLITS) says."""
        if kv.dim() != 4 or kv.shape[3] != 2 * head_dim:
            raise InputError(f"a paged KV layer is [blocks, heads, block_size, 2 x {head_dim}]; {name} is "
                             f"{tuple(kv.shape)}")
        self.name, self.head_dim, self.block_size = name, head_dim, kv.shape[2]
        if split == "tiles":  # per tile: keys [D, N], then values [N, D]
            b, h, n, _ = kv.shape
            try:
                both = kv.view(b, h, 2, n * head_dim)
            except RuntimeError:
                raise InputError(f"{name}: keys and values in tiles need each block's tiles contiguous") from None
            self.key = both[:, :, 0].view(b, h, head_dim, n).transpose(2, 3)
            self.value = both[:, :, 1].view(b, h, n, head_dim)
        elif split == "columns":
            self.key, self.value = kv[..., :head_dim], kv[..., head_dim:]
        else:
            raise InputError(f"{name}: no paged KV split {split!r} (tiles or columns)")

    def read(self, slots: torch.Tensor) -> LayerKV:
        """The keys and values at `slots`, as [1, heads, tokens, head_dim] copies on the CPU."""
        block, offset = slots // self.block_size, slots % self.block_size
        return LayerKV(*(x[block, :, offset].transpose(0, 1).unsqueeze(0).contiguous().cpu()
                         for x in (self.key, self.value)))

    def write(self, slots: torch.Tensor, layer: LayerKV) -> None:
        block, offset = slots // self.block_size, slots % self.block_size
        self.key[block, :, offset] = layer.key[0].transpose(0, 1).to(self.key.dtype)
        self.value[block, :, offset] = layer.value[0].transpose(0, 1).to(self.value.dtype)
