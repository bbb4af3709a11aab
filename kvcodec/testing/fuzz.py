"""Fuzzing the reader and every codec's decoder: mutated, truncated and spliced `.kvc` files.

Most random damage is caught by the checksums, which would leave the validation and decoders
behind them untested; so after mutating, `reseal` recomputes every checksum the damaged file
still lets it find, and the damage reaches the header validation, the index validation and the
decoders. A case passes when decoding either succeeds or raises a `KVCError`; anything else
(another exception, a hang, memory beyond a bound proportional to the input) is a failure.
`benchmarks/fuzz_reader.py` runs many cases; tests run a short deterministic set and replay
every crasher ever found (`tests/fuzz_regressions/`).
"""

from __future__ import annotations

import hashlib
import io
import random
import signal
import struct
import tracemalloc
from dataclasses import dataclass

import torch

from kvcodec.api import decode, encode
from kvcodec.cache import KVCache, LayerKV
from kvcodec.container import format as fmt
from kvcodec.errors import KVCError

TIMEOUT_S = 20.0  # a case taking longer has hung
# Most memory a case may allocate (traced: numpy, Python) per input byte, plus a constant.
MEMORY_PER_BYTE = 64
MEMORY_BASE = 64 << 20
SEED_CODECS = [("raw", {}), ("zstd", {}), ("shuffle-zstd", {}), ("quant", {"bits": 2}), ("quant", {"bits": 3}),
               ("quant", {"bits": 8, "group_size": 5}), ("cachegen", {}), ("cachegen", {"sinks": 0, "group_size": 3}),
               ("cachegen", {"lanes": 1}), ("cachegen", {"lanes": 1, "sinks": 0, "group_size": 3})]


def small_cache(seed: int = 0, pruned: bool = False) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(2):
        k, v = torch.randn(1, 2, 24, 8, generator=g), torch.randn(1, 2, 24, 8, generator=g)
        positions = torch.sort(torch.randperm(40, generator=g)[:24]).values if pruned else None
        layers.append(LayerKV(k.half(), v.to(torch.bfloat16), positions))
    return KVCache(layers, torch.arange(24).reshape(1, 24), {"note": "fuzz seed"}, length=40 if pruned else None)


def seed_files(extra: list[bytes] = ()) -> list[bytes]:
    """Small valid files of every codec (one pruned, with positions), plus `extra`."""
    out = [encode(small_cache(i), name, chunk_tokens=10, **opts) for i, (name, opts) in enumerate(SEED_CODECS)]
    out.append(encode(small_cache(9, pruned=True), "quant", chunk_tokens=7))
    out.append(encode(small_cache(10), "quant", chunk_tokens=6, max_error=0.2))  # several codec slots
    out.append(_ae_file())
    return out + list(extra)


def _ae_file() -> bytes:
    """An `ae` file with a tiny random network embedded (its weights blob is fuzzed too)."""
    import os
    import tempfile

    from kvcodec.codecs.autoencoder import AEConfig, CacheAutoencoder

    torch.manual_seed(0)
    ae = CacheAutoencoder(AEConfig(2, 2, {"key": 8, "value": 8}, latent_dim=4, hidden=8))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ae.safetensors")
        ae.save(path)
        return encode(small_cache(11), "ae", weights=path, chunk_tokens=12)


# -- resealing -------------------------------------------------------------------------------
def reseal(data: bytes) -> bytes:
    """Recompute the header, payload, blob and index checksums wherever the (damaged) file
    still says where they are."""
    out = bytearray(data)
    if len(out) >= fmt.PREAMBLE.size:
        n = struct.unpack_from("<I", out, 12)[0]
        if fmt.PREAMBLE.size + n <= len(out):
            struct.pack_into("<I", out, 28, fmt.crc32(bytes(out[:28]), bytes(out[32:32 + n])))
    if len(out) < fmt.PREAMBLE.size + fmt.TRAILER.size:
        return bytes(out)
    t = len(out) - fmt.TRAILER.size
    offset, length = struct.unpack_from("<QQ", out, t)
    if not (0 < offset and offset + length == t):
        return bytes(out)
    try:
        records, blobs = fmt.parse_index(bytes(out[offset:offset + length]))
    except (KVCError, ValueError):
        records = blobs = None
    if records is not None:
        records, blobs = records.copy(), blobs.copy()
        for table in (records, blobs):
            for row in table:
                a, n = int(row["offset"]), int(row["length"])
                if a + n <= offset:
                    row["crc32"] = fmt.crc32(bytes(out[a:a + n]))
        index = fmt.pack_index(records, blobs)
        if len(index) == length:
            out[offset:offset + length] = index
    head = bytes(out[t:t + 20])
    struct.pack_into("<I", out, t + 20, fmt.crc32(head, bytes(out[offset:offset + length])))
    return bytes(out)


# -- mutations -------------------------------------------------------------------------------
def _regions(data: bytes) -> list[tuple[int, int]]:
    """Header, index and the rest: mutations aim at each alike."""
    n = len(data)
    header_end = min(n, fmt.PREAMBLE.size + struct.unpack_from("<I", data, 12)[0]) if n >= 16 else n
    index_at = struct.unpack_from("<Q", data, n - 32)[0] if n >= 32 else n
    index_at = index_at if 0 < index_at < n else max(0, n - 32)
    return [(0, header_end), (header_end, index_at), (index_at, n)]


