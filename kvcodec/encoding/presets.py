"""Per-chunk presets: pack a cache to a size or an error target (CacheGen's adaptation).

Every chunk is encoded with each of the codec's presets (finest first) and decoded again to
measure its error; then each chunk gets one preset. `max_error` takes, per chunk, the
smallest payload whose relative RMS error is within the bound (a lossless fallback where no
preset is); `target_ratio` starts every chunk at the coarsest preset and refines the chunks
that buy the most error per byte while the file stays within its byte budget. The file
records the presets that were used as codec slots.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from kvcodec.cache import KVCache
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec
from kvcodec.container import format as fmt
from kvcodec.container.chunking import DEFAULT_CHUNK_TOKENS, cut
from kvcodec.container.writer import header_for
from kvcodec.encoding.engine import Encoding
from kvcodec.errors import InputError
from kvcodec.registry import available_codecs, codec_class, get_codec

LOSSLESS_FALLBACK = "shuffle-zstd"


@dataclass
class Option:
    """One way to code one chunk: by candidate `slot`, its payload and squared error."""

    slot: int
    payload: bytes
    sq_error: float


@dataclass
class PlannedEncoding(Encoding):
    """An encoding whose per-chunk payloads were chosen in advance."""

    chosen: dict = field(default_factory=dict)  # (layer, tensor, token_start) -> (slot, payload)

    def payload(self, info: ChunkInfo, chunk: torch.Tensor) -> tuple[int, bytes]:
        return self.chosen[(info.layer, info.tensor, info.token_start)]


def candidates(codec: str, options: dict) -> list[Codec]:
    """The codec at each of its presets, finest first, with the user's other options."""
    cls = codec_class(codec)
    presets = cls.presets()
    if not presets:
        with_presets = ", ".join(sorted(c.name for c in available_codecs() if c.presets()))
        raise InputError(f"codec {cls.name!r} has no presets to choose from (codecs with presets: {with_presets})")
    clash = sorted(set(options) & {k for p in presets for k in p})
    if clash:
        raise InputError(f"option {clash[0]!r} is chosen per chunk by the target; leave it out")
    return [get_codec(cls.name, **{**options, **preset}) for preset in presets]


def _measure(chunks: Chunks, codecs: list[Codec], progress=None):
    """Every chunk encoded with every candidate and decoded again: (the candidates as one
    encoding, per chunk its options, per chunk its squared norm)."""
    encoding = Encoding.of(codecs, [c.fit(chunks) for c in codecs])
    options: dict[tuple, list[Option]] = {}
    norms: dict[tuple, float] = {}
    for i, layer in enumerate(chunks.layers):
        for info, chunk in layer:
            key = (info.layer, info.tensor, info.token_start)
            x = chunk.detach().to("cpu", torch.float64)
            norms[key] = float(x.pow(2).sum())
            opts = []
            for slot, (codec, ctx) in enumerate(zip(codecs, encoding.contexts)):
                payload = encoding.encode(slot, info, chunk)
                y = codec.decode(memoryview(payload), info, ctx).to(torch.float64)
                opts.append(Option(slot, payload, float((x - y).pow(2).sum())))
            options[key] = opts
        if progress:
            progress(i + 1)
    return encoding, options, norms


def _finish(encoding: Encoding, chosen: dict) -> PlannedEncoding:
    """Keep only the slots that some chunk uses, renumbered in candidate order."""
    used = sorted({slot for slot, _ in chosen.values()})
    renumber = {old: new for new, old in enumerate(used)}
    return PlannedEncoding([encoding.codecs[s] for s in used], [encoding.blobs[s] for s in used],
                           [encoding.contexts[s] for s in used], {k: (renumber[s], p) for k, (s, p) in chosen.items()})


