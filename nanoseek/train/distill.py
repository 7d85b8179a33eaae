"""Rejection sampling and distillation (the R1 recipe's last step).

The teacher (a local nanoseek model directory, or any OpenAI-compatible endpoint URL) writes K reasoning traces per
training problem (or they come recorded, from a JSONL file); the task's verifier keeps the correct ones (rejection sampling); a student (an existing
checkpoint, or a fresh model from a config: possibly dense and much smaller) is trained on them by SFT with the
shared trainer. Teacher and student are then evaluated side by side on held-out problems.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import shards
from ..data.sources import chat_prompt, task_problems
from ..data.tasks import Problem
from ..data.verify import verify
from ..endpoint import Endpoint, is_endpoint
from ..engine.text import THINK_CLOSE
from ..errors import ConfigError
from ..runtime import fast_precision
from .distributed import Distributed
from .recipe import STAGE_EXTRA_KEYS, run_dir, stage_config

# keep: "correct" is rejection sampling (the verifier keeps correct traces only); "all" is plain sequence-level
# distillation of every non-empty trace (tasks without a usable verifier).
DISTILL_DEFAULTS = {"k": 4, "temperature": 0.8, "problems": 2000, "max_tokens": 256, "levels": None,
                    "student": "", "teacher": "", "eval_problems": 500, "with_reasoning": True, "keep": "correct"}
STAGE_EXTRA_KEYS["distill"] = set(DISTILL_DEFAULTS)


def _engine_dtype():
    """The teacher's and the evaluations' engines (runtime.fast_precision)."""
    return fast_precision("auto", torch.device("cpu"))


def teacher_traces(teacher: str, problems: list[Problem], k: int, temperature: float, max_tokens: int,
                   tokenizer=None) -> list[tuple[list[dict], str, bool]]:
    """(messages, completion after the opened <think>, correct) for K samples of every problem, from a local
    model directory or an OpenAI-compatible endpoint. A trace counts as correct only if the teacher finished
    it (a cut-off trace teaches the student to stop mid-thought)."""
    prompts = [chat_prompt(p) for p in problems]
    if is_endpoint(teacher):
        samples = Endpoint(teacher).chat(prompts, n=k, temperature=temperature, max_tokens=max_tokens, seed=0)
    else:
        from ..engine import LLM, SamplingParams

        llm = LLM(teacher, dtype=_engine_dtype(), kv_cache_memory="512MiB", max_num_seqs=256)
        results = llm.generate(prompts, SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=0))
        samples = [[(o.text, o.finish_reason == "stop") for o in r.outputs] for r in results]
    return [(prompt, text, done and verify(text, p.answer, p.verifier, p.question))
            for p, prompt, choices in zip(problems, prompts, samples) for text, done in choices]


def recorded_traces(path: Path, verifier: str) -> list[tuple[list[dict], str, bool]]:
    """Traces written earlier by any teacher (a dump of API answers, another run): one JSON object per line,
    {"question", "answer", "completion"[, "verifier"]}, the completion being the text after the opened <think>.
    The verifier judges each against its answer, as it judges a live teacher's."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            question, answer, completion = r["question"], str(r["answer"]), r["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"teacher traces {path} line {n}: need a JSON object with question, answer and "
                              f"completion ({type(e).__name__}: {e})") from None
        check = r.get("verifier", verifier)
        out.append(([{"role": "user", "content": question}], completion,
                    verify(completion, answer, check, question)))
    return out


