"""Caches in key-value stores: one entry per chunk of tokens, keyed by its content, so a prefix
shared by many prompts is stored once and any prompt starting with it finds it.

A chunk's key hashes the model id, the codec and its config, where the chunk starts and every
token id up to its end: the keys and values of a token depend on all tokens before it, so equal
keys mean equal chunks. An entry is an ordinary `.kvc` file of the chunk's tokens of every layer,
its token ids, and in its metadata the key it was written under and its token range.

Entries are not trusted: a backend may hold swapped, truncated, corrupt or foreign bytes under a
key. `PrefixStore.get` decodes each entry and checks it is the chunk it asked for (its key and
token range, its token ids, its token count, layer shapes and dtypes agreeing with the chunks
before it); the first entry that is missing or fails ends the prefix there.

`PrefixStore` works over any backend with `get_many(keys)`, `contains(keys)` and `put(key, data)`:
`MemoryBackend` (a dict), `RedisBackend` (a redis-py client: Redis, Valkey, KeyDB, ...) and
`FolderBackend` (files) are here, each also with `keys()`, `delete(key)` and `close()` for the
serving-stack plugins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import urllib.parse
from typing import Sequence

import numpy as np
import torch

from kvcodec.api import decode, encode
from kvcodec.api import open as open_kvc
from kvcodec.cache import KVCache, LayerKV
from kvcodec.codecs.base import Codec
from kvcodec.encoding.pipeline import parse
from kvcodec.errors import InputError, KVCError
from kvcodec.files import atomic_output
from kvcodec.registry import codec_class

# Part of every content key. Version 2 entries carry META_KEY and META_TOKENS and are verified on
# read; version 1 entries did not identify themselves, so bumping the version makes them misses
# (their keys are never asked for again) rather than entries trusted unchecked.
KEY_VERSION = "kvcodec-chunk-2"
META_KEY = "kvcodec.store.key"  # the content key an entry was written under
META_TOKENS = "kvcodec.store.tokens"  # its token range, "start:stop"

log = logging.getLogger(__name__)


def content_key(model_id: str, token_ids: Sequence[int], codec: str, config: dict, start: int = 0) -> str:
    """Hex sha256 naming the chunk of tokens [start, len(token_ids)) of the cache that `model_id`
    computes for `token_ids`, stored with `codec` and `config`."""
    ids = np.asarray(token_ids, dtype="<i8").reshape(-1)
    if not 0 <= start < len(ids):
        raise InputError(f"a chunk starts inside its tokens: start {start} of {len(ids)}")
    head = json.dumps({"v": KEY_VERSION, "model": model_id, "codec": codec, "config": config, "start": start},
                      sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(head.encode())
    digest.update(ids.tobytes())
    return digest.hexdigest()


def cache_slice(cache: KVCache, start: int, stop: int) -> KVCache:
    """Tokens [start, stop) of every layer, as their own cache (copies: views would drag their
    whole tensors into an encoder's memory)."""
    layers = [LayerKV(lay.key[:, :, start:stop].clone(), lay.value[:, :, start:stop].clone()) for lay in cache.layers]
    ids = None if cache.token_ids is None else cache.token_ids[..., start:stop].clone()
    return KVCache(layers, ids, dict(cache.metadata), cache.layout)


def encode_chunk(cache: KVCache, start: int, stop: int, codec: str | Codec = "raw", **options) -> bytes:
    """Tokens [start, stop) of every layer as `.kvc` bytes (`kvcodec.decode` restores them)."""
    n = cache.layers[0].key.shape[2]
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= n):
        raise InputError(f"a chunk is a token range inside the cache's {n} tokens, not [{start}, {stop})")
    return encode(cache_slice(cache, start, stop), codec, **options)


def concat(parts: list[KVCache]) -> KVCache:
    """Caches of consecutive token ranges, joined along tokens."""
    layers = [LayerKV(torch.cat([p.layers[i].key for p in parts], 2), torch.cat([p.layers[i].value for p in parts], 2))
              for i in range(parts[0].num_layers)]
    ids = [p.token_ids for p in parts]
    return KVCache(layers, None if any(i is None for i in ids) else torch.cat(ids, -1), dict(parts[0].metadata),
                   parts[0].layout)


