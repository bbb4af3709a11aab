"""Uniform per-channel quantization of KV tensors into the integer symbols the entropy coder
codes, computed the same bits on any device (the CPU and GPU encoders share it).

A channel either codes every token directly (`round(x / step)`), or is anchored: tokens are
grouped (`group_size`, restarting at each chunk), the group's first token (the anchor) is coded
finely (`step / 2**anchor_bits`) and the others as deltas to it (spec 8.5)."""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_WEIGHT = 64.0  # per-channel step multipliers are clamped to [1/64, 64]


def group_layout(n: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For `n` coded tokens of a chunk: which are anchors, and each token's anchor index."""
    pos = np.arange(n)
    return pos % group_size == 0, pos // group_size


def quantize(x: torch.Tensor, steps: torch.Tensor, anchored: torch.Tensor, group_size: int, anchor_bits: int):
    """Direct symbols of all channels, anchor symbols and deltas of the anchored ones, on x's
    device.

    `x` [B, H, n, D] (float32) are the coded tokens of one chunk, `steps` [H*D] float32,
    `anchored` the anchored channels' indices. Returns int64 tensors shaped [B, H*D, n],
    [B, A, anchors] and [B, A, n - anchors] (A = anchored channels).
    """
    b, h, n, d = x.shape
    y = x.permute(0, 1, 3, 2).reshape(b, h * d, n) / steps.to(x.device)[:, None]
    direct = torch.round(y).to(torch.int64)  # half to even, as np.rint
    pos = torch.arange(n, device=x.device)
    is_anchor = pos % group_size == 0
    ya = y[:, anchored.to(x.device)]
    scale = float(1 << anchor_bits)
    anchors = torch.round(ya[:, :, is_anchor] * scale).to(torch.int64)
    group = (pos // group_size)[~is_anchor]
    deltas = torch.round(ya[:, :, ~is_anchor].double() - (anchors.double() / scale)[:, :, group]).to(torch.int64)
    return direct, anchors, deltas


def tree_sum(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum over `dims` by pairwise halving: the same additions in the same order on any device
    (torch's own reductions order them per device and CPU), so the bits agree everywhere."""
    keep = [i for i in range(x.dim()) if i not in dims]
    x = x.permute(*keep, *dims).reshape(*[x.shape[i] for i in keep], -1)
    width = 1 << max(0, (x.shape[-1] - 1).bit_length())
    x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def channel_steps(x: torch.Tensor, rel_step: float, emphasis: float) -> np.ndarray:
    """float32 [H*D] steps for the coded tokens `x` [B, H, N, D] of one (layer, key/value):
    `rel_step * sigma` (sigma: the spread of the channels around their means), scaled per
    channel by `(rms_c / mean rms) ** -emphasis` (0: one step for every channel).

    Sums run on x's device in a fixed pairwise order (`tree_sum`) and everything after them on
    the CPU, so the steps are the same bits wherever the cache lies."""
    b, h, n, d = x.shape
    if n == 0:
        return np.ones(h * d, dtype=np.float32)
    x = x.double()
    centered = x - (tree_sum(x, (2,)) / n)[:, :, None, :]
    sigma = math.sqrt(float(tree_sum(centered.pow(2).reshape(1, -1), (1,))[0]) / x.numel()) or 1.0
    rms = (tree_sum(x.pow(2), (0, 2)).cpu() / (b * n)).sqrt().reshape(-1)  # [H*D]
    weight = (rms / rms.mean()).clamp_min(1e-6).pow(-emphasis) if rms.mean() > 0 else torch.ones_like(rms)
    weight = (weight / weight.log().mean().exp()).clamp(1 / MAX_WEIGHT, MAX_WEIGHT)
    return (rel_step * sigma * weight).numpy().astype(np.float32)


def entropy_bits(symbols) -> np.ndarray:
    """Empirical entropy (total bits) of each row of an int array or tensor: N log N - sum c log c.
    Counted on the symbols' device; the logarithms on the CPU from the exact counts."""
    symbols = torch.as_tensor(symbols)
    rows, n = symbols.shape
    if n == 0:
        return np.zeros(rows)
    shifted = symbols - symbols.min(dim=1, keepdim=True).values
    span = int(shifted.max()) + 1
    index = shifted + torch.arange(rows, device=symbols.device)[:, None] * span
    counts = torch.bincount(index.reshape(-1), minlength=rows * span).cpu().numpy()
    nz = np.flatnonzero(counts)
    c = counts[nz].astype(np.float64)
    return n * np.log2(n) - np.bincount(nz // span, weights=c * np.log2(c), minlength=rows)
