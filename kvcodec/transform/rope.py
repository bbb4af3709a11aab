"""Rotary position embedding as transformers applies it to keys ("rotate half": channel d pairs
with d + P for d < P, where P = len(inv_freq); channels from 2P on are not rotated), so that a
codec can code keys before their rotation, where a head's channels are far more alike from
token to token, and rotate them back exactly.

The angles are float64 products of a position and a float32 frequency (exact), their cosine and
sine rounded to float32: every machine computes the same float32 values unless a libm's float64
result straddles a float32 rounding boundary (spec 8.7). Rotation runs in float64.
"""

from __future__ import annotations

import numpy as np
import torch


def cos_sin(inv_freq: np.ndarray, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos and sin (values of float32) [rows, tokens, P] of the angles `position * inv_freq`
    for int64 `positions` [rows, tokens] and float32 `inv_freq` [P], computed on the host."""
    angle = positions.cpu().numpy().astype(np.float64)[..., None] * inv_freq.astype(np.float64)
    cos = np.cos(angle).astype(np.float32).astype(np.float64)
    sin = np.sin(angle).astype(np.float32).astype(np.float64)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float, sign: float) -> torch.Tensor:
    """x [B, H, n, D] float64 turned by the angles (sign 1: as the model does, -1: back), rows of
    cos/sin broadcasting over heads (1 row) or matching them."""
    p = cos.shape[-1]
    cos, sin = cos.to(x.device)[None], (sign * sin).to(x.device)[None]  # [1, rows, n, P]
    a, b = x[..., :p], x[..., p:2 * p]
    out = x.clone()
    if sign > 0:
        out[..., :p] = (a * cos - b * sin) * scale
        out[..., p:2 * p] = (b * cos + a * sin) * scale
    else:
        out[..., :p] = (a * cos - b * sin) / scale
        out[..., p:2 * p] = (b * cos + a * sin) / scale
    return out


def rotate(x: torch.Tensor, inv_freq: np.ndarray, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """Keys before rotation [B, H, n, D] (float64) as the model stores them at `positions`."""
    cos, sin = cos_sin(inv_freq, positions)
    return _turn(x, cos, sin, scale, 1.0)


def unrotate(x: torch.Tensor, inv_freq: np.ndarray, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """The inverse of `rotate` (up to rounding): keys as they were before the model rotated them."""
    cos, sin = cos_sin(inv_freq, positions)
    return _turn(x, cos, sin, scale, -1.0)
