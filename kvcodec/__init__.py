"""kvcodec: compression codecs for LLM key-value caches and the `.kvc` container.

The public names below are imported on first use (PEP 562), so that `import kvcodec` is cheap
and loads torch only when something that needs it is touched (`kvc --help` never does).
"""

import importlib

__version__ = "0.1.0"

# The one list of what kvcodec exports: module -> the names taken from it.
_EXPORTS = {
    "kvcodec.api": ("pack", "unpack", "open", "encode", "decode"),
    "kvcodec.cache": ("KVCache", "LayerKV"),
    "kvcodec.codecs.base": ("Codec", "ChunkInfo"),
    "kvcodec.container.reader": ("KVCReader",),
    "kvcodec.registry": ("register_codec", "get_codec", "codec_class", "available_codecs", "register_selector",
                         "selector_class", "available_selectors"),
    "kvcodec.selection.scores": ("AttentionScores",),
    "kvcodec.storage.store": ("PrefixStore", "MemoryBackend", "RedisBackend", "content_key", "encode_chunk"),
    "kvcodec.errors": ("KVCError", "InputError", "FormatError", "ChecksumError", "CodecError"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcodec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
