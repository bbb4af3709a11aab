"""Files written whole or not at all: every output kvcodec writes goes through `atomic_output`."""

from __future__ import annotations

import contextlib
import os
import tempfile

from kvcodec.errors import InputError


@contextlib.contextmanager
def atomic_output(path, overwrite: bool):
    """Yield a binary file that replaces `path` only if the block completes. A failure to write
    (a full disk, a folder that does not exist or is not writable) is an InputError naming the
    path, and leaves nothing behind."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise InputError(f"{path} exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and os.path.exists(path):
            raise InputError(f"{path} appeared while writing (use --force to overwrite)")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    """The process umask, read once: setting it to read it back is not safe once threads write."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK
