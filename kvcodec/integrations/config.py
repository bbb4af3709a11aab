"""What the plugins read from their stacks' configuration, read one way."""

from __future__ import annotations

import json

from kvcodec.errors import InputError


def codec_options(options) -> dict:
    """A codec's options from a config: a dict, a JSON object or nothing."""
    if options is None:
        return {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            raise InputError(f"codec options must be a JSON object, not {options[:60]!r}") from None
    if not isinstance(options, dict):
        raise InputError(f"codec options must be an object, not {type(options).__name__}")
    return dict(options)
