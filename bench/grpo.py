"""Seconds per GRPO step: nanoseek's GRPOTrainer vs TRL's GRPOTrainer (pinned: `pip install trl==1.16.0`).

    python bench/grpo.py [--prompts 8] [--group 8] [--completion 128] [--steps 3]

Same model (the speedrun's DeepSeek-V3-architecture config, exported to HF format and loaded by transformers
for TRL), same tokenizer and chat template, same prompts, group size, completion length (every completion runs
to the limit: nanoseek `ignore_eos`, TRL `min_new_tokens`), one optimizer step per rollout batch (mu = 1,
TRL's num_iterations = 1), no KL reference, DAPO token-level loss, truncated completions kept in the loss,
the same deterministic reward function, the updates in the dtype the policy picks for this CPU (bf16 autocast
over fp32 weights where bf16 is native, float32 elsewhere: TRL's bf16 default is the emulated slow path on
such CPUs), 2 threads.
Each side runs one warm-up step, then `--steps` timed steps; the speedup compares the median step of each side
(this host's speed drifts by +-15% from one few-second stretch to the next; the means are reported too).
Both run in one process, so with the same CPU runtime settings (nanoseek/runtime.py). Prints one JSON line
last, with the ISA level and dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tomllib
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from nanoseek import runtime  # noqa: E402
from nanoseek.checkpoint import save_model  # noqa: E402
from nanoseek.data.sources import chat_prompt, doc_text, task_problems  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.train.grpo import GRPOTrainer  # noqa: E402
from nanoseek.train.recipe import stage_config  # noqa: E402
from nanoseek.train.rollouts import ProblemSampler  # noqa: E402
from nanoseek.train.rewards import Reward  # noqa: E402
from nanoseek.train.stages import model_config  # noqa: E402

TRL_VERSION = "1.16.0"


def parity_reward(prompt, completion, reference, meta) -> float:
    """Deterministic, content-dependent and about half ones: non-zero advantages on an untrained model."""
    return float(zlib.crc32(completion.encode()) % 2)


def build_checkpoint(directory: Path) -> tuple[Path, list]:
    recipe = tomllib.loads((ROOT / "recipes" / "speedrun_cpu.toml").read_text())
    problems = task_problems("arithmetic", [1, 2, 3], 2000, 0, "train")
    tokenizer = train_tokenizer([doc_text(p) for p in problems], recipe["tokenizer"]["vocab_size"], directory / "tok")
    config = model_config(recipe.get("model", {}), tokenizer)
    config.num_nextn_predict_layers = 0  # transformers' DeepseekV3ForCausalLM has no MTP; GRPO does not use it
    model = Transformer(config)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    save_model(model, directory / "model", tokenizer_from=directory / "tok")
    return directory / "model", problems


def run_nanoseek(model_dir: Path, problems, args) -> dict:
    from nanoseek.checkpoint import load_model

    recipe = {"train": {"dtype": "auto", "lr": 1e-5, "warmup_steps": 0, "schedule": "constant",
                        "log_every": 10 ** 6, "mtp_lambda": 0.0, "seq_aux_alpha": 0.0, "bias_update_gamma": 0.0},
              "grpo": {"prompts_per_step": args.prompts, "group_size": args.group,
                       "max_completion_tokens": args.completion, "ignore_eos": True, "mu": 1, "beta": 0.0,
                       "loss_type": "dapo", "dynamic_sampling": False, "mask_truncated": False,
                       "micro_batch_size": args.micro, "steps": args.steps + 1}}
    cfg = stage_config(recipe, "grpo")
    model = load_model(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(model, cfg, ProblemSampler(problems, 0), Path(out), tokenizer_dir=model_dir,
                              show_progress=False)
        trainer.rewards = [Reward("parity", parity_reward, 1.0)]
        times, records = [], []
        for _ in range(args.steps + 1):
            t = time.perf_counter()
            records.append(trainer.train_step())
            times.append(time.perf_counter() - t)
    timed = times[1:]
    lengths = [r["completion_length_mean"] for r in records[1:]]
    return {**_step_stats(timed), "completion_length_mean": sum(lengths) / len(lengths),
            "rollout_tok_s": sum(r["rollout_tok_s"] for r in records[1:]) / len(timed)}


def _step_stats(times: list[float]) -> dict:
    return {"seconds_per_step": statistics.median(times), "mean_seconds_per_step": sum(times) / len(times),
            "step_seconds": [round(t, 3) for t in times]}


def run_trl(model_dir: Path, problems, args) -> dict:
    import transformers
    import trl
    from datasets import Dataset

    if trl.__version__ != TRL_VERSION:
        print(f"warning: TRL {trl.__version__} installed, the benchmark pins {TRL_VERSION}", file=sys.stderr)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_prompts = args.prompts * (args.steps + 1)
    dataset = Dataset.from_list([{"prompt": chat_prompt(p), "answer": p.answer} for p in problems[:n_prompts]])

    def reward(prompts, completions, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [parity_reward(None, t, None, None) for t in texts]

    step_times: list[float] = []
    lengths: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    batch = args.prompts * args.group
    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, use_cpu=True, bf16=bf16_native(), report_to="none", save_strategy="no", logging_steps=1,
            per_device_train_batch_size=args.micro, gradient_accumulation_steps=batch // args.micro,
            num_generations=args.group, max_completion_length=args.completion, num_iterations=1, beta=0.0,
            loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=False, learning_rate=1e-5,
            lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps + 1, temperature=1.0,
            generation_kwargs={"min_new_tokens": args.completion}, shuffle_dataset=False, seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    timed = step_times[1:]
    return {**_step_stats(timed),
            "completion_length_mean": sum(lengths[1:]) / max(len(lengths[1:]), 1), "trl_version": trl.__version__}


def bf16_native() -> bool:
    return runtime.training_autocast("auto", torch.device("cpu"))[0] is not None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, problems = build_checkpoint(Path(tmp))
        ours = run_nanoseek(model_dir, problems, args)
        print("nanoseek", ours, flush=True)
        theirs = run_trl(model_dir, problems, args)
        print("trl", theirs, flush=True)
    emit({"bench": "grpo", "prompts": args.prompts, "group": args.group, "completion_tokens": args.completion,
          "steps": args.steps, "nanoseek_s_per_step": round(ours["seconds_per_step"], 2),
          "trl_s_per_step": round(theirs["seconds_per_step"], 2),
          "speedup": round(theirs["seconds_per_step"] / ours["seconds_per_step"], 2),
          "nanoseek_mean_s_per_step": round(ours["mean_seconds_per_step"], 2),
          "trl_mean_s_per_step": round(theirs["mean_seconds_per_step"], 2),
          "speedup_of_means": round(theirs["mean_seconds_per_step"] / ours["mean_seconds_per_step"], 2),
          "nanoseek_completion_len": ours["completion_length_mean"],
          "trl_completion_len": theirs["completion_length_mean"], "trl_version": theirs["trl_version"],
          "dtype": "bf16 autocast" if bf16_native() else "float32", "target_speedup": 3.0})


if __name__ == "__main__":
    main()
