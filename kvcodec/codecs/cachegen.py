"""`cachegen`: CacheGen's design (layer-wise quantization, anchors and deltas, entropy coding
with per-channel tables in parallel lanes), adjusted to what measurements on SmolLM2 showed.

- The first `sinks` tokens (attention sinks) are stored exactly: the model attends to them
  most, and their error costs several times more divergence than any other token's.
- Steps: each (layer, key/value) has a base step `rel_step * sigma` (sigma: the spread of its
  channels around their means; shallow layers get finer steps), scaled per channel by
  `(rms_c / mean rms) ** -emphasis`. Large channels get finer steps: the query channels that
  meet the large key channels are large too, so their errors move attention the most.
- Anchors: tokens are grouped (`group_size`, restarting at each chunk) and a channel either
  codes every token directly, or codes the group's first token finely (`step / 2**anchor_bits`)
  and the others as deltas to it. `fit` picks per channel whichever costs fewer bits; on
  SmolLM2 only some key channels (slow rotary frequencies) gain from deltas.
- Tables: one per (layer, key/value, head, channel), plus one for the deltas of an anchored
  channel, fitted on the whole cache and stored once per file.
- Lanes: one per (batch, head, channel) of a chunk, plus one delta lane per anchored channel.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvcodec.entropy import rans as ans
from kvcodec.codecs.base import ChunkInfo, Codec
from kvcodec.errors import CodecError

PRESETS = {  # relative base step of (shallow, other) layers; finest first
    "high": (0.18, 0.25),
    "medium": (0.25, 0.36),
    "low": (0.35, 0.5),
}
TARGET_STEPS = (0.1, 0.18, 0.25, 0.36, 0.5, 0.7, 1.0, 1.4)  # per-chunk choices for size or error targets
TENSORS = ("key", "value")
MAX_SYMBOL = 1 << 20  # |lo| and lo + n stay below this, so decoded values are exact in float32
MAX_WEIGHT = 64.0  # per-channel step multipliers are clamped to [1/64, 64]
TABLES_MAX_EXPANSION = 4096  # decompressed table bytes per compressed byte a reader accepts


@dataclass
class TensorTables:
    """What decoding one (layer, key/value) needs: steps, modes and tables of its channels."""

    heads: int
    head_dim: int
    group_size: int
    anchor_bits: int
    steps: np.ndarray  # float32 [H*D]
    anchored: np.ndarray  # bool [H*D]
    flat_weights: np.ndarray  # int64: H*D main tables, then one delta table per anchored channel, back to back
    los: np.ndarray  # int64 [tables]: each table's first value
    sizes: np.ndarray  # int64 [tables]: each table's alphabet size
    _tables: list | None = None

    @property
    def weights(self) -> list[np.ndarray]:
        return np.split(self.flat_weights, np.cumsum(self.sizes)[:-1])

    @property
    def tables(self) -> list:
        """(lo, ans.Table) per table, built on first use: the CPU coder's models cost ~10 us
        each, and the GPU decoder needs only the weights."""
        if self._tables is None:
            self._tables = [(int(lo), ans.Table(w, checked=False)) for lo, w in zip(self.los, self.weights)]
        return self._tables

    @property
    def delta_of(self) -> np.ndarray:
        """Index into `tables` of each anchored channel's delta table."""
        return self.heads * self.head_dim + np.arange(int(self.anchored.sum()))


def _inflate(blob: bytes) -> bytes:
    """The tables blob decompressed piece by piece, so memory grows with the real output and a
    hostile blob cannot make a reader reserve more than a bounded multiple of its size."""
    limit = min(256 << 20, (1 << 20) + TABLES_MAX_EXPANSION * len(blob))
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(bytes(blob)) as reader:
        while piece := reader.read(1 << 20):
            out += piece
            if len(out) > limit:
                raise ValueError(f"they expand beyond {limit} bytes")
    return bytes(out)


def _triton_available() -> bool:
    from kvcodec.kernels import triton_available

    return triton_available()


