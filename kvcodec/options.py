"""Options as constructor keywords: the one config convention codecs and selection stages share."""

from __future__ import annotations

import inspect
from typing import ClassVar

from kvcodec.errors import CodecError


class Configurable:
    """Subclasses take their options as keyword arguments of `__init__`, validate them there and
    keep each one as an attribute of the same name, so the config round-trips through JSON."""

    name: ClassVar[str]
    kind: ClassVar[str] = "codec"

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

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({opts})"
