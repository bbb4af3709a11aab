"""Lazy `.kvc` reader: validates the header and index up front, then decodes only the
records asked for. Works on any `ByteSource` (paths, file objects, bytes, uint8 tensors, URLs),
fetching only the byte ranges it needs.

Beside reading tensors it offers the seam device decoders are driven through
(`kvcodec.container.device_read`): `plan` (which records, where each decodes to), `codec` and
`context` per slot, `check_expansion`, `decode_record` and `source`."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kvcodec.cache import TENSORS, KVCache, LayerKV, sequence_end, to_dynamic_cache
from kvcodec.codecs import device as device_seam
from kvcodec.codecs.base import ChunkInfo, Codec
from kvcodec.container import device_read, positions
from kvcodec.container import format as fmt
from kvcodec.container.chunking import layer_groups
from kvcodec.container.read_plan import ReadPlan
from kvcodec.container.source import ByteSource
from kvcodec.dtypes import ITEMSIZE_OF_CODE, itemsize, torch_dtype
from kvcodec.errors import ChecksumError, CodecError, FormatError, KVCError
from kvcodec.registry import codec_class

STREAM_FETCH_BYTES = 4 << 20  # least bytes a streamed restore fetches per request
DECODE_BATCH = 1 << 23  # most elements the CPU path hands a codec's `decode_many` at once


@dataclass(frozen=True)
class RecordInfo:
    layer: int
    tensor: str
    token_start: int
    tokens: int
    offset: int
    length: int
    codec: str


class KVCReader:
    def __init__(self, src):
        self.source = ByteSource(src)
        try:
            self._open()
        except FormatError as exc:
            self.source.close()
            raise type(exc)(self._named(str(exc))) from None
        except BaseException:
            self.source.close()
            raise

    def _named(self, message: str) -> str:
        """An error message led by the file's path or URL, when it has one."""
        return f"{self.source.name}: {message}" if self.source.name else message

    def _open(self):
        src = self.source
        if src.size < fmt.MIN_FILE:
            raise FormatError("file is too short to be a .kvc file")
        preamble = bytes(src.read(0, fmt.PREAMBLE.size))
        header_len = fmt.parse_preamble(preamble)
        self.format_version = "{}.{}".format(*fmt.PREAMBLE.unpack(preamble)[1:3])
        header_bytes = bytes(src.read(fmt.PREAMBLE.size, min(header_len, src.size - fmt.PREAMBLE.size)))
        if len(header_bytes) < header_len:
            raise FormatError("file is truncated inside its header")
        fmt.check_header_crc(preamble, header_bytes)
        self.header = fmt.Header.from_bytes(header_bytes)
        self.header_end = fmt.PREAMBLE.size + header_len
        src.expect_tail(fmt.index_bound(self.header))
        self.data_start = fmt.align(self.header_end)
        trailer = bytes(src.read(src.size - fmt.TRAILER.size, fmt.TRAILER.size))
        index_offset, index_len = fmt.parse_trailer(trailer, src.size, self.data_start)
        index = bytes(src.read(index_offset, index_len))
        fmt.check_index_crc(trailer, index)
        self.records, self.blobs = fmt.parse_index(index)
        self._groups = fmt.validate_index(self.header, self.records, self.blobs, self.data_start, index_offset)
        self.index_offset = index_offset
        self._codecs: dict[int, Codec] = {}
        self._contexts: dict[int, object] = {}  # per slot: what its codec's load_context made of its blobs
        self._positions: dict[int, torch.Tensor] = {}  # per layer with recorded positions, once read
        self._making = threading.Lock()  # threads sharing a reader build each slot's codec and context once

    # -- context management ------------------------------------------------------------------
    def close(self):
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.header.layers)

    @property
    def file_size(self) -> int:
        return self.source.size

    def record_infos(self) -> list[RecordInfo]:
        return [RecordInfo(int(r["layer"]), TENSORS[r["tensor"]], int(r["token_start"]), int(r["tokens"]),
                           int(r["offset"]), int(r["length"]), self.header.codecs[r["codec_slot"]].name)
                for r in self.records]

    def info(self) -> dict:
        """A JSON-ready summary: shapes, codecs, metadata and stored bytes per layer."""
        layers = []
        for i, lay in enumerate(self.header.layers):
            # a sliding-window layer holds all its model keeps: it is measured as it is
            entry = {"index": i, "positions": lay.position_rows is not None, "window": lay.window,
                     "kept": lay.key.tokens / self.header.length if self.header.length and lay.window is None else 1.0}
            for t, name in enumerate(TENSORS):
                spec = getattr(lay, name)
                idx = self._groups.get((i, t), np.array([], dtype=np.int64))
                stored = int(self.records["length"][idx].sum())
                raw = int(np.prod(spec.shape)) * itemsize(spec.dtype)
                entry[name] = {"shape": list(spec.shape), "dtype": spec.dtype, "chunks": len(idx),
                               "bytes": stored, "raw_bytes": raw,
                               "codecs": sorted({self.header.codecs[s].name for s in self.records["codec_slot"][idx]}),
                               "chunks_per_slot": {str(int(s)): int(n) for s, n in
                                                   zip(*np.unique(self.records["codec_slot"][idx], return_counts=True))}}
            layers.append(entry)
        raw = sum(l[n]["raw_bytes"] for l in layers for n in TENSORS)
        lengths = self.blobs["length"].astype(np.int64)
        shared, own = (lengths[self.blobs["owner"] != fmt.CONTAINER_OWNER],
                       lengths[self.blobs["owner"] == fmt.CONTAINER_OWNER])
        # a pruned cache is measured against the full one it came from
        full = sum(l[n]["raw_bytes"] / l["kept"] if l["kept"] else 0 for l in layers for n in TENSORS)
        return {
            "format_version": self.format_version,
            "file_bytes": self.file_size,
            "raw_bytes": raw,
            "ratio": raw / self.file_size,
            "full_raw_bytes": round(full),
            "full_ratio": full / self.file_size,
            "layout": self.header.layout,
            "chunk_tokens": self.header.chunk_tokens,
            "codecs": [{"id": c.id, "name": c.name, "config": c.config} for c in self.header.codecs],
            "selection": None if self.header.selection is None else
            {"id": self.header.selection.id, "name": self.header.selection.name, "config": self.header.selection.config},
            "length": self.header.length,
            "token_ids": list(self.header.token_ids_shape) if self.header.token_ids_shape else None,
            "metadata": dict(self.header.metadata),
            "layers": layers,
            # bytes in no layer: codecs' shared context (tables, weights), the container's own
            # blobs (token ids, positions), and header, index, alignment
            "shared_bytes": int(shared.sum()),
            "container_blob_bytes": int(own.sum()),
            "overhead_bytes": self.file_size - int(self.records["length"].sum()) - int(self.blobs["length"].sum()),
        }

    # -- payload access ----------------------------------------------------------------------
    def _checked(self, offset: int, length: int, crc: int, what):
        """The bytes, checksum verified; `what` (a string, or a function making one only when it
        is needed) names them in the error."""
        data = self.source.read(offset, length)
        if fmt.crc32(data) != crc:
            raise ChecksumError(self._named(f"{what() if callable(what) else what} checksum mismatch: the file is corrupt"))
        return data

    def codec(self, slot: int) -> Codec:
        """The codec of header slot `slot`, built once from the header's entry."""
        if slot in self._codecs:
            return self._codecs[slot]
        with self._making:
            if slot in self._codecs:
                return self._codecs[slot]
            entry = self.header.codecs[slot]
            try:
                cls = codec_class(entry.id)
            except CodecError:
                raise CodecError(f"the file uses codec id {entry.id} ({entry.name!r}), which is not installed") from None
            if cls.name != entry.name:
                raise CodecError(f"codec id {entry.id} is {cls.name!r} here but {entry.name!r} in the file")
            self._codecs[slot] = cls.from_header(entry.config)
        return self._codecs[slot]

    def context_blobs(self, slot: int) -> list[bytes]:
        """The shared context blobs of slot `slot`, in ordinal order, checksums verified."""
        mine = sorted((int(b["ordinal"]), b) for b in self.blobs if b["owner"] == slot)
        return [bytes(self._checked(int(b["offset"]), int(b["length"]), int(b["crc32"]), f"codec {slot} blob {o}"))
                for o, b in mine]

    def context(self, slot: int):
        """What slot `slot`'s codec decodes with: its `load_context` of the slot's blobs, made
        once per reader."""
        if slot in self._contexts:
            return self._contexts[slot]
        codec = self.codec(slot)
        with self._making:
            if slot not in self._contexts:
                self._contexts[slot] = _reported(codec, f"the context of slot {slot}", codec.load_context,
                                                 self.context_blobs(slot))
        return self._contexts[slot]

    def _container_blob(self, ordinal: int):
        for b in self.blobs:
            if b["owner"] == fmt.CONTAINER_OWNER and b["ordinal"] == ordinal:
                return self._checked(int(b["offset"]), int(b["length"]), int(b["crc32"]), f"container blob {ordinal}")
        raise FormatError(f"container blob {ordinal} is missing")

    def record_info(self, i: int) -> ChunkInfo:
        """What record `i`'s codec is told about its chunk."""
        r = self.records[i]
        layer, tensor = int(r["layer"]), TENSORS[r["tensor"]]
        spec = getattr(self.header.layers[layer], tensor)
        start, tokens = int(r["token_start"]), int(r["tokens"])
        at = None
        if self.header.layers[layer].position_rows is not None:
            at = self._held_positions(layer)
            at = at.reshape(-1, at.shape[-1])[:, start:start + tokens].clone()  # the codec's to keep or change
        return ChunkInfo(layer, tensor, start, (int(r["batch"]), int(r["heads"]), tokens, int(r["head_dim"])),
                         torch_dtype(spec.dtype), at)

    def payload(self, i: int):
        """Record `i`'s payload bytes, checksum verified."""
        r = self.records[i]
        return memoryview(self._checked(int(r["offset"]), int(r["length"]), int(r["crc32"]),
                                        lambda: f"record of {self.record_info(i).where}"))

    def decode_record(self, i: int, device=None) -> torch.Tensor:
        """Record `i` decoded by its codec (onto `device` with the codec's `decode_to`)."""
        if device is None:
            return self.decode_records([i])[0]
        info, codec = self.record_info(i), self.codec(int(self.records["codec_slot"][i]))
        self.check_expansion([i])
        out = _reported(codec, info.where, codec.decode_to, self.payload(i), info,
                        self.context(int(self.records["codec_slot"][i])), device)
        return _checked_output(codec, info, out)

    def decode_records(self, indices) -> list[torch.Tensor]:
        """Records decoded on the CPU (`iter_decoded` gathered)."""
        return list(self.iter_decoded(indices))

    def iter_decoded(self, indices) -> Iterator[torch.Tensor]:
        """Records decoded on the CPU, in order. Consecutive records of a codec that overrides
        `Codec.decode_many` are decoded together, at most DECODE_BATCH elements at a time (lane
        coders step them all at once); other codecs' one by one, so at most one batch's chunks
        are held beside the output."""
        indices = [int(i) for i in indices]
        self.check_expansion(indices)
        r = self.records
        size = (r["batch"].astype(np.int64) * r["heads"] * r["tokens"] * r["head_dim"])
        start = 0
        while start < len(indices):
            slot, stop, total = int(r["codec_slot"][indices[start]]), start, 0
            codec = self.codec(slot)
            limit = DECODE_BATCH if type(codec).decode_many is not Codec.decode_many else 0
            while stop < len(indices) and int(r["codec_slot"][indices[stop]]) == slot and (
                    stop == start or total + int(size[indices[stop]]) <= limit):
                total += int(size[indices[stop]])
                stop += 1
            batch = indices[start:stop]
            infos = [self.record_info(i) for i in batch]
            where = infos[0].where if len(infos) == 1 else f"{infos[0].where} .. {infos[-1].where}"
            decoded = _reported(codec, where, codec.decode_many, [self.payload(i) for i in batch], infos,
                                self.context(slot))
            if not isinstance(decoded, list) or len(decoded) != len(batch):
                raise CodecError(f"codec {codec.name!r} decoded {where} to the wrong number of chunks")
            for info, x in zip(infos, decoded):
                yield _checked_output(codec, info, x)
            start = stop

    def check_expansion(self, indices) -> None:
        """FormatError if one of these records claims more decoded bytes than its codec can make
        of its payload: checked before anything is allocated for them."""
        r = self.records[np.asarray(indices, dtype=np.int64)]
        if not len(r):
            return
        decoded = (r["batch"].astype(np.float64) * r["heads"] * r["tokens"] * r["head_dim"]) * ITEMSIZE_OF_CODE[r["dtype"]]
        slots = np.unique(r["codec_slot"]).tolist()
        factor = np.zeros(max(slots) + 1)
        factor[slots] = [self.codec(slot).max_expansion for slot in slots]
        over = np.flatnonzero(decoded > factor[r["codec_slot"]] * r["length"].astype(np.float64) + 4096)
        if over.size:
            bad = r[over[0]]
            raise FormatError(f"a {self.codec(int(bad['codec_slot'])).name} record of layer {int(bad['layer'])} claims "
                              f"{int(decoded[over[0]])} bytes from a {int(bad['length'])}-byte payload: the file is "
                              f"corrupt")

    def _prefetch(self, records) -> tuple[int, int]:
        """Announce the payloads of `records` and the blobs decoding them needs (their codecs'
        contexts, token ids, positions) to a remote source (local ones need nothing); return the
        span the payloads cover."""
        records = np.asarray(records, dtype=np.int64)
        if not records.size:
            return 0, 0
        r = self.records[records]
        if self.source.remote is not None:
            owners = set(np.unique(r["codec_slot"]).tolist()) | {fmt.CONTAINER_OWNER}
            b = self.blobs[np.isin(self.blobs["owner"], list(owners))]
            self.source.prefetch(list(zip(r["offset"].tolist() + b["offset"].tolist(),
                                        r["length"].tolist() + b["length"].tolist())))
        return int(r["offset"].min()), int((r["offset"] + r["length"]).max())

    def _layer_groups(self, limit: int, per_record: np.ndarray) -> list[list[int]]:
        """Consecutive layers in groups whose records' `per_record` sizes reach `limit`."""
        return layer_groups([per_record[self._layer_records(i)].sum() for i in range(self.num_layers)], limit)

    def _layer_records(self, layer: int) -> list[int]:
        return [i for t in (0, 1) for i in self._groups.get((layer, t), [])]

    def plan(self, wanted) -> ReadPlan:
        """The records the reads `wanted` ((layer, tensor index, start, stop) each) need, and
        where each decodes to."""
        return ReadPlan(self.header, self.records, self._groups, wanted)

    def token_range(self, layer: int, tokens) -> tuple[int, int]:
        """(start, stop) of the stored tokens `tokens` (a slice or None) of a layer."""
        n = self.header.layers[layer].key.tokens
        if tokens is None:
            return 0, n
        if not isinstance(tokens, slice) or tokens.step not in (None, 1):
            raise ValueError("tokens must be a slice with step 1")
        first = tokens.start
        if first is not None and not (-n <= first < n or first == n == 0):  # Python would give nothing, silently
            raise IndexError(f"tokens {first}:{tokens.stop} start outside layer {layer}'s {n} stored tokens")
        start, stop, _ = tokens.indices(n)
        return start, max(start, stop)

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range (the file has {self.num_layers})")
        return layer % self.num_layers

    def _read_tensors(self, wanted, device) -> list[torch.Tensor]:
        """Tensors `wanted` ((layer, tensor index, start, stop) each), decoded by the codecs: on
        the CPU in batches (`decode_records`), else record by record onto `device`."""
        plan = self.plan(wanted)
        self.check_expansion(plan.records)  # before allocating the output
        buffers = plan.allocate(device)
        on_cpu = device is None or torch.device(device).type == "cpu"
        chunks = self.iter_decoded(plan.records) if on_cpu else (self.decode_record(int(i), device)
                                                                   for i in plan.records)
        for chunk, k, at in zip(chunks, plan.output_of.tolist(), plan.token_offset.tolist()):
            plan.view(buffers, k)[:, :, at:at + chunk.shape[2]] = chunk
        return [plan.result(buffers, k) for k in range(len(wanted))]

    def read(self, layer: int, tokens: slice | None = None, device=None,
             decoder: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value of one layer, optionally a token range, decoding only the chunks needed.
        In a pruned cache the range counts stored tokens; `positions(layer)` gives their original
        positions.

        `decoder`: "auto" decodes with the GPU kernels when `device` is a CUDA device and Triton
        is installed (unless the environment sets KVCODEC_DECODER=cpu), "cpu" always on the CPU,
        "kernels" always with the kernels (see `kvcodec.kernels`)."""
        layer = self._check_layer(layer)
        start, stop = self.token_range(layer, tokens)
        wanted = [(layer, 0, start, stop), (layer, 1, start, stop)]
        self._prefetch(self.plan(wanted).records)
        if device_seam.use_kernels(device, decoder):
            k, v = device_read.read_tensors(self, wanted, device)
            return k, v
        k, v = self._read_tensors(wanted, device)
        return k, v

    def positions(self, layer: int) -> torch.Tensor | None:
        layer = self._check_layer(layer)
        spec = self.header.layers[layer]
        if spec.position_rows is None:
            return None
        return self._held_positions(layer).clone()  # the caller's to change

    def _held_positions(self, layer: int) -> torch.Tensor:
        """A layer's recorded positions, read once (its codecs are told them chunk by chunk)."""
        if layer not in self._positions:
            self._positions[layer] = self._read_positions(layer, self.header.layers[layer])
        return self._positions[layer]

    def _read_positions(self, layer: int, spec) -> torch.Tensor:
        data = self._container_blob(1 + layer)
        if spec.position_encoding == "int64":
            found = np.frombuffer(data, dtype="<i8").reshape(spec.position_rows, -1).astype(np.int64)
        else:
            found = positions.decode(data, spec.position_rows, spec.key.tokens)
        if found.size and (found.min() < 0 or (self.header.length is not None and found.max() >= self.header.length)):
            raise FormatError(f"layer {layer} positions lie outside the cache's length {self.header.length}")
        return torch.from_numpy(found)

    def token_ids(self) -> torch.Tensor | None:
        shape = self.header.token_ids_shape
        if shape is None:
            return None
        return torch.from_numpy(np.frombuffer(self._container_blob(0), dtype="<i8").astype(np.int64).reshape(shape))

    def read_cache(self, device=None, progress=None, decoder: str = "auto") -> KVCache:
        """The whole cache. With `progress`, calls progress(layers_done) as layers complete.
        `decoder` as in `read`; the kernels decode all layers into one buffer per dtype."""
        self._prefetch(np.arange(len(self.records)))
        if device_seam.use_kernels(device, decoder):
            pairs = self._read_layers(range(self.num_layers), device, progress)
        else:
            pairs = []
            r = self.records
            for group in self._layer_groups(DECODE_BATCH, r["batch"].astype(np.int64) * r["heads"] * r["tokens"]
                                            * r["head_dim"]):
                tensors = self._read_tensors([(i, t, 0, self.header.layers[i].key.tokens) for i in group for t in (0, 1)],
                                             device)
                pairs += list(zip(tensors[0::2], tensors[1::2]))
                if progress:
                    for i in group:
                        progress(i + 1)
        layers = [self._layer(i, k, v) for i, (k, v) in enumerate(pairs)]
        selection = self.header.selection
        return KVCache(layers, self.token_ids(), dict(self.header.metadata), self.header.layout, self.header.length,
                       None if selection is None else {"id": selection.id, "name": selection.name,
                                                       "config": selection.config})

    def _layer(self, i: int, key: torch.Tensor, value: torch.Tensor) -> LayerKV:
        return LayerKV(key, value, self.positions(i), self.header.layers[i].window)

    @property
    def next_position(self) -> int:
        """The position of the next token fed after the cache, by `KVCache.next_position`'s rule."""
        if self.header.length is not None:
            return self.header.length
        return max(sequence_end(lay.key.tokens, self.positions(i)) for i, lay in enumerate(self.header.layers))

    def _read_layers(self, layers, device, progress=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Key and value of every layer in `layers`, decoded by the kernels in one read."""
        layers = list(layers)
        ends = None if progress is None else np.cumsum([len(self._layer_records(i)) for i in layers])
        report = None if progress is None else (lambda n: progress(int(np.searchsorted(ends, n, "right"))))
        wanted = [(i, t, 0, self.header.layers[i].key.tokens) for i in layers for t in (0, 1)]
        tensors = device_read.read_tensors(self, wanted, device, report)
        return list(zip(tensors[0::2], tensors[1::2]))

    def stream(self, device=None, decoder: str = "auto", ahead: int = 2) -> Iterator[tuple[int, LayerKV]]:
        """(index, layer) for every layer in order, each as soon as its bytes have arrived and
        decoded: a background thread fetches the next `ahead` groups of layers (a group: at
        least STREAM_FETCH_BYTES, so requests stay few) while one decodes, so a remote restore
        overlaps transfer and decoding. Fetched bytes are dropped once decoded."""
        if not isinstance(ahead, int) or ahead < 1:
            raise ValueError(f"ahead must be a positive integer, not {ahead!r}")
        groups = self._layer_groups(STREAM_FETCH_BYTES, self.records["length"].astype(np.int64))

        def fetch(group):
            return self._prefetch([r for i in group for r in self._layer_records(i)])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = deque(pool.submit(fetch, g) for g in groups[:ahead])
            for g, group in enumerate(groups):
                span = pending.popleft().result()
                if g + ahead < len(groups):
                    pending.append(pool.submit(fetch, groups[g + ahead]))
                if device_seam.use_kernels(device, decoder):  # a group's layers in one read
                    pairs = self._read_layers(group, device)
                else:
                    pairs = [self.read(i, device=device, decoder=decoder) for i in group]
                for i, (key, value) in zip(group, pairs):
                    yield i, self._layer(i, key, value)
                self.source.forget(*span)

    def to_hf(self, device=None, config=None, decoder: str = "auto"):
        """A transformers `DynamicCache`: a local file decoded at once, a remote one built layer
        by layer as it streams in (transfer and decoding overlap)."""
        if self.source.remote is None:
            return self.read_cache(device, decoder=decoder).to_hf(config)
        return to_dynamic_cache((lay for _, lay in self.stream(device, decoder)), self.next_position, config)

    def check_layout(self) -> None:
        """Every byte of the file accounted for: items dense and aligned, all padding zero.
        Together with the checksums this detects any flipped bit in the file."""
        self.source.prefetch([(self.header_end, self.index_offset - self.header_end)])
        pos = self.header_end
        for offset, length in fmt.extents(self.records, self.blobs) + [(self.index_offset, 0)]:
            gap = offset - pos
            if gap < 0 or gap >= fmt.ALIGN or any(self.source.read(pos, gap)):
                raise FormatError("the file has stray or non-zero bytes between its payloads: it is corrupt")
            pos = offset + length

    def verify(self) -> None:
        """Check every checksum and the file's layout without decoding payloads."""
        self.check_layout()
        for i, r in enumerate(self.records):
            self._checked(int(r["offset"]), int(r["length"]), int(r["crc32"]),
                          lambda i=i: f"record of {self.record_info(i).where}")
        for b in self.blobs:
            self._checked(int(b["offset"]), int(b["length"]), int(b["crc32"]), f"blob {int(b['ordinal'])}")


def _checked_output(codec: Codec, info: ChunkInfo, out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != info.shape or out.dtype != info.dtype:
        raise CodecError(f"codec {codec.name!r} decoded {info.where} to the wrong shape or dtype")
    return out


def _reported(codec: Codec, where: str, call, *args):
    """`call(*args)`, a codec's own exception (a bug, or a plugin's) reported as a CodecError."""
    try:
        return call(*args)
    except KVCError:
        raise
    except Exception as exc:
        raise CodecError(f"codec {codec.name!r} failed on {where}: {type(exc).__name__}: {exc}") from None
