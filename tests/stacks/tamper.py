"""Damaging stored entries on purpose, for the stack scripts' corruption checks."""


def overwrite(backend, key: str, data: bytes) -> None:
    """Replace the entry under `key` (kvcodec's backends store only keys not present yet)."""
    if hasattr(backend, "client"):  # RedisBackend
        backend.client.set(backend.namespace + key, data)
    else:  # FolderBackend
        with open(backend._file(key), "wb") as f:
            f.write(data)