def whole_cache_codec(codec: str | Codec, options: dict) -> Codec:
    """The codec a store writes every entry with: a name and its options, or a codec, never a
    pruning pipeline (pruned chunks do not join into a prefix). Unknown codecs and options fail
    here, before anything is stored."""
    if isinstance(codec, Codec):
        return codec
    pipe = parse(codec, options)
    if pipe.selector is not None:
        raise InputError("a store keeps whole caches: use a codec, not a selection pipeline")
    return codec_class(pipe.codec).from_config(pipe.options)


class MemoryBackend:
    """Entries in a dict (tests, examples, a process-local tier)."""

    def __init__(self):
        self.entries: dict[str, bytes] = {}

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.entries.get(k) for k in keys]

    def put(self, key: str, data: bytes) -> bool:
        """Store unless present; True when stored."""
        if key in self.entries:
            return False
        self.entries[key] = bytes(data)
        return True

    def contains(self, keys: list[str]) -> list[bool]:
        return [k in self.entries for k in keys]

    def keys(self) -> list[str]:
        return list(self.entries)

    def delete(self, key: str) -> None:
        self.entries.pop(key, None)

    def close(self) -> None:
        pass


TIMEOUT_S = 10.0  # a Redis server's answer, at most


class RedisBackend:
    """Entries in a Redis-protocol server through a redis-py client, under `namespace`, with an
    optional expiry (`ttl` seconds). Lookups of a prompt's chunks take one round trip (MGET)."""

    def __init__(self, client, namespace: str = "kvc:", ttl: int | None = None):
        self.client, self.namespace, self.ttl = client, namespace, ttl

    @classmethod
    def from_url(cls, url: str, namespace: str = "kvc:", ttl: int | None = None,
                 timeout: float = TIMEOUT_S) -> "RedisBackend":
        """A backend on the server at `url` (redis://host:port/db, rediss://, unix://); a server
        that does not answer within `timeout` seconds is an error, never a hang."""
        try:
            import redis
        except ImportError:
            raise InputError(f"{url} needs redis-py (pip install 'kvcodec[redis]')") from None
        try:
            client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:
            raise InputError(f"{url} is not a Redis URL ({exc})") from None
        return cls(client, namespace, ttl)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self.client.mget([self.namespace + k for k in keys]) if keys else []

    def put(self, key: str, data: bytes) -> bool:
        return bool(self.client.set(self.namespace + key, bytes(data), nx=True, ex=self.ttl))

    def contains(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self.namespace + k)
        return [bool(n) for n in pipe.execute()]

    def keys(self) -> list[str]:
        n = len(self.namespace)
        found = (k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else k
                 for k in self.client.scan_iter(match=_glob_escape(self.namespace) + "*", count=1000))
        return [k[n:] for k in found]

    def delete(self, key: str) -> None:
        self.client.delete(self.namespace + key)

    def close(self) -> None:
        self.client.close()


ENTRY_SUFFIX = ".kvc"
MAX_NAME = 240  # bytes of an entry's file name, under the usual 255


def entry_name(key: str) -> str:
    """The file name of `key`'s entry: the key percent-encoded (a leading "." too: never hidden),
    `%` for the empty key, `%h` and a digest for keys too long to be a name; `.kvc` after."""
    name = urllib.parse.quote(key, safe="@=+,-_~")  # "." stays: only a leading one is encoded
    if name.startswith(".") or not name:  # hidden, or the folder itself: never a key's file
        name = "%2E" + name[1:] if name else "%"
    name += ENTRY_SUFFIX
    if len(name.encode()) > MAX_NAME:  # long keys: a digest names the file
        name = "%h" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest() + ENTRY_SUFFIX
    return name


