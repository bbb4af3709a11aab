"""kvcodec: compression codecs for LLM key-value caches and the `.kvc` container."""

from kvcodec import codecs as _builtin_codecs  # noqa: F401  (registers the built-in codecs)
from kvcodec import selection as _builtin_selectors  # noqa: F401  (registers the built-in selection stages)
from kvcodec.api import decode, encode, open, pack, unpack
from kvcodec.cache import KVCache, LayerKV
from kvcodec.codecs.base import ChunkInfo, Codec
from kvcodec.container.reader import KVCReader
from kvcodec.errors import ChecksumError, CodecError, FormatError, InputError, KVCError
from kvcodec.registry import (
    available_codecs,
    available_selectors,
    codec_class,
    get_codec,
    register_codec,
    register_selector,
    selector_class,
)
from kvcodec.selection.scores import AttentionScores
from kvcodec.storage.store import MemoryBackend, PrefixStore, RedisBackend, content_key, encode_chunk

__version__ = "0.1.0"

__all__ = [
    "pack", "unpack", "open", "encode", "decode", "KVCache", "LayerKV", "Codec", "ChunkInfo",
    "KVCReader", "register_codec", "get_codec", "codec_class", "available_codecs", "register_selector",
    "selector_class", "available_selectors", "AttentionScores", "PrefixStore", "MemoryBackend", "RedisBackend",
    "content_key", "encode_chunk",
    "KVCError", "InputError", "FormatError", "ChecksumError", "CodecError",
]
