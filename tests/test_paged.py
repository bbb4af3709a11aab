"""Paged KV layers (`kvcodec.integrations.paged`), which the vLLM connector reads and writes,
checked against the expressions vLLM 0.32's attention backends themselves split a layer's
[blocks, heads, block_size, 2 x head_dim] view with (cpu_attn.py, flash_attn.py)."""

from __future__ import annotations

import pytest
import torch

from kvcodec.cache import LayerKV
from kvcodec.errors import InputError
from kvcodec.integrations.paged import PagedLayer, token_slots

B, H, N, D = 6, 3, 4, 8


def vllm_cpu_split(kv):
    """CPU_ATTN ("vec" and "vec16" kernels): `kv.view(blocks, heads, 2 * block_size, -1).chunk(2,
    dim=2)`, into which `cpu_attn_reshape_and_cache` writes each tile's keys transposed (dim d
    of the tile's token t at d * block_size + t) and its values as rows: [B, H, N, D] each.
    (Checked against the real op in the vLLM test environment, tests/stacks/vllm_connector.py.)"""
    key_tiles, value = kv.view(B, H, 2 * N, -1).chunk(2, dim=2)
    return key_tiles.reshape(B, H, D, N).transpose(2, 3), value


def vllm_flash_split(kv):
    """FLASH_ATTN / TRITON_ATTN: `kv.transpose(1, 2).split(head_size, dim=-1)`, [B, N, H, D] each."""
    key, value = kv.transpose(1, 2).split(D, dim=-1)
    return key.transpose(1, 2), value.transpose(1, 2)


def test_token_slots_follow_the_block_table():
    assert token_slots([5, 2, 9], 4, 0, 10).tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 36, 37]
    assert token_slots([5, 2, 9], 4, 6, 9).tolist() == [10, 11, 36]


@pytest.mark.parametrize("split, vllm_split, physical", [
    ("tiles", vllm_cpu_split, "BHNC"),
    ("columns", vllm_flash_split, "BHNC"),
    ("columns", vllm_flash_split, "BNHC"),  # the layout FlashAttention allocates: heads inside tokens
])
def test_writes_land_where_the_attention_backend_reads_and_reads_invert_them(split, vllm_split, physical):
    if physical == "BNHC":
        kv = torch.zeros(B, N, H, 2 * D, dtype=torch.bfloat16).transpose(1, 2)  # a logical [B, H, N, C] view
    else:
        kv = torch.zeros(B, H, N, 2 * D, dtype=torch.bfloat16)
    layer = PagedLayer("layer.0", kv, split, D)
    blocks, start, stop = [4, 1, 3], 2, 11
    slots = token_slots(blocks, N, start, stop)
    t = stop - start
    want = LayerKV(torch.randn(1, H, t, D).to(torch.bfloat16), torch.randn(1, H, t, D).to(torch.bfloat16))
    layer.write(slots, want)
    key, value = vllm_split(kv)
    for i, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, N)
        assert key[b, :, o].equal(want.key[0, :, i]) and value[b, :, o].equal(want.value[0, :, i])
    assert (kv != 0).sum() == 2 * t * H * D  # nothing else written
    back = layer.read(slots)
    assert back.key.equal(want.key) and back.value.equal(want.value)
    assert back.key.is_contiguous() and back.key.device.type == "cpu"


def test_layers_of_another_shape_or_split_are_refused():
    with pytest.raises(InputError, match="2 x 8"):
        PagedLayer("l", torch.zeros(B, H, N, D), "tiles", D)
    with pytest.raises(InputError, match="no paged KV split"):
        PagedLayer("l", torch.zeros(B, H, N, 2 * D), "diagonal", D)
    with pytest.raises(InputError, match="contiguous"):
        PagedLayer("l", torch.zeros(B, N, H, 2 * D).transpose(1, 2), "tiles", D)
