"""Options as constructor keywords: the one config convention codecs and selection stages share."""

from __future__ import annotations

import functools
import inspect
from typing import ClassVar

from kvcodec.errors import CodecError


class Configurable:
    """Subclasses take their options as keyword arguments of `__init__`, validate them there and
    keep each one as an attribute of the same name, so the config round-trips through JSON.

    Objects are immutable once built (setting an attribute afterwards raises), equal when their
    type and config are, and hashable: they are configuration, never a cache of decoding state."""

    name: ClassVar[str]
    kind: ClassVar[str] = "codec"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _freezing(cls.__dict__["__init__"])

    def __setattr__(self, key, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"{type(self).__name__} is immutable: build a new one with other options")
        object.__setattr__(self, key, value)

    def __delattr__(self, key):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def get_config(self) -> dict:
        """JSON-serializable options; `from_config(get_config())` rebuilds an equal object."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    @classmethod
    def option_names(cls) -> list[str]:
        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]

    @classmethod
    def defaults(cls) -> dict:
        """The options' default values, read from the signature (no object is built, so codecs
        with a required option such as a weights file list theirs too)."""
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}

    @classmethod
    def from_config(cls, config: dict):
        known = cls.option_names()
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise CodecError(f"{cls.kind} {cls.name!r} has no option {unknown[0]!r} (options: {', '.join(known) or 'none'})")
        try:
            return cls(**config)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"{cls.kind} {cls.name!r}: {exc}") from None

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), _hashable(self.get_config())))

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({opts})"


def _hashable(value):
    """A hashable form of a config value, equal wherever the values compare equal (1 == 1.0)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _freezing(init):
    """`init`, freezing the object once the constructor of its own class has returned (a
    subclass's constructor may still set attributes after calling its parent's)."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self).__init__ is wrapper:
            object.__setattr__(self, "_frozen", True)

    return wrapper
