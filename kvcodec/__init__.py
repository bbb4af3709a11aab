"""kvcodec: compression codecs for LLM key-value caches and the `.kvc` container."""

from . import codecs as _builtin_codecs  # noqa: F401  (registers the built-in codecs)
from .api import decode, encode, open, pack, unpack
from .cache import KVCache, LayerKV
from .codec import ChunkInfo, Codec
from .errors import ChecksumError, CodecError, FormatError, InputError, KVCError
from .reader import KVCReader
from .registry import available_codecs, codec_class, get_codec, register_codec

__version__ = "0.1.0"

__all__ = [
    "pack", "unpack", "open", "encode", "decode", "KVCache", "LayerKV", "Codec", "ChunkInfo",
    "KVCReader", "register_codec", "get_codec", "codec_class", "available_codecs",
    "KVCError", "InputError", "FormatError", "ChecksumError", "CodecError",
]