def for_max_error(cache: KVCache, codec: str, max_error: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                  options: dict | None = None, progress=None) -> PlannedEncoding:
    """Every chunk within relative RMS error `max_error`, each at its smallest such preset."""
    if not isinstance(max_error, (int, float)) or not 0 <= max_error < math.inf:
        raise InputError(f"max_error must be a non-negative number, not {max_error!r}")
    codecs = candidates(codec, dict(options or {}))
    chunks = cut(cache, chunk_tokens)
    encoding, measured, norms = _measure(chunks, codecs, progress)
    chosen = {}
    for key, opts in measured.items():
        fitting = [o for o in opts if o.sq_error <= (max_error ** 2) * norms[key]]
        if fitting:
            best = min(fitting, key=lambda o: (len(o.payload), o.slot))
            chosen[key] = (best.slot, best.payload)
        else:
            chosen[key] = None
    if any(v is None for v in chosen.values()):
        fallback = get_codec(LOSSLESS_FALLBACK)
        encoding = Encoding(encoding.codecs + [fallback], encoding.blobs + [[]],
                            encoding.contexts + [fallback.load_context([])])
        for info, chunk in chunks:
            key = (info.layer, info.tensor, info.token_start)
            if chosen[key] is None:
                chosen[key] = (len(codecs), encoding.encode(len(codecs), info, chunk))
    return _finish(encoding, chosen)


def _overhead_bound(cache: KVCache, codecs: list[Codec], n_records: int, chunk_tokens: int, n_blobs: int) -> int:
    """Bytes of a file besides its payloads and codec blobs, at most (every candidate in the
    header, worst-case alignment of every item)."""
    header = len(header_for(cache, codecs, chunk_tokens).to_bytes())
    container = [] if cache.token_ids is None else [cache.token_ids.numel() * 8]
    container += [lay.positions.numel() * 8 for lay in cache.layers if lay.positions is not None]
    blobs = n_blobs + len(container)
    index = 32 + n_records * fmt.RECORD_DTYPE.itemsize + blobs * fmt.BLOB_DTYPE.itemsize
    return 32 + header + sum(container) + index + 32 + (1 + blobs + n_records) * (fmt.ALIGN - 1)


def for_target_ratio(cache: KVCache, codec: str, target_ratio: float,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS, options: dict | None = None,
                     progress=None) -> PlannedEncoding:
    """The least total squared error whose file is at most `cache.nbytes / target_ratio` bytes."""
    if not isinstance(target_ratio, (int, float)) or not 1 <= target_ratio < math.inf:
        raise InputError(f"target ratio must be a number >= 1, not {target_ratio!r}")
    codecs = candidates(codec, dict(options or {}))
    encoding, measured, _ = _measure(cut(cache, chunk_tokens), codecs, progress)
    n_blobs = sum(len(b) for b in encoding.blobs)
    limit = cache.nbytes / target_ratio
    budget = limit - _overhead_bound(cache, codecs, len(measured), chunk_tokens, n_blobs)
    blob_bytes = [sum(len(b) for b in blobs) for blobs in encoding.blobs]  # paid once a slot is used
    coarsest = len(codecs) - 1
    level = {key: coarsest for key in measured}
    users = [0] * len(codecs)
    users[coarsest] = len(measured)
    size = sum(len(measured[k][coarsest].payload) for k in measured) + blob_bytes[coarsest]
    if size > budget:
        best = cache.nbytes / (size + limit - budget)
        raise InputError(f"cannot reach ratio {target_ratio:g} with {codecs[0].name}: its coarsest preset gives "
                         f"about {best:.2f}")

    def extra(key, j):  # bytes added by moving `key` from preset j to j - 1
        opts = measured[key]
        added = len(opts[j - 1].payload) - len(opts[j].payload)
        return added + (blob_bytes[j - 1] if users[j - 1] == 0 else 0) - (blob_bytes[j] if users[j] == 1 else 0)

    def step(key):  # (-error saved per payload byte, key) for refining `key` once, or None
        opts, j = measured[key], level[key]
        if j == 0 or opts[j].sq_error <= opts[j - 1].sq_error:
            return None
        added = len(opts[j - 1].payload) - len(opts[j].payload)
        return (-(opts[j].sq_error - opts[j - 1].sq_error) / max(added, 1), key)

    heap = [s for s in map(step, measured) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, key = heapq.heappop(heap)
        j = level[key]
        more = extra(key, j)
        if size + more > budget:
            continue
        size += more
        users[j] -= 1
        users[j - 1] += 1
        level[key] = j - 1
        nxt = step(key)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    chosen = {k: (measured[k][j].slot, measured[k][j].payload) for k, j in level.items()}
    return _finish(encoding, chosen)
