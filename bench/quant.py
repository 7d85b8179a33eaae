"""Quality of weight-only quantization on a trained model: the float model against int8 and int4, side by side.

  python bench/quant.py --model runs/speedrun/grpo/model [--prompts 32 --tokens 64 --problems 500]

For each precision:
  * greedy top-1 agreement: the float model's 64-token greedy continuations of 32 held-out prompts are fed to
    the quantized model (teacher forcing) and its argmax compared with the float model's next token at every
    position (the measure llama.cpp's perplexity tool reports as "same top"); plus how many of the 32 greedy
    continuations the engine reproduces token for token;
  * held-out pass@1 (greedy) on the task's test split, as the speedrun's evaluation computes it;
  * batch-1 decode tokens/s of the engine on the same prompts (a rough figure: bench/local.py measures speed).
One JSON line last: {"int8": {...}, "int4": {...}, "float": {...}} with the CPU class and dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from nanoseek.data.sources import task_problems  # noqa: E402
from nanoseek.engine import LLM, SamplingParams  # noqa: E402
from nanoseek.eval import chat_prompt, evaluate  # noqa: E402


def greedy(llm: LLM, prompts, tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@torch.no_grad()
def teacher_forced_top1(llm: LLM, prompt_ids: list[list[int]], continuations: list[list[int]]) -> float:
    """Share of positions where llm's argmax equals the reference continuation's next token."""
    model, same, total = llm.engine.model, 0, 0
    for p, c in zip(prompt_ids, continuations):
        ids = torch.tensor([p + c])
        logits = model(ids)[0, len(p) - 1: -1]
        same += (logits.argmax(-1) == torch.tensor(c)).sum().item()
        total += len(c)
    return same / total


def decode_rate(llm: LLM, prompt, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([prompt], params)
    start = time.perf_counter()
    llm.generate([prompt], params)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--problems", type=int, default=500, help="held-out problems for pass@1 (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    levels = [int(x) for x in args.levels.split(",")]
    problems = task_problems(args.task, levels, max(args.problems, args.prompts), args.seed, "test")
    prompts = [chat_prompt(p) for p in problems[: args.prompts]]
    results, reference = {}, None
    for scheme in (None, "int8", "int4"):
        llm = LLM(args.model, dtype=args.dtype, quantization=scheme)
        name = scheme or "float"
        ids = [llm.engine.tokenize_prompt(p)[1] for p in prompts]
        outs = greedy(llm, prompts, args.tokens)
        row = {"dtype": str(llm.engine.model.compute_dtype).removeprefix("torch.")}
        if reference is None:
            reference = outs
        else:
            row["greedy_top1_agreement"] = round(teacher_forced_top1(llm, ids, reference), 4)
            row["identical_continuations"] = sum(a == b for a, b in zip(outs, reference))
        if args.problems:
            result = evaluate(llm, problems[: args.problems], n=1, temperature=0.0, max_tokens=args.max_tokens)
            row["pass@1"] = result["overall"]["pass@1"]
        row["decode_tokens_per_s"] = round(decode_rate(llm, prompts[0], args.tokens), 1)
        results[name] = row
        print(name, row, flush=True)
        del llm
    for name in ("int8", "int4"):
        if "pass@1" in results["float"]:
            results[name]["pass@1_delta_points"] = round(100 * (results[name]["pass@1"] - results["float"]["pass@1"]), 2)
    emit({"bench": "quant", "model": args.model, "prompts": args.prompts, "tokens": args.tokens,
          "problems": args.problems, **results})


if __name__ == "__main__":
    main()