def keys_of(names) -> list[str]:
    """The keys that entry file `names` hold (those `entry_name` made), except long ones."""
    stems = (name[:-len(ENTRY_SUFFIX)] for name in names
             if name.endswith(ENTRY_SUFFIX) and not name.startswith((".", "%h")))
    return ["" if stem == "%" else urllib.parse.unquote(stem) for stem in stems]  # "%": the empty key


class FolderBackend:
    """Entries as `.kvc` files in a folder, one per key (named by `entry_name`), each written
    whole or not at all (`atomic_output`): several processes may share the folder."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot use {self.path} as a cache folder: {exc.strerror or exc}") from None
        if not os.path.isdir(self.path):
            raise InputError(f"{self.path} is not a folder")

    def _file(self, key: str) -> str:
        return os.path.join(self.path, entry_name(key))

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        out = []
        for k in keys:
            try:
                with open(self._file(k), "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append(None)
            except OSError as exc:
                raise InputError(f"cannot read the entry of {k[:60]!r} in {self.path}: {exc.strerror or exc}") from None
        return out

    def put(self, key: str, data: bytes) -> bool:
        path = self._file(key)
        if os.path.exists(path):
            return False
        try:
            with atomic_output(path, overwrite=False) as f:
                f.write(data)
        except InputError:
            if os.path.exists(path):  # another writer got there first
                return False
            raise
        return True

    def contains(self, keys: list[str]) -> list[bool]:
        return [os.path.exists(self._file(k)) for k in keys]

    def keys(self) -> list[str]:
        """The keys held, except long ones (their files are named by a digest)."""
        return keys_of(sorted(os.listdir(self.path)))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(key))

    def close(self) -> None:
        pass


class FsspecBackend:
    """Entries as files under a URL of any fsspec filesystem (s3://, gs://, az://, memory://,
    http(s):// to read, ...), named as `FolderBackend` names them: a folder it wrote, served over
    HTTP or synced to a bucket, reads back through this. Writes are whole objects (object stores
    make each put atomic)."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise InputError(f"{url} needs fsspec (pip install 'kvcodec[remote]')") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
            raise InputError(f"cannot use {url} as a store: {exc}") from None
        self.url, self.root = url, root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{entry_name(key)}"

    def _failed(self, what: str, key: str, exc: Exception) -> InputError:
        return InputError(f"cannot {what} the entry of {key[:60]!r} at {self.url}: {exc}".splitlines()[0])

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        out = []
        for k in keys:
            try:
                out.append(self.fs.cat_file(self._path(k)))
            except FileNotFoundError:
                out.append(None)
            except Exception as exc:  # noqa: BLE001 - each filesystem raises its own
                raise self._failed("read", k, exc) from None
        return out

    def put(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, bytes(data))
        except Exception as exc:  # noqa: BLE001 - read-only filesystems (http) refuse here
            raise self._failed("store", key, exc) from None
        return True

    def contains(self, keys: list[str]) -> list[bool]:
        try:
            return [self.fs.exists(self._path(k)) for k in keys]
        except Exception as exc:  # noqa: BLE001
            raise self._failed("look up", keys[0] if keys else "", exc) from None

    def keys(self) -> list[str]:
        """The keys held, except long ones (their files are named by a digest)."""
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return keys_of(sorted(names))

    def delete(self, key: str) -> None:
        """Remove the entry; where the filesystem cannot (http), it stays and is refused on read."""
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            log.warning("store at %s: cannot delete the entry of %r: %s", self.url, key[:60], exc)

    def close(self) -> None:
        pass


def backend_for(url: str, namespace: str = "kvc:"):
    """The backend a URL names: redis://, rediss:// or unix:// (a Redis server), file:// or a
    plain path (a folder), any other URL an fsspec filesystem (s3://, gs://, http(s)://, ...)."""
    if not isinstance(url, str) or not url:
        raise InputError("a store location must be a non-empty string (a folder or a redis:// URL)")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisBackend.from_url(url, namespace)
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"{url} names another host; a folder must be local")
        return FolderBackend(urllib.parse.unquote(parts.path))
    if "://" in url:
        return FsspecBackend(url)
    return FolderBackend(url)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class PrefixStore:
    """Store caches chunk by chunk and restore the longest stored prefix of a prompt.

    `codec` and `options` as for `kvcodec.encode` (a codec, not a pruning pipeline: chunks of a
    pruned cache do not join into a prefix). Chunks hold `chunk_tokens` tokens; a cache's last,
    shorter chunk is stored too, and found by a prompt of exactly those tokens."""

    def __init__(self, backend, model_id: str, codec: str | Codec = "cachegen", chunk_tokens: int = 256, **options):
        self.codec = whole_cache_codec(codec, options)
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise InputError(f"chunk_tokens must be a positive integer, not {chunk_tokens!r}")
        if not isinstance(model_id, str) or not model_id:
            raise InputError("model_id must name the model the caches come from")
        self.backend, self.model_id, self.chunk_tokens = backend, model_id, chunk_tokens
        self._config = self.codec.get_config()

    def _ids(self, token_ids) -> np.ndarray:
        ids = np.asarray(torch.as_tensor(token_ids).cpu(), dtype=np.int64)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise InputError(f"token ids must be one sequence, not shape {tuple(ids.shape)}")
        return ids

    def chunks(self, token_ids) -> list[tuple[int, int, str]]:
        """(start, stop, key) of every chunk of a cache of `token_ids`."""
        ids = self._ids(token_ids)
        bounds = list(range(0, len(ids), self.chunk_tokens)) + [len(ids)]
        return [(a, b, content_key(self.model_id, ids[:b], self.codec.name, self._config, a))
                for a, b in zip(bounds, bounds[1:])]

    def put(self, cache: KVCache, token_ids=None) -> int:
        """Store the chunks of `cache` (its own token ids unless given) not stored yet; returns
        how many were new."""
        ids = self._ids(token_ids if token_ids is not None else cache.token_ids if cache.token_ids is not None
                        else _missing_ids())
        sliding = [i for i, lay in enumerate(cache.layers) if lay.window is not None]
        if sliding:
            raise InputError(f"a prefix store keeps caches whose layers hold every token; layer {sliding[0]} is a "
                             "sliding-window layer")
        if any(lay.positions is not None for lay in cache.layers):
            raise InputError("a prefix store keeps whole caches; this one is pruned")
        b, _, t, _ = cache.layers[0].key.shape
        if b != 1 or t != len(ids):
            raise InputError(f"the cache holds {b} sequence(s) of {t} tokens; a prefix store needs one sequence "
                             f"with one token id per token ({len(ids)} given)")
        chunks = self.chunks(ids)
        present = self.backend.contains([key for _, _, key in chunks])
        written = 0
        for (a, b, key), found in zip(chunks, present):
            if not found:
                part = cache_slice(cache, a, b)
                part.token_ids = torch.from_numpy(ids[a:b].copy()).reshape(1, -1)
                part.metadata.update({META_KEY: key, META_TOKENS: f"{a}:{b}"})
                written += bool(self.backend.put(key, encode(part, self.codec)))
        return written

    def stored(self, token_ids, verify: bool = True) -> int:
        """How many leading tokens of `token_ids` the store holds, without decoding: the end of
        the run of chunks from the first whose entries are present and, with `verify`, whose
        checksums pass and which name their key and token range (a damaged one is deleted, as
        by `get`). The cheap look a scheduler takes before promising a load; `get` still decodes
        and checks every entry."""
        chunks = self.chunks(token_ids)
        keys = [key for _, _, key in chunks]
        found = self.backend.get_many(keys) if verify else [b"" if c else None for c in self.backend.contains(keys)]
        end = 0
        for (a, b, key), data in zip(chunks, found):
            if data is None:
                break
            if verify and not _entry_intact(data, key, a, b):
                self.backend.delete(key)
                break
            end = b
        return end

    def get(self, token_ids, device=None) -> tuple[KVCache | None, int]:
        """(cache of the longest stored and verified prefix of `token_ids`, its length): (None, 0)
        when not even the first chunk is.

        Each entry is decoded and checked before it is used (see `_verify`); the first entry that
        is missing, does not decode, or is not the chunk asked for ends the prefix, and a damaged
        one is logged as a warning and deleted (the next `put` of its chunk writes it again).
        Damaged entries never raise and never reach the result."""
        ids = self._ids(token_ids)
        chunks = self.chunks(ids)
        found = self.backend.get_many([key for _, _, key in chunks])
        parts: list[KVCache] = []
        for (a, b, key), data in zip(chunks, found):
            if data is None:
                break
            try:
                part = decode(data, device=device)
            except KVCError as e:
                log.warning("prefix store: entry for tokens [%d, %d) (key %s) does not decode: %s; "
                            "prefix ends at %d", a, b, key, e, a)
                self.backend.delete(key)
                break
            problem = _verify(part, key, a, b, ids[a:b], parts[0] if parts else None)
            if problem is not None:
                log.warning("prefix store: entry for tokens [%d, %d) (key %s) refused: %s; prefix ends at %d",
                            a, b, key, problem, a)
                self.backend.delete(key)
                break
            parts.append(part)
        if not parts:
            return None, 0
        cache = concat(parts)
        for name in (META_KEY, META_TOKENS):  # they describe one entry, not the prefix
            cache.metadata.pop(name, None)
        return cache, chunks[len(parts) - 1][1]


