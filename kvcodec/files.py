"""Files written whole or not at all: every output kvcodec writes goes through `atomic_output`."""

from __future__ import annotations

import contextlib
import os
import tempfile

from kvcodec.errors import InputError


@contextlib.contextmanager
def atomic_output(path, overwrite: bool):
    """Yield a binary file that replaces `path` only if the block completes."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise InputError(f"{path} exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and os.path.exists(path):
            raise InputError(f"{path} appeared while writing (use --force to overwrite)")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