def _region(data: bytes, rng: random.Random) -> tuple[int, int, int]:
    """(region number, start, stop): payloads most often, where the decoders are."""
    regions = _regions(data)
    k = rng.choices([0, 1, 2], weights=[2, 6, 2])[0]
    lo, hi = regions[k]
    return (k, lo, hi) if hi > lo else (1, 0, len(data))


def _flip(data: bytearray, rng: random.Random) -> None:
    k, lo, hi = _region(bytes(data), rng)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        if hi > lo:
            at = rng.randrange(lo, hi)
            if k == 0 and at >= fmt.PREAMBLE.size:  # header JSON: keep it text, so parsing gets past UTF-8
                data[at] = rng.choice(b'0123456789-.,:{}[]"eE ')
            else:
                data[at] = rng.choice([data[at] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 255])


def _integer(data: bytearray, rng: random.Random) -> None:
    """An integer field somewhere set to an edge value."""
    if len(data) < 8:
        return
    k, lo, hi = _region(bytes(data), rng)
    if k == 0:  # in the header, only the preamble's fields are binary
        lo, hi = 0, min(hi, fmt.PREAMBLE.size)
    at = rng.randrange(lo, max(lo + 1, hi - 7)) & ~3
    width = rng.choice([2, 4, 8])
    value = rng.choice([0, 1, 2, 255, 256, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63 - 1])
    value &= (1 << (8 * width)) - 1
    if at + width <= len(data):
        data[at:at + width] = value.to_bytes(width, "little")


def _header_text(data: bytearray, rng: random.Random) -> None:
    """A number or string in the header JSON replaced (the header is JSON: edit it as text)."""
    if len(data) < 32:
        return
    n = min(struct.unpack_from("<I", data, 12)[0], len(data) - 32)  # the length field may be damaged
    text = bytes(data[32:32 + n])
    digits = [i for i, c in enumerate(text) if 48 <= c <= 57]
    if not digits:
        return
    at = rng.choice(digits)
    new = rng.choice([b"9", b"0", b"-1", b"99999999", b"1e300", b"0.5", b"null", b'"x"', b"[]"])
    data[32:32 + n] = (text[:at] + new + text[at + 1:])[:n].ljust(n, b" ")


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    out = bytearray(data)
    kind = rng.choices(["flip", "integer", "header", "truncate", "splice", "insert", "delete"],
                       weights=[8, 6, 3, 1, 1, 1, 1])[0]
    if kind == "flip":
        _flip(out, rng)
    elif kind == "integer":
        _integer(out, rng)
    elif kind == "header":
        _header_text(out, rng)
    elif kind == "truncate":
        out = out[:rng.randrange(len(out) + 1)]
    elif kind == "splice":
        other = rng.choice(others)
        cut = rng.randrange(len(out) + 1)
        out = out[:cut] + other[min(len(other), cut + rng.randrange(-64, 65)):]
    elif kind == "insert":
        at = rng.randrange(len(out) + 1)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 64])))
    else:
        at = rng.randrange(len(out) + 1)
        del out[at:at + rng.choice([1, 8, 64])]
    return reseal(bytes(out)) if rng.random() < 0.9 else bytes(out)


# -- one case ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool  # decoded, or refused with a KVCError
    refused: bool
    problem: str = ""
    peak_bytes: int = 0


class Hang(BaseException):
    """Raised by the alarm when a case runs past TIMEOUT_S."""


def _alarm(signum, frame):
    raise Hang()


def run_case(data: bytes, timeout: float = TIMEOUT_S) -> Outcome:
    """Decode `data` as a whole file and layer by layer; a KVCError is a pass. (Call it from
    the main thread: the time limit is a SIGALRM.)"""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    tracemalloc.start()
    try:
        try:
            decode(data)
            from kvcodec.container.reader import KVCReader

            with KVCReader(io.BytesIO(data)) as reader:
                for i in range(reader.num_layers):
                    reader.read(i, tokens=slice(1, 5))
            refused = False
        except KVCError:
            refused = True
        except Hang:
            return Outcome(False, False, f"no answer within {timeout:g} s", tracemalloc.get_traced_memory()[1])
        except Exception as exc:  # noqa: BLE001 - that is what the fuzzer looks for
            return Outcome(False, False, f"{type(exc).__name__}: {str(exc)[:300]}", tracemalloc.get_traced_memory()[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        tracemalloc.stop()
    if peak > MEMORY_PER_BYTE * len(data) + MEMORY_BASE:
        return Outcome(False, refused, f"allocated {peak} bytes for a {len(data)}-byte input", peak)
    return Outcome(True, refused, "", peak)


def cases(seed: int, count: int, seeds: list[bytes]):
    """`count` mutated inputs, deterministic in `seed`: (case number, bytes)."""
    rng = random.Random(seed)
    for i in range(count):
        data = rng.choice(seeds)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data = mutate(data, rng, seeds)
        yield i, data


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