def build_student(student: str, tokenizer, recipe: dict, device):
    """A checkpoint directory, a config.json, or "recipe": a fresh model from the recipe's [student] section."""
    from ..checkpoint import load_model
    from ..config import ModelConfig
    from ..model.transformer import Transformer

    path = Path(student) if student else None
    if path is not None and path.is_dir() and (path / "config.json").exists():
        return load_model(path, device=device)
    if path is not None and path.suffix == ".json" and path.exists():
        hf = json.loads(path.read_text())
    elif "student" in recipe:
        hf = dict(recipe["student"])
    else:
        raise ConfigError(f"student {student!r}: give a checkpoint directory, a config.json, or a [student] recipe "
                          "section")
    hf.pop("init_std", None)
    hf["vocab_size"] = max(hf.get("vocab_size", 0), -(-tokenizer.vocab_size // 32) * 32)
    hf["bos_token_id"], hf["eos_token_id"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = ModelConfig.from_hf_dict(hf)
    model = Transformer(config)
    model.init_weights(std=recipe.get("student", {}).get("init_std", 0.02),
                       generator=torch.Generator().manual_seed(recipe["run"]["seed"]))
    return model.to(device)


def run_distill(recipe: dict, teacher: str | None = None, student: str | None = None, task: str | None = None,
                show_progress: bool = True) -> dict:
    from .stages import resolve_init

    cfg = {**DISTILL_DEFAULTS, **stage_config(recipe, "distill")}
    if cfg["keep"] not in ("correct", "all"):
        raise ConfigError(f"distill.keep {cfg['keep']!r}: use correct (rejection sampling) or all")
    teacher = teacher or cfg["teacher"] or str(resolve_init(recipe, "grpo") or resolve_init(recipe, "sft"))
    student = student if student is not None else cfg["student"]
    data = recipe.get("data", {})
    task = task or data.get("task", "arithmetic")
    levels = cfg["levels"] or data.get("levels", [1, 2, 3])
    device = torch.device("cpu")
    dist = Distributed.from_env(device.type)
    try:
        return _distill(recipe, cfg, teacher, student, task, levels, device, dist, show_progress)
    finally:
        dist.close()


def _distill(recipe: dict, cfg: dict, teacher: str, student: str, task: str, levels, device, dist: Distributed,
             show_progress: bool) -> dict:
    """Under torchrun each rank asks the teacher about its share of the problems (every world_size-th), the
    traces are gathered to every rank in problem order, the student trains data-parallel (DDP or FSDP2, as
    `train.parallel` says), and rank 0 writes the data, evaluates and reports."""
    from ..engine import LLM
    from ..eval import evaluate
    from ..model.accounting import model_cost
    from ..tokenizer import load_tokenizer
    from .metrics import plot_metrics
    from .stages import tokenizer_dir
    from .trainer import Trainer

    out_dir = run_dir(recipe) / "distill"
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = teacher.endswith(".jsonl")
    if recorded and not Path(teacher).is_file():
        raise ConfigError(f"teacher traces {teacher} do not exist: give a JSONL file, a model directory or a URL")
    tok_dir = Path(teacher) if Path(teacher).is_dir() else tokenizer_dir(recipe)
    tokenizer = load_tokenizer(tok_dir)
    start = time.time()
    problems = task_problems(task, levels, cfg["problems"], recipe["run"]["seed"], "train")
    if recorded:
        traces = recorded_traces(Path(teacher), problems[0].verifier if problems else "numeric")
    else:
        mine = problems[dist.rank::dist.world_size]
        local = teacher_traces(teacher, mine, cfg["k"], cfg["temperature"], cfg["max_tokens"], tokenizer) \
            if mine else []
        shares = dist.all_gather_json(local)  # rank r holds problems r, r + world, ...: k traces each
        k, world = cfg["k"], dist.world_size
        traces = [tuple(t) for i in range(len(problems))
                  for t in shares[i % world][(i // world) * k:(i // world + 1) * k]]
    kept, seen = [], set()
    for messages, text, ok in traces:
        key = (messages[-1]["content"], text)
        if (ok or cfg["keep"] == "all") and text.strip() and key not in seen:
            seen.add(key)
            kept.append((messages, text))
    if not kept:
        raise ConfigError("rejection sampling kept no trace: the teacher solved none of the training problems")
    held_out = task_problems(task, levels, min(cfg["eval_problems"], 200), recipe["run"]["seed"], "test")
    if dist.is_main:
        with (out_dir / "traces.jsonl").open("w") as f:
            for messages, text in kept:
                f.write(json.dumps({"messages": messages + [{"role": "assistant", "content": text}]}) + "\n")
        shards.write_chats(out_dir / "data" / "train", tokenizer, kept)
        shards.write_chats(out_dir / "data" / "val", tokenizer, [
            (chat_prompt(p), f"{p.solution}\n{THINK_CLOSE}\n\nThe answer is {p.answer}.") for p in held_out])
    dist.barrier()
    model = build_student(student, tokenizer, recipe, device)
    loader = shards.PackedLoader(out_dir / "data" / "train", cfg["seq_len"], seed=recipe["run"]["seed"])
    val = shards.PackedLoader(out_dir / "data" / "val", cfg["seq_len"], seed=recipe["run"]["seed"])
    trainer = Trainer(model, cfg, loader, out_dir / "student", stage="distill", val_loader=val,
                      tokenizer_dir=tok_dir, dist=dist, seed=recipe["run"]["seed"], show_progress=show_progress)
    train_start = time.time()
    student_path = trainer.fit()
    if not dist.is_main:
        return {}
    student_summary = out_dir / "student" / "summary.json"  # the report's stage table reads its wall time
    stage = json.loads(student_summary.read_text())
    stage["wall_seconds"] = time.time() - train_start
    student_summary.write_text(json.dumps(stage, indent=2) + "\n")
    plot_metrics(out_dir / "student" / "metrics.jsonl", out_dir / "student", title="distill")
    eval_set = task_problems(task, levels, cfg["eval_problems"], recipe["run"]["seed"], "test")
    results = {}
    for name, source in (("teacher", teacher), ("student", str(student_path))):
        if recorded and name == "teacher":
            continue  # recorded traces: no model to ask
        if is_endpoint(source):  # a served teacher: accuracy through its API; its size is not ours to know
            results[name] = evaluate(Endpoint(source), eval_set, max_tokens=cfg["max_tokens"])
            continue
        llm = LLM(source, dtype=_engine_dtype(), kv_cache_memory="512MiB", max_num_seqs=256)
        results[name] = evaluate(llm, eval_set, max_tokens=cfg["max_tokens"])
        results[name]["active_params"] = model_cost(llm.engine.config).active_params
    # acceptance: the verifier's pass rate over all traces; kept: distinct accepted traces (a confident teacher
    # repeats itself, and 1-digit problems recur in the training stream).
    summary = {"traces": len(traces), "kept": len(kept),
               "acceptance": sum(ok for _, _, ok in traces) / max(len(traces), 1),
               "wall_seconds": time.time() - start, "task": task, "levels": levels,
               **{f"{k}_pass@1": v["overall"]["pass@1"] for k, v in results.items()},
               **{f"{k}_active_params": v["active_params"] for k, v in results.items() if "active_params" in v}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir(recipe) / "eval_distill.json").write_text(json.dumps({"task": task, **results}, indent=2))
    return summary
