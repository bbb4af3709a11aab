"""Run inside the LMCache test environment (`tests/stacks.py`): kvcodec's serde for LMCache's
multiprocess storage, made by LMCache's own registry (`create_serde_processor`) and run through
its `AsyncSerdeProcessor` on LMCache memory objects, as an L2 adapter's serde wrapper runs it.
Prints one JSON object.

    python lmcache_serde.py CODEC OPTIONS_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor, get_registered_serde_types
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

import kvcodec
import kvcodec.integrations.lmcache_serde  # noqa: F401 - registers "kvcodec"

LAYERS, TOKENS, HIDDEN = 4, 256, 2 * 16


def memory_obj(shape, dtype, fill: bytes | None = None) -> TensorMemoryObj:
    size = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.zeros(size, dtype=torch.uint8)
    if fill is not None:
        raw[:len(fill)] = torch.frombuffer(bytearray(fill), dtype=torch.uint8)
    meta = MemoryObjMetadata(shape=torch.Size(shape), dtype=dtype, address=0, phy_size=size, ref_count=1,
                             fmt=MemoryFormat.KV_2LTD)
    return TensorMemoryObj(raw, meta, None)


def finished(query, task):
    for _ in range(2000):
        done = query(task)
        if done is not None:
            return done
        time.sleep(0.005)
    raise TimeoutError("the serde task did not finish")


def main(codec: str, options: str):
    serde = create_serde_processor(SerdeConfig("kvcodec", {"codec": codec, "options": json.loads(options)}))
    shape = (2, LAYERS, TOKENS, HIDDEN)
    key = ObjectKey(chunk_hash=bytes(range(16)), model_name="kvcodec-test", kv_rank=0)
    other = ObjectKey(chunk_hash=bytes(16), model_name="kvcodec-test", kv_rank=0)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    src = memory_obj(shape, torch.bfloat16)
    src.tensor.copy_(kv)
    capacity = serde.estimate_serialized_size(MemoryLayoutDesc([torch.Size(shape)], [torch.bfloat16]))
    dst = memory_obj((capacity,), torch.uint8)
    stored_ok = finished(serde.query_serialize_result, serde.submit_serialize([src], [dst], [key]))
    stored = bytes(dst.byte_array)  # what an L2 adapter persists: the narrowed size

    def load(data: bytes, as_key):
        """Deserialize `data` from a buffer as large as LMCache allocates: (succeeded, tensor)."""
        out = memory_obj(shape, torch.bfloat16)
        ok = finished(serde.query_deserialize_result,
                      serde.submit_deserialize([memory_obj((capacity,), torch.uint8, data)], [out], [as_key]))
        return ok, out.tensor.float()

    ok, back = load(stored, key)
    flipped = bytearray(stored)
    flipped[len(flipped) // 2] ^= 0x01
    with kvcodec.open(stored[12:]) as reader:  # after the 12-byte frame: an ordinary .kvc entry
        reader.verify()
        entry_codec = reader.info()["codecs"][0]["name"]
    print(json.dumps({
        "registered": "kvcodec" in get_registered_serde_types(), "stored_ok": stored_ok,
        "stored_bytes": len(stored), "raw_bytes": kv.numel() * 2, "capacity": capacity, "frame": stored[:4].decode(),
        "entry_codec": entry_codec, "loaded_ok": ok, "exact": bool(back.equal(kv.float())),
        "max_error": float((back - kv.float()).abs().max()), "scale": float(kv.float().abs().max()),
        "other_key_ok": load(stored, other)[0], "flipped_ok": load(bytes(flipped), key)[0],
        "truncated_ok": load(stored[:len(stored) // 2], key)[0], "garbage_ok": load(b"KVCS" + bytes(40), key)[0],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
