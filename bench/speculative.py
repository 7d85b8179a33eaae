"""MTP speculative decoding against plain decoding, batch 1, on a trained model with an MTP layer.

    python bench/speculative.py --model runs/speedrun/grpo/model [--prompts 8 --tokens 128 --rounds 3]

Held-out chat prompts of the task are decoded greedily one at a time (batch 1), plain and with
`speculative="mtp"` for each k in --k, in alternating rounds (this host's speed drifts; the per-round ratio's
median is reported). Also checked: the speculative outputs are token-for-token the plain ones. One JSON line
last: tokens/s, speed-up, acceptance rate and mean tokens per step for each k, with the CPU class and dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from nanoseek import LLM, SamplingParams  # noqa: E402
from nanoseek.data.sources import task_problems  # noqa: E402
from nanoseek.eval import chat_prompt  # noqa: E402


def decode_all(llm: LLM, prompts, params) -> tuple[float, list[list[int]], int]:
    """(seconds, outputs, engine steps) of decoding each prompt alone."""
    outs, steps, start = [], 0, time.perf_counter()
    for p in prompts:
        out = llm.generate([p], params)[0]
        outs.append(out.outputs[0].token_ids)
        steps += len(set(out.metrics.token_times))
    return time.perf_counter() - start, outs, steps


def compare(model: str, prompts, tokens: int, ks: list[int], rounds: int, dtype: str = "auto",
            quantization: str | None = None) -> dict:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    plain = LLM(model, dtype=dtype, quantization=quantization)
    engines = {k: LLM(model, dtype=dtype, quantization=quantization, speculative="mtp", num_speculative_tokens=k)
               for k in ks}
    for llm in [plain, *engines.values()]:  # warm-up
        llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=8))
    results = {k: {"ratios": [], "tok_s": [], "identical": True, "steps": 0} for k in ks}
    plain_rates = []
    for _ in range(rounds):
        seconds, reference, _ = decode_all(plain, prompts, params)
        plain_rates.append(len(prompts) * tokens / seconds)
        for k, llm in engines.items():
            spec_seconds, outs, steps = decode_all(llm, prompts, params)
            r = results[k]
            r["ratios"].append(seconds / spec_seconds)
            r["tok_s"].append(len(prompts) * tokens / spec_seconds)
            r["identical"] &= outs == reference
            r["steps"] += steps
    out = {"dtype": str(plain.engine.model.compute_dtype).removeprefix("torch."), "quantization": quantization,
           "plain_tok_s": round(statistics.median(plain_rates), 1)}
    for k, llm in engines.items():
        totals, r = llm.engine.totals, results[k]
        out[f"mtp_k{k}"] = {
            "tok_s": round(statistics.median(r["tok_s"]), 1),
            "speedup": round(statistics.median(r["ratios"]), 3),
            "speedups": [round(x, 3) for x in r["ratios"]],
            "acceptance": round(totals["spec_accepted_tokens"] / max(1, totals["spec_draft_tokens"]), 3),
            "tokens_per_step": round(rounds * len(prompts) * tokens / r["steps"], 3),
            "greedy_identical": r["identical"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, choices=["int8", "int4"])
    args = ap.parse_args()
    problems = task_problems(args.task, [1, 2, 3], args.prompts, 0, "test")
    prompts = [chat_prompt(p) for p in problems]
    result = compare(args.model, prompts, args.tokens, [int(k) for k in args.k.split(",")], args.rounds, args.dtype,
                     args.quantization)
    emit({"bench": "speculative", "model": args.model, "prompts": args.prompts, "tokens": args.tokens,
          "batch": 1, **result})


if __name__ == "__main__":
    main()
