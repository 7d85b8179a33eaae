"""Muon vs AdamW on the speedrun task at equal wall time: the speedrun recipe's pretraining stage (its model,
tokenizer, data and schedule), once with AdamW and once with `optimizer = "muon"` (torch's Muon for the hidden
matrices, AdamW for the rest: nanoseek/train/optim.py), each given the same seconds of training. Each optimizer's
step time is measured first on a few steps, so that both runs finish their whole schedule (warmup, stable,
decay) inside the budget instead of being cut off mid-schedule; a run whose training time misses the budget by more
than 7% (its median speed x steps) is run again with its own speed.

    python bench/muon.py [--recipe recipes/speedrun_cpu.toml] [--seconds 300]

Reports the validation loss (nats/token, the recipe's held-out problems) each reaches and the steps and training
seconds it took (the stage's wall time, its final evaluation included); one JSON line last, with the CPU class and
dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

import torch  # noqa: E402

from nanoseek.runtime import training_autocast  # noqa: E402
from nanoseek.train.recipe import load_recipe  # noqa: E402
from nanoseek.train.stages import run_stage  # noqa: E402

CALIBRATION_STEPS = 20


def pretrain(recipe_path: str, out: Path, name: str, optimizer: str, steps: int, extra: list[str]) -> dict:
    overrides = [f"run.name={name}", f"run.out_dir={out}", "run.minutes=0", f"train.optimizer={optimizer}",
                 f"pretrain.steps={steps}", f"pretrain.warmup_steps={max(1, min(50, steps // 10))}",
                 "train.save_every=0", "train.log_every=1", "eval.during_training=false", *extra]
    path = run_stage(load_recipe(recipe_path, overrides), "pretrain", show_progress=False)
    summary = json.loads((path.parent / "summary.json").read_text())
    rates = [json.loads(line).get("tok_s") for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r]
    return {"steps": summary["steps"], "seconds": round(summary["wall_seconds"], 1),
            "val_loss": round(summary["val_loss"], 4), "tokens": summary["tokens"],
            "tokens_per_second": round(statistics.median(rates[len(rates) // 2:]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/speedrun_cpu.toml")
    parser.add_argument("--seconds", type=float, default=300.0, help="training seconds per optimizer")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in ("adamw", "muon"):
            probe = pretrain(args.recipe, Path(tmp), f"{optimizer}_probe", optimizer, CALIBRATION_STEPS,
                             args.overrides)
            # Steady-state speed (the probe's later steps), not its wall time, which setup and evaluation dominate.
            rate = probe["tokens_per_second"]
            for attempt in range(3):
                steps = max(CALIBRATION_STEPS, int(args.seconds * rate / (probe["tokens"] / probe["steps"])))
                result = pretrain(args.recipe, Path(tmp), f"{optimizer}{attempt}", optimizer, steps, args.overrides)
                result["training_seconds"] = round(result["tokens"] / result["tokens_per_second"], 1)
                print(json.dumps({optimizer: result}), flush=True)
                if abs(result["training_seconds"] / args.seconds - 1) < 0.07:
                    break
                rate = result["tokens_per_second"]  # a short probe misjudged the speed: again, at the run's own
            results[optimizer] = result
    compute, _ = training_autocast(recipe["train"].get("dtype", "auto"), torch.device("cpu"))
    emit({"bench": "muon_vs_adamw", "task": "speedrun pretraining (held-out val loss)",
          "model_type": recipe["model"].get("model_type"), "dtype": str(compute or torch.float32),
          "seconds_each": args.seconds, "adamw": results["adamw"], "muon": results["muon"],
          "val_loss_muon_minus_adamw": round(results["muon"]["val_loss"] - results["adamw"]["val_loss"], 4)})


if __name__ == "__main__":
    main()