def _group_layout(n: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For `n` coded tokens of a chunk: which are anchors, and each token's anchor index."""
    pos = np.arange(n)
    return pos % group_size == 0, pos // group_size


def quantize(x: torch.Tensor, steps: torch.Tensor, anchored: torch.Tensor, group_size: int, anchor_bits: int):
    """Direct symbols of all channels, anchor symbols and deltas of the anchored ones, on x's
    device (the CPU and GPU encoders share it, so their symbols agree exactly).

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


def _tree_sum(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum over `dims` by pairwise halving: the same additions in the same order on any device
    (torch's own reductions order them per device and CPU), so the bits agree everywhere."""
    keep = [i for i in range(x.dim()) if i not in dims]
    x = x.permute(*keep, *dims).reshape(*[x.shape[i] for i in keep], -1)
    width = 1 << max(0, (x.shape[-1] - 1).bit_length())
    x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _entropy_bits(symbols) -> np.ndarray:
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


def _fit_tables(direct: torch.Tensor, anchors: torch.Tensor, deltas: torch.Tensor, anchored: torch.Tensor):
    """First value, alphabet size and symbol counts of every table of one (layer, key/value):
    per channel its direct or (anchored) anchor symbols, then the anchored channels' deltas.
    Counted on the symbols' device; returns numpy int64 arrays (counts back to back)."""
    plain, marked = torch.nonzero(~anchored).reshape(-1), torch.nonzero(anchored).reshape(-1)
    channels, n_anchored = len(anchored), len(marked)
    places = [plain, marked, channels + torch.arange(n_anchored, device=direct.device)]  # table of each row
    values = [direct[plain], anchors[marked], deltas[marked]]
    lo = torch.zeros(channels + n_anchored, dtype=torch.int64, device=direct.device)
    hi = torch.zeros_like(lo)
    for place, v in zip(places, values):
        if v.shape[1]:
            lo[place], hi[place] = v.min(dim=1).values, v.max(dim=1).values
    sizes = torch.clamp(hi - lo + 1, min=2)
    offset = torch.cumsum(sizes, 0) - sizes - lo  # symbol value -> index in the counts
    index = torch.cat([(v + offset[place][:, None]).reshape(-1) for place, v in zip(places, values)])
    counts = torch.bincount(index, minlength=int(sizes.sum()))
    return lo.cpu().numpy(), sizes.cpu().numpy(), counts.cpu().numpy()


class CacheGenCodec(Codec):
    codec_id = 5
    name = "cachegen"
    lossless = False
    description = "layer-wise quantization, anchors and deltas, exact sinks, per-channel rANS tables"
    max_expansion = 4096.0  # float32 output from lanes of at least 1/128 bit per symbol

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
        self._parsed: tuple[bytes, dict] | None = None

    @classmethod
    def presets(cls) -> list[dict]:
        """A ladder of relative steps (finer than `high` to far coarser than `low`) for targets."""
        return [{"key_step": r, "value_step": r} for r in TARGET_STEPS]

    # -- steps -------------------------------------------------------------------------------
    def relative_step(self, layer: int, num_layers: int, tensor: str) -> float:
        shallow, other = PRESETS[self.quality]
        base = {"key": self.key_step, "value": self.value_step}[tensor]
        scale = (shallow / other) if layer < round(self.shallow_layers * num_layers) else 1.0
        return (base if base is not None else other) * scale

    def channel_steps(self, x: torch.Tensor, rel_step: float, emphasis: float) -> np.ndarray:
        """float32 [H*D] steps for the body `x` [B, H, N, D] of one (layer, key/value).

        Sums run on x's device in a fixed pairwise order (`_tree_sum`) and everything after
        them on the CPU, so the steps are the same bits wherever the cache lies."""
        b, h, n, d = x.shape
        if n == 0:
            return np.ones(h * d, dtype=np.float32)
        x = x.double()
        centered = x - (_tree_sum(x, (2,)) / n)[:, :, None, :]
        sigma = math.sqrt(float(_tree_sum(centered.pow(2).reshape(1, -1), (1,))[0]) / x.numel()) or 1.0
        rms = (_tree_sum(x.pow(2), (0, 2)).cpu() / (b * n)).sqrt().reshape(-1)  # [H*D]
        weight = (rms / rms.mean()).clamp_min(1e-6).pow(-emphasis) if rms.mean() > 0 else torch.ones_like(rms)
        weight = (weight / weight.log().mean().exp()).clamp(1 / MAX_WEIGHT, MAX_WEIGHT)
        return (rel_step * sigma * weight).numpy().astype(np.float32)

    # -- quantization, shared by fit and encode ------------------------------------------------
    def _symbols(self, x: torch.Tensor, steps: np.ndarray, anchored: np.ndarray, group_size: int):
        """`quantize` of a CPU chunk, as int64 numpy arrays."""
        return tuple(t.numpy() for t in quantize(x, torch.from_numpy(steps), torch.from_numpy(np.flatnonzero(anchored)),
                                                 group_size, self.anchor_bits))

    def _chunk_bodies(self, t: torch.Tensor, chunk_tokens: int):
        for start in range(0, t.shape[2], chunk_tokens):
            s = max(0, min(self.sinks - start, chunk_tokens))
            yield t[:, :, start + s:start + chunk_tokens]

    # -- shared context: steps, modes and tables -------------------------------------------
    def fit(self, cache, chunk_tokens: int) -> list[bytes]:
        """One blob with every (layer, key/value)'s steps, channel modes and tables (spec 8.5)."""
        out = io.BytesIO()
        out.write(struct.pack("<I", len(cache.layers)))
        for i, lay in enumerate(cache.layers):
            for name, t in zip(TENSORS, (lay.key, lay.value)):
                t = t.detach().to(torch.float32)  # stays on its device: a GPU fits the same tables
                b, h, _, d = t.shape
                c_all = h * d
                emphasis = self.key_emphasis if name == "key" else self.value_emphasis
                steps = self.channel_steps(t[:, :, self.sinks:], self.relative_step(i, len(cache.layers), name), emphasis)
                everyone = torch.arange(c_all)
                parts = [quantize(body, torch.from_numpy(steps), everyone, self.group_size, self.anchor_bits)
                         for body in self._chunk_bodies(t, chunk_tokens)]
                direct, anchors, deltas = (torch.cat([p[k].transpose(0, 1).reshape(c_all, -1) for p in parts], 1)
                                           for k in range(3))  # [H*D, tokens of all chunks]
                anchored = np.zeros(c_all, dtype=bool)
                if self.group_size > 1 and deltas.numel():
                    spans = (deltas.max(dim=1).values - deltas.min(dim=1).values).cpu().numpy()
                    table_bits = 8 * (spans + 7)  # a second table's bytes
                    lane_bits = len(parts) * b * (32 + 48)  # a delta lane's length and final state per chunk
                    cost = _entropy_bits(anchors) + _entropy_bits(deltas) + table_bits + lane_bits
                    anchored = cost < _entropy_bits(direct)
                los, sizes, counts = _fit_tables(direct, anchors, deltas, torch.from_numpy(anchored).to(t.device))
                if sizes.max() > ans.MAX_ALPHABET or np.abs(los).max() + sizes.max() >= MAX_SYMBOL:
                    raise CodecError(f"cachegen: layer {i} {name} spans {sizes.max()} steps; use a larger step")
                out.write(struct.pack("<IIII", h, d, self.group_size, self.anchor_bits))
                out.write(steps.astype("<f4").tobytes())
                out.write(anchored.astype(np.uint8).tobytes())
                out.write(los.astype("<i4").tobytes())
                out.write(sizes.astype("<u2").tobytes())
                out.write(ans.counts_to_codes(counts, sizes).tobytes())
        return [zstandard.ZstdCompressor(level=19, write_checksum=True).compress(out.getvalue())]

    def _parse(self, blob: bytes) -> dict:
        if self._parsed is not None and self._parsed[0] is blob:  # the reader hands every chunk the same blob
            return self._parsed[1]
        try:
            raw = _inflate(blob)
            (n_layers,) = struct.unpack_from("<I", raw, 0)
            pos, tensors = 4, {}
            for i in range(n_layers):
                for name in TENSORS:
                    h, d, group_size, anchor_bits = struct.unpack_from("<IIII", raw, pos)
                    c = h * d
                    steps = np.frombuffer(raw, dtype="<f4", count=c, offset=pos + 16).astype(np.float32)
                    modes = np.frombuffer(raw, dtype=np.uint8, count=c, offset=pos + 16 + 4 * c)
                    n_tables = c + int(np.count_nonzero(modes))
                    pos += 16 + 5 * c
                    los = np.frombuffer(raw, dtype="<i4", count=n_tables, offset=pos).astype(np.int64)
                    sizes = np.frombuffer(raw, dtype="<u2", count=n_tables, offset=pos + 4 * n_tables).astype(np.int64)
                    pos += 6 * n_tables
                    if (not 1 <= group_size <= 1024 or anchor_bits > 8 or modes.max(initial=0) > 1
                            or (group_size == 1 and modes.any()) or not np.all(np.isfinite(steps))
                            or steps.min(initial=1) <= 0 or sizes.min(initial=2) < 2 or sizes.max(initial=2) > ans.MAX_ALPHABET
                            or np.abs(los).max(initial=0) + sizes.max(initial=0) >= MAX_SYMBOL):
                        raise ValueError(f"layer {i} {name} has out-of-range fields")
                    ends = np.cumsum(sizes)
                    codes = np.frombuffer(raw, dtype=np.uint8, count=int(ends[-1]) if n_tables else 0, offset=pos)
                    pos += codes.size
                    weights = ans.weights_from_counts_many(ans.codes_to_counts(codes), sizes, split=False)
                    tensors[(i, name)] = TensorTables(h, d, group_size, anchor_bits, steps, modes.astype(bool), weights,
                                                      los, sizes)
            if pos != len(raw):
                raise ValueError(f"{len(raw) - pos} bytes left over")
        except (zstandard.ZstdError, struct.error, ValueError, CodecError) as exc:
            raise CodecError(f"cachegen tables are corrupt ({exc})") from None
        self._parsed = (blob, tensors)
        return tensors

    def tables_for(self, context, info: ChunkInfo) -> TensorTables:
        if len(context) != 1:
            raise CodecError("cachegen needs exactly one context blob (its tables)")
        entry = self._parse(context[0]).get((info.layer, info.tensor))
        b, h, t, d = info.shape
        if entry is None or (entry.heads, entry.head_dim) != (h, d):
            raise CodecError(f"cachegen tables do not cover layer {info.layer} {info.tensor} of shape {info.shape}")
        return entry

    # -- chunks ------------------------------------------------------------------------------
    def _sink_count(self, info: ChunkInfo) -> int:
        return max(0, min(self.sinks - info.token_start, info.shape[2]))

    def encode(self, chunk, info, context):
        if chunk.is_cuda and _triton_available():  # quantization and lane coding on the GPU, same bytes
            from kvcodec.kernels import cachegen_encode

            return cachegen_encode.encode_chunk(self, chunk, info, context)
        tt = self.tables_for(context, info)
        x = chunk.detach().to("cpu")
        s = self._sink_count(info)
        direct, anchors, deltas = self._symbols(x[:, :, s:].to(torch.float32), tt.steps, tt.anchored, tt.group_size)
        lanes = []
        for bi in range(direct.shape[0]):
            a = 0
            for c in range(direct.shape[1]):
                if tt.anchored[c]:
                    lanes.append((anchors[bi, a], tt.tables[c]))
                    a += 1
                else:
                    lanes.append((direct[bi, c], tt.tables[c]))
        for bi in range(direct.shape[0]):
            lanes.extend((deltas[bi, a], tt.tables[k]) for a, k in enumerate(tt.delta_of))
        for values, index in ((direct[:, ~tt.anchored], np.flatnonzero(~tt.anchored)), (anchors, np.flatnonzero(tt.anchored)),
                              (deltas, tt.delta_of)):
            k = values - tt.los[index][None, :, None]
            if k.size and (k.min() < 0 or (k >= tt.sizes[index][None, :, None]).any()):
                raise CodecError(f"cachegen: layer {info.layer} {info.tensor} holds values outside its tables "
                                 "(tables are fitted on the cache being packed)")
        words = [ans.encode_lane(symbols - lo, table) for symbols, (lo, table) in lanes]
        sink = x[:, :, :s].contiguous().view(torch.uint8).numpy().tobytes()
        return b"".join([sink, np.array([w.size for w in words], dtype="<u4").tobytes()]
                        + [w.astype("<u4").tobytes() for w in words])

    def decode(self, payload, info, context):
        tt = self.tables_for(context, info)
        b, h, t, d = info.shape
        s = self._sink_count(info)
        n = t - s
        c_all, n_anchored = h * d, int(tt.anchored.sum())
        is_anchor, group = _group_layout(n, tt.group_size)
        n_anchor = int(is_anchor.sum())
        sink_bytes = b * h * s * d * info.dtype.itemsize
        n_lanes = b * (c_all + n_anchored)
        head = sink_bytes + 4 * n_lanes
        if len(payload) < head:
            raise CodecError(f"cachegen payload of layer {info.layer} {info.tensor} is truncated")
        counts = np.frombuffer(payload, dtype="<u4", count=n_lanes, offset=sink_bytes).astype(np.int64)
        if head + 4 * int(counts.sum()) != len(payload):
            raise CodecError(f"cachegen payload of layer {info.layer} {info.tensor} has the wrong length")
        words = np.frombuffer(payload, dtype="<u4", offset=head)
        ends = np.cumsum(counts)

        def lane(i: int, table_index: int, count: int) -> np.ndarray:
            lo, table = tt.tables[table_index]
            return ans.decode_lane(words[ends[i] - counts[i]:ends[i]], table, count) + lo

        u = np.empty((b, c_all, n), dtype=np.float32)
        anchored = np.flatnonzero(tt.anchored)
        for bi in range(b):
            for c in range(c_all):
                if not tt.anchored[c]:
                    u[bi, c] = lane(bi * c_all + c, c, n)
            if n_anchored:
                a = np.stack([lane(bi * c_all + c, c, n_anchor) for c in anchored]).astype(np.float32)
                a *= np.float32(1.0 / (1 << tt.anchor_bits))
                first = b * c_all + bi * n_anchored
                dl = np.stack([lane(first + j, tt.delta_of[j], n - n_anchor) for j in range(n_anchored)])
                body = a[:, group]
                body[:, ~is_anchor] += dl
                u[bi, anchored] = body
        u *= tt.steps[None, :, None]
        out = torch.empty(info.shape, dtype=info.dtype)
        out[:, :, s:] = torch.from_numpy(u).reshape(b, h, d, n).permute(0, 1, 3, 2)
        if s:
            sink = np.frombuffer(payload, dtype=np.uint8, count=sink_bytes).copy()
            out[:, :, :s] = torch.from_numpy(sink).view(info.dtype).reshape(b, h, s, d)
        return out
