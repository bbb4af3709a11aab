"""Lazy `.kvc` reader: validates the header and index up front, then decodes only the
records asked for. Works on paths, seekable binary files, in-memory bytes, uint8 tensors (a
pinned one lets GPU reads copy payloads to the device without a host copy) and URLs (http(s)
with Range requests, or any fsspec filesystem), fetching only the byte ranges it needs."""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kvcodec.container import format as fmt
from kvcodec.container import positions, remote as ranged
from kvcodec.cache import KVCache, LayerKV, to_dynamic_cache
from kvcodec.codecs.base import ChunkInfo, Codec
from kvcodec.dtypes import itemsize, torch_dtype
from kvcodec.errors import ChecksumError, CodecError, FormatError, KVCError
from kvcodec.registry import codec_class

STREAM_FETCH_BYTES = 4 << 20  # least bytes a streamed restore fetches per request


class _Source:
    """Random access to bytes that never reads past the end or allocates beyond the request."""

    def __init__(self, src):
        self._own = False
        self.tensor = None  # a CPU uint8 tensor holding the file, when given one (may be pinned)
        self.remote = None  # a ranged.RangedFile for URLs
        if ranged.is_url(src):
            self.remote, self._own = ranged.RangedFile(ranged.backend_for(src)), True
            self._buf = self._file = None
            self.size = self.remote.size
            return
        if isinstance(src, torch.Tensor):
            if src.dtype != torch.uint8 or src.dim() != 1 or src.device.type != "cpu" or not src.is_contiguous():
                raise FormatError("a tensor source must be a contiguous 1-D uint8 CPU tensor")
            self.tensor, src = src, memoryview(src.numpy())
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._buf, self._file = memoryview(src).cast("B"), None
            self.size = len(self._buf)
            return
        if isinstance(src, (str, os.PathLike)):
            if os.path.isdir(src):
                raise FormatError(f"{os.fspath(src)} is a directory")
            src, self._own = open(src, "rb"), True
        if not (hasattr(src, "seekable") and src.seekable()):
            self._buf, self._file = memoryview(src.read()).cast("B"), None
            self.size = len(self._buf)
            return
        self._buf, self._file = None, src
        self.size = src.seek(0, io.SEEK_END)

    def read(self, offset: int, length: int) -> bytes | memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError("a read reaches past the end of the file: it is truncated or corrupt")
        if self._buf is not None:
            return self._buf[offset:offset + length]
        if self.remote is not None:
            return self.remote.read(offset, length)
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != length:
            raise FormatError("the file ended early (changed while reading?)")
        return data

    def prefetch(self, extents) -> None:
        """Announce the (offset, length) extents about to be read: a remote file fetches them in
        as few requests as they allow; local sources need nothing."""
        if self.remote is not None:
            self.remote.prefetch(extents)

    def forget(self, start: int, stop: int) -> None:
        if self.remote is not None:
            self.remote.forget(start, stop)

    def expect_tail(self, length: int) -> None:
        if self.remote is not None:
            self.remote.tail_window = max(self.remote.tail_window, length)

    def close(self):
        if self._own:
            (self.remote or self._file).close()


