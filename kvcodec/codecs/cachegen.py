"""`cachegen`: uniform quantization with layer- and K/V-dependent steps, entropy-coded with
per-channel tables in rANS lanes (CacheGen's design, measured and adjusted on SmolLM2).

- The first `sinks` tokens of the sequence (attention sinks) are stored exactly: the model
  attends to them most, and their error costs several times more divergence than any other.
- Every (layer, key/value) tensor has one step: `step = rel_step * sigma`, sigma being the
  standard deviation of the tensor's channels around their means (sinks excluded); shallow
  layers get finer steps. Symbols are `round(x / step)`.
- Each (layer, key/value, head, channel) has its own probability table, fitted on the whole
  cache and stored once per file: channel offsets (the key outlier channels) cost nothing.
- One lane per (batch, head, channel) of a chunk carries its tokens' symbols.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import torch
import zstandard

from .. import ans
from ..codec import ChunkInfo, Codec
from ..errors import CodecError

PRESETS = {  # relative step for (shallow, other) layers
    "high": (0.1, 0.2),
    "medium": (0.15, 0.3),
    "low": (0.25, 0.5),
}
TENSORS = ("key", "value")


class CacheGenCodec(Codec):
    codec_id = 5
    name = "cachegen"
    lossless = False
    description = "layer-wise uniform quantization, exact sink tokens, per-channel rANS tables"
    max_expansion = 4096.0  # float32 output from lanes of at least 1/128 bit per symbol

    def __init__(self, quality: str = "medium", key_step: float | None = None, value_step: float | None = None,
                 shallow_layers: float = 0.1, sinks: int = 4):
        if quality not in PRESETS:
            raise ValueError(f"quality must be one of {', '.join(PRESETS)}, not {quality!r}")
        for name, v in (("key_step", key_step), ("value_step", value_step)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 1e-4 <= v <= 100):
                raise ValueError(f"{name} must be a number from 1e-4 to 100, not {v!r}")
        if not isinstance(shallow_layers, (int, float)) or not 0 <= shallow_layers <= 1:
            raise ValueError(f"shallow_layers must be a fraction from 0 to 1, not {shallow_layers!r}")
        if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= 1024:
            raise ValueError(f"sinks must be an integer from 0 to 1024, not {sinks!r}")
        self.quality, self.key_step, self.value_step = quality, key_step, value_step
        self.shallow_layers, self.sinks = shallow_layers, sinks
        self._tables: dict[int, tuple[bytes, dict]] = {}

    def get_config(self) -> dict:
        return {"quality": self.quality, "key_step": self.key_step, "value_step": self.value_step,
                "shallow_layers": self.shallow_layers, "sinks": self.sinks}

    # -- steps -------------------------------------------------------------------------------
    def relative_step(self, layer: int, num_layers: int, tensor: str) -> float:
        shallow, other = PRESETS[self.quality]
        base = {"key": self.key_step, "value": self.value_step}[tensor]
        scale = (shallow / other) if layer < round(self.shallow_layers * num_layers) else 1.0
        return (base if base is not None else other) * scale

    @staticmethod
    def _sigma(x: torch.Tensor) -> float:
        centered = x - x.mean(dim=2, keepdim=True)
        s = float(centered.pow(2).mean().sqrt()) if x.shape[2] else 0.0
        return s if s > 0 else 1.0

    # -- shared context: steps and tables ----------------------------------------------------
    def fit(self, cache) -> list[bytes]:
        """One blob: per (layer, tensor) the step, then per (head, channel) a table (spec 8.5)."""
        out = io.BytesIO()
        out.write(struct.pack("<I", len(cache.layers)))
        for i, lay in enumerate(cache.layers):
            for name, t in zip(TENSORS, (lay.key, lay.value)):
                x = t.detach().to("cpu", torch.float32)[:, :, self.sinks:]
                step = np.float32(self.relative_step(i, len(cache.layers), name) * self._sigma(x))
                q = self._quantize(x, step)  # [B, H, T, D]
                b, h, n, d = q.shape
                per_channel = q.permute(1, 3, 0, 2).reshape(h * d, b * n).numpy()
                if per_channel.size:
                    los, his = per_channel.min(axis=1), per_channel.max(axis=1)
                else:
                    los = his = np.zeros(h * d, dtype=np.int64)
                sizes = np.maximum(his - los + 1, 2)
                if sizes.max() > ans.MAX_ALPHABET:
                    raise CodecError(f"cachegen: layer {i} {name} spans {sizes.max()} steps; use a larger step")
                codes = [ans.counts_to_codes(np.bincount(row - lo, minlength=size))
                         for row, lo, size in zip(per_channel, los, sizes)]
                out.write(struct.pack("<fII", step, h, d))
                out.write(los.astype("<i4").tobytes())
                out.write(sizes.astype("<u2").tobytes())
                out.write(np.concatenate(codes).tobytes())
        return [zstandard.ZstdCompressor(level=19).compress(out.getvalue())]

    def _parse(self, blob: bytes) -> dict:
        cached = self._tables.get(id(blob))
        if cached is not None and cached[0] is blob:  # the reader hands the same blob to every chunk
            return cached[1]
        try:
            raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=256 << 20)
            pos = 4
            (n_layers,) = struct.unpack_from("<I", raw, 0)
            tables = {}
            for i in range(n_layers):
                for name in TENSORS:
                    step, h, d = struct.unpack_from("<fII", raw, pos)
                    pos += 12
                    los = np.frombuffer(raw, dtype="<i4", count=h * d, offset=pos)
                    sizes = np.frombuffer(raw, dtype="<u2", count=h * d, offset=pos + 4 * h * d).astype(np.int64)
                    pos += 6 * h * d
                    ends = np.cumsum(sizes)
                    codes = np.frombuffer(raw, dtype=np.uint8, count=int(ends[-1]) if h * d else 0, offset=pos)
                    pos += codes.size
                    rows = [(int(lo), ans.Table(ans.weights_from_counts(ans.codes_to_counts(codes[e - n:e]))))
                            for lo, n, e in zip(los, sizes, ends)]
                    tables[(i, name)] = (np.float32(step), h, d, rows)
        except (zstandard.ZstdError, struct.error, ValueError, CodecError) as exc:
            raise CodecError(f"cachegen tables are corrupt ({exc})") from None
        self._tables = {id(blob): (blob, tables)}
        return tables

    def _table(self, context, info: ChunkInfo):
        if len(context) != 1:
            raise CodecError("cachegen needs exactly one context blob (its tables)")
        entry = self._parse(context[0]).get((info.layer, info.tensor))
        b, h, t, d = info.shape
        if entry is None or entry[1:3] != (h, d):
            raise CodecError(f"cachegen tables do not cover layer {info.layer} {info.tensor} of shape {info.shape}")
        return entry

    @staticmethod
    def _quantize(x: torch.Tensor, step: np.float32) -> torch.Tensor:
        return torch.round(x / torch.tensor(step)).to(torch.int64)

    # -- chunks ------------------------------------------------------------------------------
    def _sink_count(self, info: ChunkInfo) -> int:
        return max(0, min(self.sinks - info.token_start, info.shape[2]))

    def encode(self, chunk, info, context):
        step, h, d, rows = self._table(context, info)
        x = chunk.detach().to("cpu")
        s = self._sink_count(info)
        parts = [x[:, :, :s].contiguous().view(torch.uint8).numpy().tobytes()]
        q = self._quantize(x[:, :, s:].to(torch.float32), step)  # [B, H, n, D]
        lanes = []
        for bi in range(q.shape[0]):
            per_channel = q[bi].permute(0, 2, 1).reshape(h * d, -1).numpy()
            for c, (lo, w) in enumerate(rows):
                symbols = per_channel[c] - lo
                if symbols.size and (symbols.min() < 0 or symbols.max() >= w.size):
                    raise CodecError(f"cachegen: layer {info.layer} {info.tensor} holds values outside its tables "
                                     "(tables are fitted on the cache being packed)")
                lanes.append(ans.encode_lane(symbols, w))
        parts.append(np.array([lane.size for lane in lanes], dtype="<u4").tobytes())
        parts.extend(lane.astype("<u4").tobytes() for lane in lanes)
        return b"".join(parts)

    def decode(self, payload, info, context):
        step, h, d, rows = self._table(context, info)
        b, _, t, _ = info.shape
        s = self._sink_count(info)
        n = t - s
        itemsize = info.dtype.itemsize
        sink_bytes = b * h * s * d * itemsize
        n_lanes = b * h * d
        head = sink_bytes + 4 * n_lanes
        if len(payload) < head:
            raise CodecError(f"cachegen payload of layer {info.layer} {info.tensor} is truncated")
        counts = np.frombuffer(payload, dtype="<u4", count=n_lanes, offset=sink_bytes).astype(np.int64)
        if head + 4 * int(counts.sum()) != len(payload):
            raise CodecError(f"cachegen payload of layer {info.layer} {info.tensor} has the wrong length")
        words = np.frombuffer(payload, dtype="<u4", offset=head)
        ends = np.cumsum(counts)
        q = np.empty((b, h * d, n), dtype=np.float32)
        for lane in range(n_lanes):
            lo, w = rows[lane % (h * d)]
            symbols = ans.decode_lane(words[ends[lane] - counts[lane]:ends[lane]], w, n)
            q[lane // (h * d), lane % (h * d)] = symbols + lo
        body = torch.from_numpy(q).reshape(b, h, d, n).permute(0, 1, 3, 2).mul_(float(step)).to(info.dtype)
        out = torch.empty(info.shape, dtype=info.dtype)
        if s:
            sink = np.frombuffer(payload, dtype=np.uint8, count=sink_bytes).copy()
            out[:, :, :s] = torch.from_numpy(sink).view(info.dtype).reshape(b, h, s, d)
        out[:, :, s:] = body
        return out
