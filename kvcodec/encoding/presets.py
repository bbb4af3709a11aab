"""Per-chunk presets: pack a cache to a size or an error target (CacheGen's adaptation).

Every chunk is encoded with each of the codec's presets (finest first) and decoded again to
measure its error; then each chunk gets one preset. `max_error` keeps every layer's key and
value tensor within the bound at as few bytes as it can (a lossless fallback for chunks where
no preset gets there); `target_ratio` starts every chunk at the coarsest preset and refines
the chunks that buy the most error per byte while the file stays within its byte budget. The
file records the presets that were used as codec slots, each with the context (tables) of
only the tensors that use it.
"""

from __future__ import annotations

import heapq
import io
import math
from dataclasses import dataclass, field

import torch

from kvcodec.cache import KVCache
from kvcodec.codecs import device
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec
from kvcodec.container import format as fmt
from kvcodec.container.chunking import DEFAULT_CHUNK_TOKENS, cut, layer_groups
from kvcodec.container.writer import header_for
from kvcodec.encoding.engine import ENCODE_BATCH, Encoding, write_cache
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
    presets = cls.presets(options)
    if not presets:
        with_presets = ", ".join(sorted(c.name for c in available_codecs() if c.presets()))
        raise InputError(f"codec {cls.name!r} has no presets to choose from (codecs with presets: {with_presets})")
    clash = sorted(set(options) & {k for p in presets for k in p})
    if clash:
        raise InputError(f"option {clash[0]!r} is chosen per chunk by the target; leave it out")
    return [get_codec(cls.name, **{**options, **preset}) for preset in presets]