def _use_kernels(device, decoder: str) -> bool:
    from kvcodec.kernels import use_kernels

    return use_kernels(device, decoder)


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
        self._src = _Source(src)
        try:
            self._open()
        except BaseException:
            self._src.close()
            raise

    def _open(self):
        src = self._src
        if src.size < fmt.PREAMBLE.size + fmt.TRAILER.size:
            raise FormatError("file is too short to be a .kvc file")
        preamble = bytes(src.read(0, fmt.PREAMBLE.size))
        header_len = fmt.parse_preamble(preamble)
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
        self._contexts: dict[int, list[bytes]] = {}

    # -- context management ------------------------------------------------------------------
    def close(self):
        self._src.close()

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
        return self._src.size

    def record_infos(self) -> list[RecordInfo]:
        return [RecordInfo(int(r["layer"]), fmt.TENSORS[r["tensor"]], int(r["token_start"]), int(r["tokens"]),
                           int(r["offset"]), int(r["length"]), self.header.codecs[r["codec_slot"]].name)
                for r in self.records]

    def info(self) -> dict:
        """A JSON-ready summary: shapes, codecs, metadata and stored bytes per layer."""
        layers = []
        for i, lay in enumerate(self.header.layers):
            entry = {"index": i, "positions": lay.position_rows is not None,
                     "kept": lay.key.tokens / self.header.length if self.header.length else 1.0}
            for t, name in enumerate(fmt.TENSORS):
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
        raw = sum(l[n]["raw_bytes"] for l in layers for n in fmt.TENSORS)
        # a pruned cache is measured against the full one it came from
        full = sum(l[n]["raw_bytes"] / l["kept"] if l["kept"] else 0 for l in layers for n in fmt.TENSORS)
        return {
            "format_version": f"{fmt.MAJOR}.{fmt.MINOR}",
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
        }

    # -- payload access ----------------------------------------------------------------------
    def _checked(self, offset: int, length: int, crc: int, what: str):
        data = self._src.read(offset, length)
        if fmt.crc32(data) != crc:
            raise ChecksumError(f"{what} checksum mismatch: the file is corrupt")
        return data

    def _codec(self, slot: int) -> Codec:
        if slot not in self._codecs:
            entry = self.header.codecs[slot]
            try:
                cls = codec_class(entry.id)
            except CodecError:
                raise CodecError(f"the file uses codec id {entry.id} ({entry.name!r}), which is not installed") from None
            if cls.name != entry.name:
                raise CodecError(f"codec id {entry.id} is {cls.name!r} here but {entry.name!r} in the file")
            self._codecs[slot] = cls.from_header(entry.config)
        return self._codecs[slot]

    def _context(self, slot: int) -> list[bytes]:
        if slot not in self._contexts:
            mine = sorted((int(b["ordinal"]), b) for b in self.blobs if b["owner"] == slot)
            self._contexts[slot] = [bytes(self._checked(int(b["offset"]), int(b["length"]), int(b["crc32"]),
                                                        f"codec {slot} blob {o}")) for o, b in mine]
        return self._contexts[slot]

    def _container_blob(self, ordinal: int):
        for b in self.blobs:
            if b["owner"] == fmt.CONTAINER_OWNER and b["ordinal"] == ordinal:
                return self._checked(int(b["offset"]), int(b["length"]), int(b["crc32"]), f"container blob {ordinal}")
        raise FormatError(f"container blob {ordinal} is missing")

    def decode_record(self, i: int, device=None) -> torch.Tensor:
        r = self.records[i]
        layer, tensor = int(r["layer"]), fmt.TENSORS[r["tensor"]]
        spec = getattr(self.header.layers[layer], tensor)
        info = ChunkInfo(layer, tensor, int(r["token_start"]),
                         (int(r["batch"]), int(r["heads"]), int(r["tokens"]), int(r["head_dim"])),
                         torch_dtype(spec.dtype))
        where = f"layer {layer} {tensor} tokens {info.token_start}+{info.shape[2]}"
        slot = int(r["codec_slot"])
        codec = self._codec(slot)
        self._check_expansion(i)
        payload = memoryview(self._checked(int(r["offset"]), int(r["length"]), int(r["crc32"]), f"record of {where}"))
        try:
            if device is None:
                out = codec.decode(payload, info, self._context(slot))
            else:
                out = codec.decode_to(payload, info, self._context(slot), device)
        except KVCError:
            raise
        except Exception as exc:  # a codec bug or a plugin's own exception: report, don't crash
            raise CodecError(f"codec {codec.name!r} failed on {where}: {type(exc).__name__}: {exc}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != info.shape or out.dtype != info.dtype:
            raise CodecError(f"codec {codec.name!r} decoded {where} to the wrong shape or dtype")
        return out

    def _check_expansion(self, i: int) -> None:
        r = self.records[i]
        decoded = int(r["batch"]) * int(r["heads"]) * int(r["tokens"]) * int(r["head_dim"]) * \
            itemsize(fmt.record_dtype_name(int(r["dtype"])))
        codec = self._codec(int(r["codec_slot"]))
        if decoded > codec.max_expansion * int(r["length"]) + 4096:
            raise FormatError(f"a {codec.name} record of layer {int(r['layer'])} claims {decoded} bytes from a "
                              f"{int(r['length'])}-byte payload: the file is corrupt")

    def _prefetch(self, records) -> tuple[int, int]:
        """Announce the payloads of `records` and the blobs decoding them needs (their codecs'
        contexts, token ids, positions) to the source; return the span the payloads cover."""
        records = np.asarray(records, dtype=np.int64)
        if not records.size:
            return 0, 0
        r = self.records[records]
        owners = set(np.unique(r["codec_slot"]).tolist()) | {fmt.CONTAINER_OWNER}
        b = self.blobs[np.isin(self.blobs["owner"], list(owners))]
        self._src.prefetch(list(zip(r["offset"].tolist() + b["offset"].tolist(),
                                    r["length"].tolist() + b["length"].tolist())))
        return int(r["offset"].min()), int((r["offset"] + r["length"]).max())

    def _layer_records(self, layer: int) -> list[int]:
        return [i for t in (0, 1) for i in self._groups.get((layer, t), [])]

    def _records_for(self, layer: int, t: int, start: int, stop: int) -> list[int]:
        """Indices of the records of (layer, key/value) overlapping tokens [start, stop)."""
        return [i for i in self._groups.get((layer, t), [])
                if int(self.records["token_start"][i]) < stop
                and int(self.records["token_start"][i]) + int(self.records["tokens"][i]) > start]

    def _read_tensor(self, layer: int, t: int, start: int, stop: int, device) -> torch.Tensor:
        spec = getattr(self.header.layers[layer], fmt.TENSORS[t])
        needed = self._records_for(layer, t, start, stop)
        for i in needed:  # before allocating the output: no record may claim more than it can hold
            self._check_expansion(i)
        out = torch.empty((spec.batch, spec.heads, stop - start, spec.head_dim), dtype=torch_dtype(spec.dtype),
                          device=device)
        for i in needed:
            r0 = int(self.records["token_start"][i])
            r1 = r0 + int(self.records["tokens"][i])
            chunk = self.decode_record(i, out.device)
            lo, hi = max(r0, start), min(r1, stop)
            out[:, :, lo - start:hi - start] = chunk[:, :, lo - r0:hi - r0]
        return out

    def _token_range(self, layer: int, tokens) -> tuple[int, int]:
        n = self.header.layers[layer].key.tokens
        if tokens is None:
            return 0, n
        if not isinstance(tokens, slice) or tokens.step not in (None, 1):
            raise ValueError("tokens must be a slice with step 1")
        start, stop, _ = tokens.indices(n)
        return start, max(start, stop)

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range (the file has {self.num_layers})")
        return layer % self.num_layers

    def read(self, layer: int, tokens: slice | None = None, device=None,
             decoder: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value of one layer, optionally a token range, decoding only the chunks needed.
        In a pruned cache the range counts stored tokens; `positions(layer)` gives their original
        positions.

        `decoder`: "auto" decodes with the GPU kernels when `device` is a CUDA device and Triton
        is installed (unless the environment sets KVCODEC_DECODER=cpu), "cpu" always on the CPU,
        "kernels" always with the kernels (see `kvcodec.kernels`)."""
        layer = self._check_layer(layer)
        start, stop = self._token_range(layer, tokens)
        self._prefetch([i for t in (0, 1) for i in self._records_for(layer, t, start, stop)])
        if _use_kernels(device, decoder):
            from kvcodec.container import device_read as restore

            k, v = restore.read_tensors(self, [(layer, 0, start, stop), (layer, 1, start, stop)], device)
            return k, v
        return (self._read_tensor(layer, 0, start, stop, device), self._read_tensor(layer, 1, start, stop, device))

    def positions(self, layer: int) -> torch.Tensor | None:
        layer = self._check_layer(layer)
        spec = self.header.layers[layer]
        if spec.position_rows is None:
            return None
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
        if _use_kernels(device, decoder):
            from kvcodec.container import device_read as restore

            per_layer = [len(self._records_for(i, t, 0, self.header.layers[i].key.tokens))
                         for i in range(self.num_layers) for t in (0, 1)]
            ends = np.cumsum(np.add.reduceat(per_layer, np.arange(0, len(per_layer), 2))) if per_layer else []
            report = None if progress is None else (lambda n: progress(int(np.searchsorted(ends, n, "right"))))
            wanted = [(i, t, 0, self.header.layers[i].key.tokens) for i in range(self.num_layers) for t in (0, 1)]
            tensors = restore.read_tensors(self, wanted, device, report)
            pairs = list(zip(tensors[0::2], tensors[1::2]))
        else:
            pairs = []
            for i in range(self.num_layers):
                pairs.append(self.read(i, device=device, decoder="cpu"))
                if progress:
                    progress(i + 1)
        layers = [LayerKV(k, v, self.positions(i)) for i, (k, v) in enumerate(pairs)]
        selection = self.header.selection
        return KVCache(layers, self.token_ids(), dict(self.header.metadata), self.header.layout, self.header.length,
                       None if selection is None else {"id": selection.id, "name": selection.name,
                                                       "config": selection.config})

    def stream(self, device=None, decoder: str = "auto", ahead: int = 2) -> Iterator[tuple[int, LayerKV]]:
        """(index, layer) for every layer in order, each as soon as its bytes have arrived and
        decoded: a background thread fetches the next `ahead` groups of layers (a group: at
        least STREAM_FETCH_BYTES, so requests stay few) while one decodes, so a remote restore
        overlaps transfer and decoding. Fetched bytes are dropped once decoded."""
        if not isinstance(ahead, int) or ahead < 1:
            raise ValueError(f"ahead must be a positive integer, not {ahead!r}")
        groups: list[list[int]] = []
        size = STREAM_FETCH_BYTES
        for i in range(self.num_layers):
            if size >= STREAM_FETCH_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += int(self.records["length"][self._layer_records(i)].sum())

        def fetch(group):
            return self._prefetch([r for i in group for r in self._layer_records(i)])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = deque(pool.submit(fetch, g) for g in groups[:ahead])
            for g, group in enumerate(groups):
                span = pending.popleft().result()
                if g + ahead < len(groups):
                    pending.append(pool.submit(fetch, groups[g + ahead]))
                for i in group:
                    key, value = self.read(i, device=device, decoder=decoder)
                    yield i, LayerKV(key, value, self.positions(i))
                self._src.forget(*span)

    def to_hf(self, device=None, config=None, decoder: str = "auto"):
        """A transformers `DynamicCache` built layer by layer as the file streams in."""
        return to_dynamic_cache(((lay.key, lay.value) for _, lay in self.stream(device, decoder)), config)

    def check_layout(self) -> None:
        """Every byte of the file accounted for: items dense and aligned, all padding zero.
        Together with the checksums this detects any flipped bit in the file."""
        self._src.prefetch([(self.header_end, self.index_offset - self.header_end)])
        pos = self.header_end
        for offset, length in fmt.extents(self.records, self.blobs) + [(self.index_offset, 0)]:
            gap = offset - pos
            if gap < 0 or gap >= fmt.ALIGN or any(self._src.read(pos, gap)):
                raise FormatError("the file has stray or non-zero bytes between its payloads: it is corrupt")
            pos = offset + length

    def verify(self) -> None:
        """Check every checksum and the file's layout without decoding payloads."""
        self.check_layout()
        for r in self.records:
            self._checked(int(r["offset"]), int(r["length"]), int(r["crc32"]),
                          f"record of layer {int(r['layer'])} {fmt.TENSORS[r['tensor']]} tokens {int(r['token_start'])}")
        for b in self.blobs:
            self._checked(int(b["offset"]), int(b["length"]), int(b["crc32"]), f"blob {int(b['ordinal'])}")
