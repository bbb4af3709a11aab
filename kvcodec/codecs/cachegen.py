"""`cachegen`: CacheGen's design (layer-wise quantization, anchors and deltas, entropy coding
with per-channel tables in parallel lanes), adjusted to what measurements on SmolLM2 showed.
The quantizer, tables and lanes are `kvcodec.entropy`'s; this module is the codec's policy.

- The first `sinks` tokens (attention sinks) are stored exactly: the model attends to them
  most, and their error costs several times more divergence than any other token's.
- Steps: each (layer, key/value) has a base step `rel_step * sigma` (sigma: the spread of its
  channels around their means; shallow layers get finer steps), scaled per channel by
  `(rms_c / mean rms) ** -emphasis`. Large channels get finer steps: the query channels that
  meet the large key channels are large too, so their errors move attention the most.
- Anchors: tokens are grouped (`group_size`, restarting at each chunk) and a channel either
  codes every token directly, or codes the group's first token finely and the others as
  deltas to it; `fit` picks per channel whichever costs fewer bits. On SmolLM2 only some key
  channels (slow rotary frequencies) gain from deltas.
- Tables: one per (layer, key/value, head, channel), plus one for the deltas of an anchored
  channel, fitted on the whole cache and stored once per file.
- Payload: the sink tokens' raw bytes, then the lanes of the other tokens (`entropy.lanes`).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.cache import TENSORS
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec, check_finite
from kvcodec.dtypes import to_dtype
from kvcodec.entropy import lanes, tables
from kvcodec.entropy.quantizer import channel_steps
from kvcodec.entropy.tables import FileTables
from kvcodec.errors import CodecError

PRESETS = {  # relative base step of (shallow, other) layers; finest first
    "high": (0.18, 0.25),
    "medium": (0.25, 0.36),
    "low": (0.35, 0.5),
}
TARGET_STEPS = (0.1, 0.18, 0.25, 0.36, 0.5, 0.7, 1.0, 1.4)  # per-chunk choices for size or error targets


def sink_counts(sinks: int, token_start, tokens):
    """How many of a chunk's tokens are exact sinks: those before `sinks` (ints or arrays)."""
    return np.clip(sinks - np.asarray(token_start), 0, tokens)


class CacheGenCodec(Codec):
    codec_id = 5
    name = "cachegen"
    lossless = False
    description = "layer-wise quantization, anchors and deltas, exact sinks, per-channel rANS tables"
    max_expansion = 4096.0  # float32 output from lanes of at least 1/128 bit per symbol
    device_decoder = "kvcodec.kernels.cachegen"
    device_encoder = "kvcodec.kernels.cachegen"

    def __init__(self, quality: str = "medium", key_step: float | None = None, value_step: float | None = None,
                 key_emphasis: float = 1.0, value_emphasis: float = 0.5, shallow_layers: float = 0.1,
                 sinks: int = 4, group_size: int = 10, anchor_bits: int = 1):
        if quality not in PRESETS:
            raise ValueError(f"quality must be one of {', '.join(PRESETS)}, not {quality!r}")
        for name, v, lo, hi in (("key_step", key_step, 1e-4, 100), ("value_step", value_step, 1e-4, 100),
                                ("key_emphasis", key_emphasis, 0, 2), ("value_emphasis", value_emphasis, 0, 2),
                                ("shallow_layers", shallow_layers, 0, 1)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
                raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, not {v!r}")
        for name, v, lo, hi in (("sinks", sinks, 0, 1024), ("group_size", group_size, 1, 1024),
                                ("anchor_bits", anchor_bits, 0, 8)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {v!r}")
        self.quality, self.key_step, self.value_step = quality, key_step, value_step
        self.key_emphasis, self.value_emphasis = key_emphasis, value_emphasis
        self.shallow_layers, self.sinks = shallow_layers, sinks
        self.group_size, self.anchor_bits = group_size, anchor_bits

    @classmethod
    def presets(cls) -> list[dict]:
        """A ladder of relative steps (finer than `high` to far coarser than `low`) for targets."""
        return [{"key_step": r, "value_step": r} for r in TARGET_STEPS]

    # -- policy ------------------------------------------------------------------------------
    def relative_step(self, layer: int, num_layers: int, tensor: str) -> float:
        shallow, other = PRESETS[self.quality]
        base = {"key": self.key_step, "value": self.value_step}[tensor]
        scale = (shallow / other) if layer < round(self.shallow_layers * num_layers) else 1.0
        return (base if base is not None else other) * scale

    def sink_count(self, info: ChunkInfo) -> int:
        return int(sink_counts(self.sinks, info.token_start, info.shape[2]))

    # -- shared context: steps, modes and tables -------------------------------------------
    def fit(self, chunks: Chunks) -> list[bytes]:
        """One blob with every (layer, key/value)'s steps, channel modes and tables (spec 8.5),
        fitted where the cache lies: a GPU fits the same tables."""
        fitted = {}
        for i in range(chunks.num_layers):
            for name in TENSORS:
                for info, chunk in chunks.of(i, name):
                    check_finite(chunk, info, self.name)
                bodies = [chunk.detach()[:, :, self.sink_count(info):].to(torch.float32)
                          for info, chunk in chunks.of(i, name)] or [torch.zeros(chunks.shape(i, name))]
                emphasis = self.key_emphasis if name == "key" else self.value_emphasis
                steps = channel_steps(torch.cat(bodies, 2), self.relative_step(i, chunks.num_layers, name), emphasis)
                fitted[(i, name)] = tables.fit(bodies, steps, self.group_size, self.anchor_bits,
                                               f"cachegen: layer {i} {name}")
        return [FileTables(fitted).to_blob(chunks.num_layers)]

    def load_context(self, blobs) -> FileTables:
        if len(blobs) != 1:
            raise CodecError("cachegen needs exactly one context blob (its tables)")
        return FileTables.from_blob(blobs[0], self.name)

    # -- chunks ------------------------------------------------------------------------------
    def encode(self, chunk, info, context: FileTables):
        tt = context.for_chunk(info, self.name)
        x = chunk.detach().to("cpu")
        s = self.sink_count(info)
        body = lanes.encode(x[:, :, s:].to(torch.float32), tt, f"cachegen: layer {info.layer} {info.tensor}")
        return x[:, :, :s].contiguous().view(torch.uint8).numpy().tobytes() + body

    def decode(self, payload, info, context: FileTables):
        tt = context.for_chunk(info, self.name)
        b, h, t, d = info.shape
        s = self.sink_count(info)
        sink_bytes = b * h * s * d * info.dtype.itemsize
        where = f"cachegen payload of layer {info.layer} {info.tensor}"
        if len(payload) < sink_bytes:
            raise CodecError(f"{where} is truncated")
        u = lanes.decode(memoryview(payload)[sink_bytes:], tt, (b, h, t - s, d), where)
        out = torch.empty(info.shape, dtype=info.dtype)
        out[:, :, s:] = to_dtype(torch.from_numpy(u).reshape(b, h, d, t - s).permute(0, 1, 3, 2), info.dtype)
        if s:
            sink = np.frombuffer(payload, dtype=np.uint8, count=sink_bytes).copy()
            out[:, :, :s] = torch.from_numpy(sink).view(info.dtype).reshape(b, h, s, d)
        return out
