"""Codec registry: codecs by numeric id and by name, built-ins plus entry-point plugins.

Third-party packages register codecs through the entry-point group `kvcodec.codecs`; each
entry point names a `Codec` subclass.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .codec import Codec
from .errors import CodecError

ENTRY_POINT_GROUP = "kvcodec.codecs"
THIRD_PARTY_MIN_ID = 1024

_by_id: dict[int, type[Codec]] = {}
_by_name: dict[str, type[Codec]] = {}
_plugins_loaded = False
_plugin_errors: list[str] = []


def register_codec(cls: type[Codec], *, builtin: bool = False) -> type[Codec]:
    """Register a codec class (usable as a decorator). Ids and names must be unique."""
    if not (isinstance(getattr(cls, "codec_id", None), int) and isinstance(getattr(cls, "name", None), str)):
        raise CodecError(f"{cls.__name__} must define integer codec_id and string name")
    if not builtin and not THIRD_PARTY_MIN_ID <= cls.codec_id <= 0xFFFFFFFF:
        raise CodecError(f"codec {cls.name!r}: third-party ids start at {THIRD_PARTY_MIN_ID}")
    for table, key in ((_by_id, cls.codec_id), (_by_name, cls.name)):
        if table.get(key, cls) is not cls:
            raise CodecError(f"codec {key!r} is already registered by {table[key].__module__}.{table[key].__name__}")
    _by_id[cls.codec_id] = cls
    _by_name[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_codec(ep.load())
        except Exception as exc:  # a broken plugin must not take the other codecs down
            _plugin_errors.append(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}")


def codec_class(key: str | int) -> type[Codec]:
    """The codec class for a name or numeric id."""
    table = _by_id if isinstance(key, int) else _by_name
    if key not in table:
        _load_plugins()
    if key not in table:
        names = ", ".join(sorted(_by_name))
        what = f"id {key}" if isinstance(key, int) else repr(key)
        broken = f"; {'; '.join(_plugin_errors)}" if _plugin_errors else ""
        raise CodecError(f"unknown codec {what} (available: {names}){broken}")
    return table[key]


def get_codec(key: str | int, /, **options) -> Codec:
    return codec_class(key).from_config(options)


def available_codecs() -> list[type[Codec]]:
    _load_plugins()
    return sorted(_by_id.values(), key=lambda c: c.codec_id)
