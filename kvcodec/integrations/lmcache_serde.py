"""LMCache serde for its multiprocess storage (`lmcache.v1.distributed`): each KV object an L2
adapter stores (`[2, layers, tokens, hidden]`) is serialized as one `.kvc` entry, with any
kvcodec codec, behind any of LMCache's L2 adapters (fs, S3, Redis, ...). Importing this module
registers it with LMCache's serde registry as "kvcodec"; then, in an L2 adapter's config:

    {"type": "fs", "base_path": "/cache", "serde": {"type": "kvcodec", "codec": "zstd"}}

(`codec` and `options` as for `kvcodec.encode`; lossless zstd by default). An object's bytes are
`KVCS`, its `.kvc` length (u64, little-endian), then the `.kvc` bytes: the buffers LMCache hands
a deserializer may be longer than what was stored. The entry records the object's key, and is
decoded and checked (key, layers, tokens, width, dtype) before it fills LMCache's buffer; one
that fails raises, which LMCache counts as a failed load (as it does a store whose encoding does
not fit the buffer LMCache sized from `estimate_serialized_size`).
"""

from __future__ import annotations

import struct

import torch

from kvcodec.api import decode, encode
from kvcodec.errors import FormatError, InputError
from kvcodec.integrations.config import codec_options
from kvcodec.integrations.entries import entry_problem
from kvcodec.integrations.lmcache import DEFAULT_CODEC, KEY_META, cache_to_chunk, chunk_to_cache
from kvcodec.storage.store import whole_cache_codec

try:
    from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor
    from lmcache.v1.distributed.serde.base import Deserializer, Serializer
    from lmcache.v1.distributed.serde.factory import get_registered_serde_types, register_serde_factory
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvcodec.integrations.lmcache_serde needs LMCache (pip install 'kvcodec[lmcache]')") from exc

SERDE = "kvcodec"
FRAME = struct.Struct("<4sQ")  # magic, length of the .kvc bytes after it
MAGIC = b"KVCS"
OVERHEAD = 1 << 20  # bytes beyond 17/16 of the raw tensor allowed for an entry's headers and index


def object_key(key) -> str:
    """An LMCache `ObjectKey` as the string an entry records."""
    return (f"{key.model_name}@{key.kv_rank}@{getattr(key, 'object_group_id', 0)}@{getattr(key, 'cache_salt', '')}"
            f"@{key.chunk_hash.hex()}")


def _kv_of(tensor: torch.Tensor) -> torch.Tensor:
    if tensor is None or tensor.dim() != 4 or tensor.shape[0] != 2:
        raise InputError(f"kvcodec's LMCache serde stores [2, layers, tokens, hidden] KV objects, not "
                         f"{None if tensor is None else tuple(tensor.shape)}")
    return tensor


class KVCodecSerializer(Serializer):
    def __init__(self, codec):
        self.codec = codec

    def serialize(self, src, dst, key) -> int:
        kv = _kv_of(src.tensor)
        cache = chunk_to_cache(kv.detach().cpu(), 1, kv.shape[3])  # one head of the whole width
        cache.metadata[KEY_META] = object_key(key)
        out = dst.tensor.view(torch.uint8).reshape(-1)
        data = encode(cache, self.codec)
        if FRAME.size + len(data) > out.numel():
            raise InputError(f"a {len(data)}-byte entry does not fit LMCache's {out.numel()}-byte buffer")
        framed = FRAME.pack(MAGIC, len(data)) + data
        out[:len(framed)].copy_(torch.frombuffer(bytearray(framed), dtype=torch.uint8))
        return len(framed)

    def estimate_serialized_size(self, layout_desc) -> int:
        raw = sum(shape.numel() * dtype.itemsize for shape, dtype in zip(layout_desc.shapes, layout_desc.dtypes))
        return FRAME.size + raw + raw // 16 + OVERHEAD


class KVCodecDeserializer(Deserializer):
    def deserialize(self, src, dst, key) -> None:
        out = _kv_of(dst.tensor)
        data = src.tensor.view(torch.uint8).reshape(-1).cpu()
        if data.numel() < FRAME.size:
            raise FormatError("a kvcodec LMCache object is shorter than its frame")
        magic, length = FRAME.unpack(bytes(data[:FRAME.size]))
        if magic != MAGIC or length > data.numel() - FRAME.size:
            raise FormatError("not a kvcodec LMCache object (bad frame)")
        cache = decode(bytes(data[FRAME.size:FRAME.size + length]))
        _, layers, tokens, hidden = out.shape
        problem = entry_problem(cache, KEY_META, object_key(key), layers, (1, 1, tokens, hidden), out.dtype)
        if problem is not None:
            raise FormatError(f"kvcodec LMCache object for {object_key(key)} refused: {problem}")
        cache_to_chunk(cache, out)


def make_serde(kwargs: dict):
    """LMCache's factory call: the serde of `kwargs` ("codec", "options", "max_workers")."""
    unknown = set(kwargs) - {"codec", "options", "max_workers"}
    if unknown:
        raise InputError(f"kvcodec's LMCache serde has no setting {', '.join(sorted(unknown))}")
    codec = whole_cache_codec(kwargs.get("codec", DEFAULT_CODEC), codec_options(kwargs.get("options")))
    return AsyncSerdeProcessor(KVCodecSerializer(codec), KVCodecDeserializer(),
                               max_workers=int(kwargs.get("max_workers", 1)))


if SERDE not in get_registered_serde_types():
    register_serde_factory(SERDE, make_serde)
