"""What does RL add that SFT cannot? The R1 protocol against honest controls, on this machine.

    python bench/r1_effect.py [--seeds 0 1] [--arm-seconds 480] [--task FILE.jsonl]

Fixed in advance:
  1. Cold start: pretrain + SFT with worked solutions of the easy levels only (recipe r1_effect.toml); the
     cold-start checkpoint is the SFT stage's final model (no selection by accuracy).
  2. Hard levels: among the candidates, those where the cold-start model's pass@8 (T=1) lies in [10%, 60%].
  3. Three arms from that checkpoint, each with the same wall-time budget:
       grpo     - GRPO on the hard levels, whose training data holds only final answers (verifier rewards);
       sft_easy - continued SFT on the easy levels' worked solutions;
       sft_qa   - SFT on question -> answer pairs of the hard levels (no reasoning).
  4. Every arm is evaluated on >= 500 held-out hard-level problems (pass@1 greedy, pass@8 sampled) with 95%
     confidence intervals; each seed repeats 3-4; the table reports the mean over seeds.
With --task FILE (answers only) the same protocol runs on that file, cold start from the default model
(runs/speedrun/sft/model), the file's held-out split as the evaluation set, all its problems as "hard".
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.data.sources import task_problems  # noqa: E402
from nanoseek.engine import LLM  # noqa: E402
from nanoseek.eval import evaluate  # noqa: E402
from nanoseek.train.grpo import run_grpo  # noqa: E402
from nanoseek.train.recipe import load_recipe, run_dir  # noqa: E402
from nanoseek.train.stages import run_stage  # noqa: E402


def score(model_dir: Path, problems, seed: int) -> dict:
    llm = LLM(model_dir, dtype="bfloat16", kv_cache_memory="512MiB", max_num_seqs=256)
    greedy = evaluate(llm, problems, n=1, temperature=0.0, max_tokens=320)
    sampled = evaluate(llm, problems, n=8, temperature=1.0, max_tokens=320, seed=seed, ks=[1, 8])
    return {"pass@1": greedy["overall"]["pass@1"], "pass@1_ci95": greedy["overall"]["pass@1_ci95"],
            "pass@8": sampled["overall"].get("pass@8"), "pass@8_ci95": sampled["overall"].get("pass@8_ci95"),
            "levels": {k: v["pass@1"] for k, v in greedy["levels"].items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "r1_effect.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arm-seconds", type=int, default=480)
    ap.add_argument("--eval-problems", type=int, default=500)
    ap.add_argument("--task", default=None, help="JSONL task file (answers only)")
    ap.add_argument("--candidates", default="3,4,5")
    ap.add_argument("--cold-start", default=None,
                    help="reuse this SFT checkpoint (trained on worked solutions of the recipe's levels only) as the "
                         "cold start of every seed instead of training one per seed, e.g. runs/speedrun/sft/model "
                         "with --recipe recipes/speedrun_cpu.toml --candidates 4,5,6")
    args = ap.parse_args()
    t0 = time.time()
    rows, hard = [], None
    for seed in args.seeds:
        base = [f"run.seed={seed}", f"run.name=r1_effect_s{seed}"]
        recipe = load_recipe(args.recipe, base)
        out = run_dir(recipe)
        if args.task:
            cold = Path(args.cold_start or ROOT / "runs" / "speedrun" / "sft" / "model")
            task = args.task
            hard_levels = []
        else:
            if args.cold_start:  # an existing SFT checkpoint trained on the recipe's (easy) levels only
                cold = Path(args.cold_start)
                out.mkdir(parents=True, exist_ok=True)
            else:
                run_stage(recipe, "pretrain", show_progress=False)
                run_stage(recipe, "sft", show_progress=False)
                cold = out / "sft" / "model"
            task = recipe["data"].get("task", "arithmetic")
            if hard is None:  # decided once, from the first seed's cold start
                candidates = [int(x) for x in args.candidates.split(",")]
                llm = LLM(cold, dtype="bfloat16", kv_cache_memory="512MiB", max_num_seqs=256)
                probe = evaluate(llm, task_problems(task, candidates, 100 * len(candidates), 99, "test"), n=8,
                                 temperature=1.0, max_tokens=320, ks=[1, 8])
                hard = [int(k) for k, v in probe["levels"].items() if 0.10 <= v.get("pass@8", 0) <= 0.60]
                (out / "hard_levels.json").write_text(json.dumps({"probe": probe["levels"], "hard": hard}, indent=2))
                if not hard:
                    print(json.dumps({"bench": "r1_effect", "error": "no candidate level has pass@8 in [10%, 60%]",
                                      "probe": {k: v.get("pass@8") for k, v in probe["levels"].items()}}))
                    return
            hard_levels = hard
        eval_set = task_problems(task, hard_levels, args.eval_problems, seed, "test")
        tokenizer = cold.parent.parent / "tokenizer"  # every arm keeps the cold start's tokenizer
        base = base + [f'tokenizer.path="{tokenizer}"']
        result = {"seed": seed, "hard_levels": hard_levels, "before": score(cold, eval_set, seed)}
        arms = {
            "grpo": [f"grpo.init_from={cold}", f"grpo.max_seconds={args.arm_seconds}", "grpo.steps=100000",
                     f"grpo.levels={hard_levels or []}", f"data.grpo_levels={hard_levels}", f"data.task=\"{task}\""],
            "sft_easy": [f"sft.init_from={cold}", f"sft.max_seconds={args.arm_seconds}", "sft.steps=100000",
                         "sft.warmup_steps=0", "run.name=" + f"r1_effect_s{seed}_sft_easy"],
            "sft_qa": [f"sft.init_from={cold}", f"sft.max_seconds={args.arm_seconds}", "sft.steps=100000",
                       "sft.warmup_steps=0", "sft.with_reasoning=false", f"data.sft_levels={hard_levels}",
                       f"data.task=\"{task}\"", "run.name=" + f"r1_effect_s{seed}_sft_qa"],
        }
        for arm, overrides in arms.items():
            r = load_recipe(args.recipe, base + overrides)
            if arm == "grpo":
                path = run_grpo(r, show_progress=False)
            else:
                path = run_stage(r, "sft", show_progress=False)
            result[arm] = score(path, eval_set, seed)
        rows.append(result)
        (out / "r1_effect.json").write_text(json.dumps(result, indent=2))

    def mean(arm, key):
        vals = [r[arm][key] for r in rows if r[arm].get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    table = {arm: {"pass@1": mean(arm, "pass@1"), "pass@8": mean(arm, "pass@8")}
             for arm in ("before", "grpo", "sft_easy", "sft_qa")}
    best_control = max(table["sft_easy"]["pass@1"], table["sft_qa"]["pass@1"])
    print(json.dumps({"bench": "r1_effect", "task": args.task or "arithmetic", "seeds": args.seeds,
                      "hard_levels": rows[0]["hard_levels"] if rows else None, "arm_seconds": args.arm_seconds,
                      "table": table, "grpo_minus_best_control_pass@1": table["grpo"]["pass@1"] - best_control,
                      "per_seed": rows, "wall_minutes": round((time.time() - t0) / 60, 1)}))


if __name__ == "__main__":
    main()
