"""Registries by numeric id and by name: value codecs and token-selection stages, built-ins plus
entry-point plugins.

Third-party packages register codecs through the entry-point group `kvcodec.codecs` and
selection stages through `kvcodec.selectors`; each entry point names the class. The built-ins
are registered by their package (`kvcodec.codecs`, `kvcodec.selection`), which a registry
imports on first use, so that `import kvcodec` need not load them (nor torch).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from kvcodec.errors import CodecError

if TYPE_CHECKING:
    from kvcodec.codecs.base import Codec

THIRD_PARTY_MIN_ID = 1024


class Registry:
    """Classes with an integer `codec_id` and a string `name`, unique within the registry: the
    built-ins, which the module `builtins` registers when a registry first imports it, then the
    plugins of `entry_point_group`, loaded when a key is missing or all are listed."""

    def __init__(self, kind: str, entry_point_group: str, builtins: str, check=None):
        self.kind = kind
        self.group = entry_point_group
        self.builtins = builtins
        self.check = check  # raises CodecError for a class this registry must not hold
        self.by_id: dict[int, type] = {}
        self.by_name: dict[str, type] = {}
        self.builtins_loaded = False
        self.plugins_loaded = False
        self.plugin_errors: list[str] = []

    def register(self, cls: type, builtin: bool = False) -> type:
        if not builtin:
            self._load_builtins()  # a plugin's id or name clashing with a built-in fails here, not later
        if not (isinstance(getattr(cls, "codec_id", None), int) and isinstance(getattr(cls, "name", None), str)):
            raise CodecError(f"{cls.__name__} must define integer codec_id and string name")
        if self.check is not None:
            self.check(cls)
        if not builtin and not THIRD_PARTY_MIN_ID <= cls.codec_id <= 0xFFFFFFFF:
            raise CodecError(f"{self.kind} {cls.name!r}: third-party ids start at {THIRD_PARTY_MIN_ID}")
        for table, key in ((self.by_id, cls.codec_id), (self.by_name, cls.name)):
            if table.get(key, cls) is not cls:
                raise CodecError(f"{self.kind} {key!r} is already registered by {table[key].__module__}.{table[key].__name__}")
        self.by_id[cls.codec_id] = cls
        self.by_name[cls.name] = cls
        return cls

    def _load_builtins(self) -> None:
        if not self.builtins_loaded:
            # another thread's import in progress is waited for; within the import itself (its
            # registrations, any lookup they make) this returns the module being imported
            importlib.import_module(self.builtins)
            self.builtins_loaded = True

    def _load_plugins(self) -> None:
        self._load_builtins()
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        for ep in entry_points(group=self.group):
            try:
                self.register(ep.load())
            except Exception as exc:  # a broken plugin must not take the others down
                self.plugin_errors.append(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}")

    def __contains__(self, key) -> bool:
        self._load_builtins()
        table = self.by_id if isinstance(key, int) else self.by_name
        if key not in table:
            self._load_plugins()
        return key in table

    def get(self, key: str | int) -> type:
        if key not in self:
            names = ", ".join(sorted(self.by_name))
            what = f"id {key}" if isinstance(key, int) else repr(key)
            broken = f"; {'; '.join(self.plugin_errors)}" if self.plugin_errors else ""
            raise CodecError(f"unknown {self.kind} {what} (available: {names}){broken}")
        return (self.by_id if isinstance(key, int) else self.by_name)[key]

    def all(self) -> list[type]:
        self._load_plugins()
        return sorted(self.by_id.values(), key=lambda c: c.codec_id)


def _check_codec(cls) -> None:
    bound = getattr(cls, "max_expansion", None)
    if not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and 1 <= bound < float("inf")):
        raise CodecError(f"codec {cls.name!r} must declare max_expansion, the most decoded bytes one payload byte "
                         "can yield (a number >= 1)")


CODECS = Registry("codec", "kvcodec.codecs", "kvcodec.codecs", _check_codec)
SELECTORS = Registry("selection method", "kvcodec.selectors", "kvcodec.selection")


def register_codec(cls: type[Codec], *, builtin: bool = False) -> type[Codec]:
    """Register a codec class (usable as a decorator). Ids and names must be unique, and the
    class must declare `max_expansion`, the bound readers hold its records to."""
    return CODECS.register(cls, builtin)


def codec_class(key: str | int) -> type[Codec]:
    """The codec class for a name or numeric id."""
    return CODECS.get(key)


def get_codec(key: str | int, /, **options) -> Codec:
    return codec_class(key).from_config(options)


def available_codecs() -> list[type[Codec]]:
    return CODECS.all()


def register_selector(cls, *, builtin: bool = False):
    """Register a token-selection stage class (see `kvcodec.select`)."""
    return SELECTORS.register(cls, builtin)


def selector_class(key: str | int):
    return SELECTORS.get(key)


def available_selectors() -> list:
    return SELECTORS.all()