def _entry_intact(data: bytes, key: str, start: int, stop: int) -> bool:
    """Whether `data` passes every checksum and names chunk [start, stop) of `key` (logged when not)."""
    try:
        with open_kvc(data) as reader:
            reader.verify()
            meta = reader.header.metadata
    except KVCError as e:
        log.warning("prefix store: entry for tokens [%d, %d) (key %s) is damaged: %s", start, stop, key, e)
        return False
    problem = _naming_problem(meta, key, start, stop)
    if problem is not None:
        log.warning("prefix store: entry for tokens [%d, %d) (key %s) refused: %s", start, stop, key, problem)
        return False
    return True


def _naming_problem(meta: dict, key: str, start: int, stop: int) -> str | None:
    """Why an entry's metadata `meta` does not name chunk [start, stop) of `key`, or None."""
    if meta.get(META_KEY) != key:
        return "it names another key" if META_KEY in meta else "it does not name its key"
    if meta.get(META_TOKENS) != f"{start}:{stop}":
        return f"it holds tokens {meta.get(META_TOKENS)!r}"
    return None


def _verify(part: KVCache, key: str, start: int, stop: int, ids: np.ndarray, first: KVCache | None) -> str | None:
    """Why the decoded entry `part` is not chunk [start, stop) of key `key` with token ids `ids`
    (consistent with the prefix's first chunk `first`), or None when it is."""
    problem = _naming_problem(part.metadata, key, start, stop)
    if problem is not None:
        return problem
    n = stop - start
    t = part.token_ids
    if t is None or tuple(t.shape) != (1, n) or not np.array_equal(t.cpu().numpy().reshape(-1), ids):
        return "its token ids are not the prompt's"
    if part.length is not None or part.selection is not None:
        return "it is a pruned cache"
    if first is not None and part.num_layers != first.num_layers:
        return f"it has {part.num_layers} layers, the prefix {first.num_layers}"
    for i, lay in enumerate(part.layers):
        if lay.positions is not None:
            return f"layer {i} is pruned"
        for name in ("key", "value"):
            x = getattr(lay, name)
            if x.shape[0] != 1 or x.shape[2] != n:
                return f"layer {i} {name} has shape {tuple(x.shape)}, not 1 sequence of {n} tokens"
            if first is not None:
                y = getattr(first.layers[i], name)
                if x.dtype != y.dtype or (x.shape[1], x.shape[3]) != (y.shape[1], y.shape[3]):
                    return (f"layer {i} {name} is {x.dtype} {tuple(x.shape)}, the prefix's "
                            f"{y.dtype} {tuple(y.shape)}")
    return None


def _missing_ids():
    raise InputError("the cache has no token ids: pass token_ids")
