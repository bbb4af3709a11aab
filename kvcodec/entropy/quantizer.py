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
MAX_SPAN_STEPS = 4000  # a channel spans at most this many steps (tables hold 4096 symbols)


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
    groups = -(-n // group_size)
    # tokens as [groups, group_size] (the last group padded): anchors are column 0, by views
    # rather than masks; padded places are computed and dropped
    a = len(anchored)
    ya = torch.nn.functional.pad(y[:, anchored.to(x.device)], (0, groups * group_size - n))
    ya = ya.reshape(b, a, groups, group_size)
    scale = float(1 << anchor_bits)
    anchors = torch.round(ya[..., 0] * scale).to(torch.int64)
    deltas = torch.round(ya[..., 1:].double() - (anchors.double() / scale)[..., None])
    deltas = deltas.reshape(b, a, groups * (group_size - 1))[..., :n - groups].to(torch.int64)
    return direct, anchors, deltas


def tree_sum(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum over `dims` by pairwise halving: the same additions in the same order on any device
    (torch's own reductions order them per device and CPU), so the bits agree everywhere.

    Summed elements are laid out as rows (kept elements along them), so that each halving adds
    whole rows; an odd row out is added to zero, as if padded to a power of two."""
    keep = [i for i in range(x.dim()) if i not in dims]
    kept = [x.shape[i] for i in keep]
    x = x.permute(*dims, *keep).reshape(-1, math.prod(kept))
    if len(x) == 0:
        return x.new_zeros(kept)
    while len(x) > 1:
        if len(x) % 2:
            x = torch.cat([x, x.new_zeros(1, x.shape[1])])
        x = x[0::2] + x[1::2]
    return x[0].reshape(kept)


def channel_steps(x: torch.Tensor, rel_step: float, emphasis: float) -> np.ndarray:
    """float32 [H*D] steps for the coded tokens `x` [B, H, N, D] of one (layer, key/value):
    `rel_step * sigma` (sigma: the spread of the channels around their means), scaled per
    channel by `(rms_c / mean rms) ** -emphasis` (0: one step for every channel), and never
    less than the channel's range over MAX_SPAN_STEPS, so that every cache fits the tables.

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
    steps = (rel_step * sigma * weight).numpy().astype(np.float32)
    return span_floor(steps, x)


def span_floor(steps: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """`steps` [H*D] widened where a channel of `x` [B, H, N, D] would span more symbols than a
    table holds (its range over MAX_SPAN_STEPS), in x's dtype: min and max are exact on any
    device, so the steps stay the same bits everywhere."""
    if x.shape[2] == 0:
        return steps
    spread = (x.amax(dim=(0, 2)) - x.amin(dim=(0, 2))).cpu().reshape(-1).numpy()
    return np.maximum(steps, (spread / MAX_SPAN_STEPS).astype(np.float32))


def value_counts(symbols) -> tuple[np.ndarray, np.ndarray]:
    """Each row's smallest value and its counts of every value from there up, of an int array
    or tensor [rows, n]: int64 numpy [rows] and [rows, span] (span: the widest row's; rows of
    no symbols start at 0 and count nothing). Counted in one bincount on the symbols' device:
    the entropies, value ranges and tables of a file's symbols all come from these counts."""
    symbols = torch.as_tensor(symbols)
    rows, n = symbols.shape
    if n == 0:
        return np.zeros(rows, dtype=np.int64), np.zeros((rows, 1), dtype=np.int64)
    low, high = torch.aminmax(symbols, dim=1)
    span = int((high - low).max()) + 1
    index = symbols + (torch.arange(rows, device=symbols.device) * span - low)[:, None]  # row * span + value - low
    counts = torch.bincount(index.reshape(-1), minlength=rows * span)
    return low.cpu().numpy(), counts.cpu().numpy().reshape(rows, span)


def counts_entropy_bits(counts: np.ndarray) -> np.ndarray:
    """`entropy_bits` of rows of symbols from their `value_counts` counts [rows, span]."""
    rows, span = counts.shape
    n = int(counts[0].sum()) if rows else 0  # every row counts the same number of symbols
    if n == 0:
        return np.zeros(rows)
    nz = np.flatnonzero(counts)
    c = counts.reshape(-1)[nz].astype(np.float64)
    return n * np.log2(n) - np.bincount(nz // span, weights=c * np.log2(c), minlength=rows)


def entropy_bits(symbols) -> np.ndarray:
    """Empirical entropy (total bits) of each row of an int array or tensor: N log N - sum c log c.
    Counted on the symbols' device; the logarithms on the CPU from the exact counts."""
    return counts_entropy_bits(value_counts(symbols)[1])
