"""What does RL add that SFT cannot? The R1 protocol against honest controls, on this machine.

    python bench/r1_effect.py [--seeds 0 1] [--arm-seconds 300]        # `products` (recipes/r1_products.toml)
    python bench/r1_effect.py --recipe recipes/r1_effect.toml          # `carries`, where it fails (docs/LOG.md)
    python bench/r1_effect.py --task runs/typed_arithmetic.jsonl       # a task file, answers only

Fixed in advance:
  1. Cold start: pretraining and SFT on worked solutions of the easy levels only (recipe r1_products.toml: the
     `products` family, a*b with b two-digit in partial products, level = 1 + carries of their sum; easy =
     levels 1-2). The cold start is the SFT stage's final model, never chosen by accuracy; it is trained once
     and shared by the seeds (or given with --cold-start).
  2. Hard levels: among the candidates, those where the cold start's pass@8 (T = 1, 100 held-out problems per
     level) lies in [10%, 60%]. With none, the protocol stops and says so.
  3. Three arms from that checkpoint, each with the same wall-time budget (--arm-seconds):
       grpo     - GRPO on the hard levels, whose training data holds only final answers (verifier rewards);
       sft_easy - continued SFT on the easy levels' worked solutions;
       sft_qa   - SFT on question -> answer pairs of the hard levels (no reasoning).
  4. Every arm's final model is evaluated on the same >= 500 held-out hard-level problems (pass@1 greedy,
     pass@8 at T = 1, 95% confidence intervals); the table is the mean over seeds.
With --task FILE the same protocol runs on that file (answers only): the cold start is the default model (the
speedrun's SFT checkpoint), the rule of step 2 is checked on the file's held-out problems, the file's training
split is GRPO's and sft_qa's data, its held-out split the evaluation set.
Prints one JSON line last; runs/r1_effect_<family or file>/ keeps the probe, every seed's result and result.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.data.sources import task_problems  # noqa: E402
from nanoseek.engine import LLM  # noqa: E402
from nanoseek.eval import evaluate  # noqa: E402
from nanoseek.train.grpo import run_grpo  # noqa: E402
from nanoseek.train.recipe import load_recipe  # noqa: E402
from nanoseek.runtime import fast_precision  # noqa: E402
from nanoseek.train.stages import run_stage  # noqa: E402


# The engines inside training use the same precision (runtime.fast_precision).
ENGINE_DTYPE = fast_precision("auto", torch.device("cpu"))


def score(model_dir: Path, problems, seed: int) -> dict:
    llm = LLM(model_dir, dtype=ENGINE_DTYPE, kv_cache_memory="512MiB", max_num_seqs=256)
    greedy = evaluate(llm, problems, n=1, temperature=0.0, max_tokens=320)
    sampled = evaluate(llm, problems, n=8, temperature=1.0, max_tokens=320, seed=seed, ks=[1, 8])
    return {"pass@1": greedy["overall"]["pass@1"], "pass@1_ci95": greedy["overall"]["pass@1_ci95"],
            "pass@8": sampled["overall"].get("pass@8"), "pass@8_ci95": sampled["overall"].get("pass@8_ci95"),
            "levels": {k: v["pass@1"] for k, v in greedy["levels"].items()}}


def probe_hard_levels(cold: Path, task: str, candidates: list[int], out: Path) -> list[int]:
    """Rule 2: the hard levels are the candidates where the cold start's pass@8 (T = 1) lies in [10%, 60%]."""
    llm = LLM(cold, dtype=ENGINE_DTYPE, kv_cache_memory="512MiB", max_num_seqs=256)
    probe = evaluate(llm, task_problems(task, candidates, 100 * max(len(candidates), 1), 99, "test"), n=8,
                     temperature=1.0, max_tokens=320, ks=[1, 8])
    hard = [int(k) for k, v in probe["levels"].items() if 0.10 <= v.get("pass@8", 0) <= 0.60]
    (out / "hard_levels.json").write_text(json.dumps({"probe": probe["levels"], "hard": hard}, indent=2))
    return hard


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "r1_products.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arm-seconds", type=int, default=300)
    ap.add_argument("--eval-problems", type=int, default=500)
    ap.add_argument("--task", default=None, help="JSONL task file (answers only)")
    ap.add_argument("--candidates", default="3")
    ap.add_argument("--cold-start", default=None,
                    help="use this SFT checkpoint (trained on worked solutions of the recipe's easy levels only, e.g. "
                         "runs/r1_cold/sft/model from `nanoseek train pretrain|sft --recipe recipes/r1_products.toml "
                         "run.name=r1_cold`) as the cold start of every seed instead of training one per seed")
    args = ap.parse_args()
    t0 = time.time()
    # Runs are named after the task file, or after the recipe's family.
    tag = Path(args.task).stem if args.task else load_recipe(args.recipe)["data"].get("task", "arithmetic")
    out = ROOT / "runs" / f"r1_effect_{tag}"
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, ["run.seed=0", f"run.name=r1_effect_{tag}_cold"])
    if args.task:  # rule 1 for a file: the default model (the speedrun's SFT checkpoint) is the cold start
        cold = Path(args.cold_start or ROOT / "runs" / "speedrun" / "sft" / "model")
        task, candidates = args.task, []
    else:  # rule 1: the SFT stage's final model, never chosen by accuracy
        if args.cold_start:
            cold = Path(args.cold_start)
        else:
            run_stage(recipe, "pretrain", show_progress=False)
            cold = run_stage(recipe, "sft", show_progress=False)
        task, candidates = recipe["data"].get("task", "arithmetic"), [int(x) for x in args.candidates.split(",")]
    hard = probe_hard_levels(cold, task, candidates, out)
    if not hard:
        probe = json.loads((out / "hard_levels.json").read_text())["probe"]
        print(json.dumps({"bench": "r1_effect", "task": tag, "error": "no candidate has pass@8 in [10%, 60%]",
                          "probe": {k: v.get("pass@8") for k, v in probe.items()}}))
        return
    hard_levels = [] if args.task else hard
    # The easy worked solutions the cold start was taught (the default model's: arithmetic levels 1-3).
    easy_task, easy_levels = ("arithmetic", [1, 2, 3]) if args.task else (task, recipe["data"]["levels"])
    # One held-out evaluation set for every arm and seed (its own seed, 1000), so "before" is measured once.
    eval_set = task_problems(task, hard_levels, args.eval_problems, 1000, "test")
    tokenizer = cold.parent.parent / "tokenizer"  # every arm keeps the cold start's tokenizer
    before = score(cold, eval_set, 1000)
    rows = []
    for seed in args.seeds:
        base = [f"run.seed={seed}", f'tokenizer.path="{tokenizer}"', f'data.task="{task}"', "eval.problems=100"]
        arms = {
            "grpo": [f"grpo.init_from={cold}", f"grpo.max_seconds={args.arm_seconds}", "grpo.steps=100000",
                     f"grpo.levels={hard_levels}", f"data.grpo_levels={hard_levels}",
                     f"eval.grpo_levels={hard_levels}"],
            "sft_easy": [f"sft.init_from={cold}", f"sft.max_seconds={args.arm_seconds}", "sft.steps=100000",
                         "sft.warmup_steps=0", f'data.task="{easy_task}"', f"data.sft_levels={easy_levels}"],
            "sft_qa": [f"sft.init_from={cold}", f"sft.max_seconds={args.arm_seconds}", "sft.steps=100000",
                       "sft.warmup_steps=0", "sft.with_reasoning=false", f"data.sft_levels={hard_levels}"],
        }
        result = {"seed": seed, "hard_levels": hard_levels or "all of the file"}
        for arm, overrides in arms.items():
            r = load_recipe(args.recipe, base + overrides + [f"run.name=r1_effect_{tag}_s{seed}_{arm}"])
            path = run_grpo(r, show_progress=False) if arm == "grpo" else run_stage(r, "sft", show_progress=False)
            result[arm] = score(path, eval_set, seed)
            result[arm]["steps"] = json.loads((path.parent / "summary.json").read_text()).get("steps")
        rows.append(result)
        (out / f"seed{seed}.json").write_text(json.dumps(result, indent=2))

    def mean(arm, key):
        vals = [r[arm][key] for r in rows if r[arm].get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    table = {"before": {"pass@1": before["pass@1"], "pass@8": before["pass@8"]}}
    table.update({arm: {"pass@1": mean(arm, "pass@1"), "pass@8": mean(arm, "pass@8")}
                  for arm in ("grpo", "sft_easy", "sft_qa")})
    best_control = max(table["sft_easy"]["pass@1"], table["sft_qa"]["pass@1"])
    line = {"bench": "r1_effect", "task": tag, "seeds": args.seeds, "hard_levels": hard_levels or "file",
            "arm_seconds": args.arm_seconds, "eval_problems": len(eval_set), "table": table,
            "grpo_minus_best_control_pass@1": table["grpo"]["pass@1"] - best_control,
            "before": before, "per_seed": rows, "wall_minutes": round((time.time() - t0) / 60, 1)}
    (out / "result.json").write_text(json.dumps(line, indent=2))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
