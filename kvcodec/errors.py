"""Exceptions. Every failure a user can cause is a `KVCError` with a one-line message."""


class KVCError(Exception):
    """Base class: the message is meant to be shown to a user as is."""


class InputError(KVCError):
    """An input cache (file or in-memory object) is unreadable, ambiguous or malformed."""


class FormatError(KVCError):
    """A `.kvc` file or buffer violates the format specification."""


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum (corruption)."""


class CodecError(KVCError):
    """Unknown codec, bad codec option, or a payload a codec cannot decode."""