def _measure(chunks: Chunks, codecs: list[Codec], progress=None):
    """Every chunk encoded with every candidate and decoded again: (the candidates as one
    encoding, per chunk its options, per chunk its squared norm). A few layers' chunks go
    through each candidate together (`Codec.encode_many` / `decode_many`), as `write_cache`
    encodes them: an entropy coder then steps thousands of lanes at once instead of one chunk's."""
    fitting = chunks.num_layers // 2  # progress: the fits take about as long as the rest
    blobs = []
    for codec in codecs:
        blobs.append(codec.fit(chunks))
        if progress:
            progress(fitting * len(blobs) // len(codecs))
    encoding = Encoding.of(codecs, blobs)
    options: dict[tuple, list[Option]] = {}
    norms: dict[tuple, float] = {}
    sizes = [sum(info.numel for info, _ in layer) for layer in chunks.layers]
    for group in layer_groups(sizes, ENCODE_BATCH):
        items = [item for i in group for item in chunks.layers[i]]
        infos, tensors = [info for info, _ in items], [chunk for _, chunk in items]
        originals = [chunk.detach().to("cpu", torch.float64) for chunk in tensors]
        for info, x in zip(infos, originals):
            key = (info.layer, info.tensor, info.token_start)
            norms[key] = float(x.pow(2).sum())
            options[key] = []
        for slot, (codec, ctx) in enumerate(zip(codecs, encoding.contexts)):
            payloads = device.encode_chunks(codec, tensors, infos, ctx)
            decoded = codec.decode_many([memoryview(p) for p in payloads], infos, ctx)
            for info, x, payload, y in zip(infos, originals, payloads, decoded):
                sq_error = float((x - y.to(torch.float64)).pow(2).sum())
                options[(info.layer, info.tensor, info.token_start)].append(Option(slot, payload, sq_error))
        if progress:
            progress(fitting + (group[-1] + 1) * (chunks.num_layers - fitting) // chunks.num_layers)
    return encoding, options, norms


def _finish(encoding: Encoding, chosen: dict) -> PlannedEncoding:
    """Keep only the slots that some chunk uses, renumbered in candidate order, each with the
    context its codec needs for the tensors that use it (`Codec.narrow_context`)."""
    used = sorted({slot for slot, _ in chosen.values()})
    renumber = {old: new for new, old in enumerate(used)}
    tensors = {s: {(layer, tensor) for (layer, tensor, _), (slot, _) in chosen.items() if slot == s} for s in used}
    blobs = [encoding.codecs[s].narrow_context(encoding.blobs[s], tensors[s]) for s in used]
    return PlannedEncoding([encoding.codecs[s] for s in used], blobs, [encoding.contexts[s] for s in used],
                           {k: (renumber[s], p) for k, (s, p) in chosen.items()})


def _by_tensor(keys) -> dict[tuple[int, str], list[tuple]]:
    """Chunk keys (layer, tensor, token_start) grouped by their (layer, tensor)."""
    out: dict[tuple[int, str], list[tuple]] = {}
    for key in keys:
        out.setdefault(key[:2], []).append(key)
    return out


def _with_fallback(encoding: Encoding, chunks: Chunks, lossless: set) -> tuple[Encoding, dict]:
    """`encoding` with the lossless fallback as one more slot, and the payloads in that slot of
    the chunks keyed in `lossless` (none are encoded when it is empty)."""
    if not lossless:
        return encoding, {}
    fallback = get_codec(LOSSLESS_FALLBACK)
    slot = len(encoding.codecs)
    encoding = Encoding(encoding.codecs + [fallback], encoding.blobs + [[]],
                        encoding.contexts + [fallback.load_context([])])
    return encoding, {(info.layer, info.tensor, info.token_start): (slot, encoding.encode(slot, info, chunk))
                      for info, chunk in chunks if (info.layer, info.tensor, info.token_start) in lossless}


def _smallest_within(keys: list[tuple], measured: dict, allowed: float) -> tuple[dict, list]:
    """For the chunks `keys` of one tensor: a preset slot per chunk whose payloads are as small
    as the greedy choice makes them with the summed squared error at most `allowed`, and the
    chunks (largest error first) that must be stored losslessly to get there. Every chunk
    starts at its smallest payload and the chunk that saves most error per added byte moves to
    its next larger one; a single preset for every chunk is taken instead when it is smaller
    (the default file, one preset per tensor, is never beaten by the mixing)."""
    order = {key: sorted(measured[key], key=lambda o: (len(o.payload), o.slot)) for key in keys}
    level = dict.fromkeys(keys, 0)
    error = sum(order[k][0].sq_error for k in keys)

    def step(key):
        opts, j = order[key], level[key]
        better = [o for o in opts[j + 1:] if o.sq_error < opts[j].sq_error]
        if not better:
            return None
        nxt = max(better, key=lambda o: (opts[j].sq_error - o.sq_error) / max(len(o.payload) - len(opts[j].payload), 1))
        gain = (opts[j].sq_error - nxt.sq_error) / max(len(nxt.payload) - len(opts[j].payload), 1)
        return (-gain, key, opts.index(nxt))

    heap = [s for s in map(step, keys) if s is not None]
    heapq.heapify(heap)
    while error > allowed and heap:
        _, key, j = heapq.heappop(heap)
        error += order[key][j].sq_error - order[key][level[key]].sq_error
        level[key] = j
        nxt = step(key)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    choice = {k: order[k][level[k]] for k in keys}
    lossless = []
    for key in sorted(keys, key=lambda k: -choice[k].sq_error):
        if error <= allowed:
            break
        error -= choice.pop(key).sq_error
        lossless.append(key)
    size = sum(len(o.payload) for o in choice.values()) if not lossless else math.inf
    for slot in range(len(measured[keys[0]])):
        uniform = {k: measured[k][slot] for k in keys}
        if (sum(o.sq_error for o in uniform.values()) <= allowed
                and sum(len(o.payload) for o in uniform.values()) < size):
            choice, lossless, size = uniform, [], sum(len(o.payload) for o in uniform.values())
    return choice, lossless


def for_max_error(cache: KVCache, codec: str, max_error: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                  options: dict | None = None, progress=None) -> PlannedEncoding:
    """Every layer's key and value within relative RMS error `max_error` (the error `kvc verify`
    reports: over the whole tensor), each chunk at one preset, as few bytes as the greedy
    choice makes it; chunks no preset brings within the bound are stored losslessly. The
    codec's default configuration is a candidate too, and its file alone is taken when it meets
    the bound in fewer bytes: a target never does worse than the default that meets it."""
    if not isinstance(max_error, (int, float)) or not 0 <= max_error < math.inf:
        raise InputError(f"max_error must be a non-negative number, not {max_error!r}")
    codecs = candidates(codec, dict(options or {})) + [get_codec(codec, **dict(options or {}))]
    chunks = cut(cache, chunk_tokens)
    encoding, measured, norms = _measure(chunks, codecs, progress)
    chosen, lossless, default_fits = {}, set(), True
    for keys in _by_tensor(measured).values():
        allowed = max_error ** 2 * sum(norms[k] for k in keys) * (1 + 1e-9)  # sums of chunks round differently
        choice, exact = _smallest_within(keys, measured, allowed)
        chosen.update({k: (o.slot, o.payload) for k, o in choice.items()})
        lossless.update(exact)
        default_fits &= sum(measured[k][-1].sq_error for k in keys) <= allowed
    encoding, stored = _with_fallback(encoding, chunks, lossless)
    plans = [_finish(encoding, {**chosen, **stored})]
    if default_fits:
        plans.append(_finish(encoding, {k: (opts[-1].slot, opts[-1].payload) for k, opts in measured.items()}))
    return min(plans, key=lambda plan: write_cache(cache, io.BytesIO(), plan, chunk_tokens))


def _overhead_bound(cache: KVCache, codecs: list[Codec], n_records: int, chunk_tokens: int, n_blobs: int) -> int:
    """Bytes of a file besides its payloads and codec blobs, at most (every candidate in the
    header, worst-case alignment of every item)."""
    header = len(header_for(cache, codecs, chunk_tokens).to_bytes())
    container = [] if cache.token_ids is None else [cache.token_ids.numel() * 8]
    container += [lay.positions.numel() * 8 for lay in cache.layers if lay.positions is not None]
    blobs = n_blobs + len(container)
    index = 32 + n_records * fmt.RECORD_DTYPE.itemsize + blobs * fmt.BLOB_DTYPE.itemsize
    return 32 + header + sum(container) + index + 32 + (1 + blobs + n_records) * (fmt.ALIGN - 1)


def _file_bytes(planned: PlannedEncoding) -> int:
    """A planned file's payload and codec-blob bytes."""
    return sum(len(p) for _, p in planned.chosen.values()) + sum(len(b) for blobs in planned.blobs for b in blobs)


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
    overhead = _overhead_bound(cache, codecs, len(measured), chunk_tokens, n_blobs)
    # a slot's context is paid once (what it holds for no tensor) and per tensor that uses it
    # (`narrow_context`: its share of the rest), checked against the narrowed blobs once chosen
    tensors = _by_tensor(measured)
    fixed = [sum(map(len, c.narrow_context(b, set()))) for c, b in zip(encoding.codecs, encoding.blobs)]
    share = [max(sum(map(len, b)) - f, 0) / len(tensors) for b, f in zip(encoding.blobs, fixed)]
    budget = limit - overhead
    for attempt in range(12):  # the shares are estimates: shrink the budget by each overshoot, doubled
        planned = _refine(encoding, measured, tensors, fixed, share, budget)
        if planned is None:
            break
        over = _file_bytes(planned) - (limit - overhead)
        if over <= 0:
            return planned
        budget -= over * (1 << attempt)
    coarsest = len(codecs) - 1
    smallest = overhead + sum(len(measured[k][coarsest].payload) for k in measured) + sum(map(len, encoding.blobs[coarsest]))
    raise InputError(f"cannot reach ratio {target_ratio:g} with {codecs[0].name}: its coarsest preset gives "
                     f"about {cache.nbytes / smallest:.2f}")


def _refine(encoding: Encoding, measured: dict, tensors: dict, fixed: list[int], share: list[float], budget: float):
    """Every chunk from the coarsest preset, refined where that buys the most error per byte while
    the payloads and the slots' contexts (`fixed` once per slot used, `share` per tensor using
    it) stay within `budget`; None if even the coarsest preset exceeds it."""
    coarsest = len(encoding.codecs) - 1
    level = {key: coarsest for key in measured}
    users = {(coarsest, t): len(keys) for t, keys in tensors.items()}  # chunks of a tensor in a slot
    users.update({coarsest: len(measured)})  # chunks in a slot
    size = sum(len(measured[k][coarsest].payload) for k in measured) + fixed[coarsest] + share[coarsest] * len(tensors)
    if size > budget:
        return None

    def context(j, t, change):  # context bytes added when a chunk of tensor t joins (+1) or leaves (-1) slot j
        after = {k: users.get(k, 0) + change for k in ((j, t), j)}
        return sum(cost for k, cost in (((j, t), share[j]), (j, fixed[j])) if (after[k] == 0) != (users.get(k, 0) == 0))

    def extra(key, j):  # bytes added by moving `key` from preset j to j - 1
        opts, t = measured[key], key[:2]
        return len(opts[j - 1].payload) - len(opts[j].payload) + context(j - 1, t, 1) - context(j, t, -1)

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
        j, t = level[key], key[:2]
        more = extra(key, j)
        if size + more > budget:
            continue
        size += more
        for k, change in (((j, t), -1), (j, -1), ((j - 1, t), 1), (j - 1, 1)):
            users[k] = users.get(k, 0) + change
        level[key] = j - 1
        nxt = step(key)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return _finish(encoding, {k: (measured[k][j].slot, measured[k][j].payload) for k, j in level.items()})
