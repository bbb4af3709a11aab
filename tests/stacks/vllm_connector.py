"""Run inside the vLLM test environment (`tests/stacks.py`): one vLLM engine on the CPU (SmolLM2,
converted by `vllm_model.py`), with kvcodec's connector over URL or without it ("none"),
generates greedily for prompts cut from the shipped texts. Prints one JSON object per prompt:
its token ids, the generated ids, vLLM's `num_cached_tokens` and the time to the first token.

    python vllm_connector.py MODEL_DIR URL|none CODEC ROLE verify|exists PROMPTS

ROLE is vLLM's kv_role: kv_producer only stores (so every output is computed), kv_both also
loads, kv_consumer only loads. verify|exists is the connector's verify_lookup.

PROMPTS names the prompts, comma-separated: `prose`, `code`, `data` (the first 600, 500 and 560
tokens of each text), `prose+` (the first 520 of prose, then code's first 80: a longer prompt
sharing prose's first chunks) and `long` (1900 tokens of code). Each prompt runs alone, in order:
12 greedy tokens, after a timed first token alone (max_tokens=1) with KVC_TTFT=1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import kvcodec

LENGTHS = {"prose": 600, "code": 500, "data": 560}
STEPS = 12


def prompt_ids(tokenizer) -> dict[str, list[int]]:
    texts = Path(kvcodec.__file__).parent / "eval" / "data" / "texts"
    ids = {name: tokenizer((texts / f"{name}.txt").read_text()).input_ids for name in LENGTHS}
    prompts = {name: ids[name][:n] for name, n in LENGTHS.items()}
    prompts["prose+"] = ids["prose"][:520] + ids["code"][:80]
    prompts["long"] = ids["code"][:1900]
    return prompts


def cpu_layouts() -> dict:
    """Whether `PagedLayer` reads back what vLLM's own CPU kernel (`cpu_attn_reshape_and_cache`)
    writes into a paged layer, for each kernel ISA the connector accepts."""
    import torch
    from vllm import _custom_ops as ops

    from kvcodec.integrations.paged import KV_SPLITS, PagedLayer

    found = {}
    for (backend, isa), split in KV_SPLITS.items():
        if backend != "CPU_ATTN":
            continue
        blocks, heads, block_size, dim = 4, 3, 128 if isa == "vec" else 16, 64 if isa == "vec" else 80
        kv = torch.zeros(blocks, heads, block_size, 2 * dim, dtype=torch.bfloat16)
        key_cache, value_cache = kv.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)  # as cpu_attn.py
        tokens = blocks * block_size - 5
        key, value = (torch.randn(tokens, heads, dim).to(torch.bfloat16) for _ in range(2))
        slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(0))[:tokens]
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
        got = PagedLayer("layer", kv, split, dim).read(slots)
        found[isa] = bool(got.key[0].transpose(0, 1).equal(key) and got.value[0].transpose(0, 1).equal(value))
    return found


def main(model: str, url: str, codec: str, role: str, verify: str, names: str):
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    print(json.dumps({"name": "layouts", **cpu_layouts()}), flush=True)
    transfer = None
    if url != "none":
        transfer = KVTransferConfig(
            kv_connector="KVCodecConnector", kv_connector_module_path="kvcodec.integrations.vllm",
            kv_role=role, kv_load_failure_policy="recompute",
            kv_connector_extra_config={"url": url, "codec": codec, "model_id": "smollm2-test",
                                       "verify_lookup": verify == "verify",
                                       "background_save": os.environ.get("KVC_BACKGROUND", "1") == "1"})
    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=2048, enforce_eager=True, dtype="bfloat16", enable_prefix_caching=False,
              gpu_memory_utilization=0.3, kv_transfer_config=transfer, seed=0,
              worker_extension_cls="kvcodec.integrations.vllm.SavesExtension",
              # VLLM_ENABLE_V1_MULTIPROCESSING=0: the whole engine in this process (starts 4x faster);
              # otherwise vLLM's own processes, the connector's metadata crossing between them
              distributed_executor_backend="uni" if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" else None)
    print(f"engine started in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    prompts = prompt_ids(llm.get_tokenizer())
    timed = os.environ.get("KVC_TTFT") == "1"
    for name in names.split(","):
        ids = prompts[name]
        first, ttft = None, None
        if timed:
            t0 = time.perf_counter()
            first = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(temperature=0, max_tokens=1),
                                 use_tqdm=False)[0]
            ttft = time.perf_counter() - t0
        out = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(temperature=0, max_tokens=STEPS),
                           use_tqdm=False)[0]
        first = first or out
        if transfer is not None and role != "kv_consumer":
            llm.collective_rpc("kvcodec_wait_for_saves")  # this prompt stored before the next one looks it up
        print(json.dumps({"name": name, "ids": ids, "tokens": list(out.outputs[0].token_ids),
                          "first": list(first.outputs[0].token_ids)[:1], "ttft_s": ttft,
                          "cached_first": first.num_cached_tokens, "cached": out.num_cached_tokens}), flush=True)

if __name__ == "__main__":
    main(*sys.argv[1:7])
