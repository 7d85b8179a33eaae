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


from ..data import shards
from ..data.sources import chat_prompt, task_problems
from ..data.tasks import Problem
from ..data.verify import verify
from ..endpoint import Endpoint, is_endpoint
from ..engine.text import THINK_CLOSE
from ..errors import ConfigError
from .context import RunContext
from .corpus import tokenizer_dir
from .engines import inprocess_engine
from .recipe import run_dir, stage_config


def teacher_traces(teacher: str, problems: list[Problem], k: int, temperature: float, max_tokens: int,
                   tokenizer=None) -> list[tuple[list[dict], str, bool]]:
    """(messages, completion after the opened <think>, correct) for K samples of every problem, from a local
    model directory or an OpenAI-compatible endpoint. A trace counts as correct only if the teacher finished
    it (a cut-off trace teaches the student to stop mid-thought)."""
    prompts = [chat_prompt(p) for p in problems]
    if is_endpoint(teacher):
        samples = Endpoint(teacher).chat(prompts, n=k, temperature=temperature, max_tokens=max_tokens, seed=0)
    else:
        from ..engine import SamplingParams

        llm = inprocess_engine(teacher)
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


def build_student(student: str, run: RunContext):
    """A checkpoint directory, a config.json, or a fresh model from the recipe's [student] section."""
    from ..checkpoint import load_model
    from .stages import fresh_model

    path = Path(student) if student else None
    if path is not None and path.is_dir() and (path / "config.json").exists():
        return load_model(path, device=run.device)
    if path is not None and path.suffix == ".json" and path.exists():
        spec = json.loads(path.read_text())
    elif "student" in run.recipe:
        spec = dict(run.recipe["student"])
    else:
        raise ConfigError(f"student {student!r}: give a checkpoint directory, a config.json, or a [student] recipe "
                          "section")
    return fresh_model(spec, run.tokenizer, run.seed, run.device)


def default_teacher(recipe: dict) -> str:
    """The run's latest model: GRPO's, else SFT's."""
    for stage in ("grpo", "sft"):
        path = run_dir(recipe) / stage / "model"
        if (path / "config.json").exists():
            return str(path)
    raise ConfigError(f"no teacher: {run_dir(recipe)} has no grpo or sft model yet; run those stages or give "
                      "--teacher (a model directory, a URL or a JSONL file of traces)")


def run_distill(recipe: dict, teacher: str | None = None, student: str | None = None, task: str | None = None,
                show_progress: bool = True) -> dict:
    """Under torchrun each rank asks the teacher about its share of the problems (every world_size-th), the
    traces are gathered to every rank in problem order, the student trains data-parallel (DDP or FSDP2, as
    `train.parallel` says), and rank 0 writes the data, evaluates and reports."""
    cfg = stage_config(recipe, "distill")  # a bad setting is refused before the teacher is looked for
    teacher = teacher or cfg.teacher or default_teacher(recipe)
    recorded = teacher.endswith(".jsonl")
    if recorded and not Path(teacher).is_file():
        raise ConfigError(f"teacher traces {teacher} do not exist: give a JSONL file, a model directory or a URL")
    tok_dir = Path(teacher) if Path(teacher).is_dir() else tokenizer_dir(recipe)
    # The teacher's engine and the student share the CPU here (distillation is not placed on a GPU yet).
    with RunContext.open(recipe, "distill", device="cpu", tokenizer=tok_dir, clear=False,
                         show_progress=show_progress) as run:
        return _distill(run, teacher, student if student is not None else cfg.student, task)


def _distill(run: RunContext, teacher: str, student: str, task: str | None) -> dict:
    from ..eval import evaluate
    from ..model.accounting import model_cost
    from .trainer import Trainer

    cfg, dist, recipe = run.cfg, run.dist, run.recipe
    data = recipe.get("data", {})
    task = task or data.get("task", "arithmetic")
    levels = cfg.levels or data.get("levels", [1, 2, 3])
    out_dir = run.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = teacher.endswith(".jsonl")
    tokenizer = run.tokenizer
    start = time.time()
    problems = task_problems(task, levels, cfg.problems, run.seed, "train")
    if recorded:
        traces = recorded_traces(Path(teacher), problems[0].verifier if problems else "numeric")
    else:
        mine = problems[dist.rank::dist.world_size]
        local = teacher_traces(teacher, mine, cfg.k, cfg.temperature, cfg.max_tokens, tokenizer) if mine else []
        shares = dist.all_gather_json(local)  # rank r holds problems r, r + world, ...: k traces each
        k, world = cfg.k, dist.world_size
        traces = [tuple(t) for i in range(len(problems))
                  for t in shares[i % world][(i // world) * k:(i // world + 1) * k]]
    kept, seen = [], set()
    for messages, text, ok in traces:
        key = (messages[-1]["content"], text)
        if (ok or cfg.keep == "all") and text.strip() and key not in seen:
            seen.add(key)
            kept.append((messages, text))
    if not kept:
        raise ConfigError("rejection sampling kept no trace: the teacher solved none of the training problems")
    held_out = task_problems(task, levels, min(cfg.eval_problems, 200), run.seed, "test")

    def write_data():
        with (out_dir / "traces.jsonl").open("w") as f:
            for messages, text in kept:
                f.write(json.dumps({"messages": messages + [{"role": "assistant", "content": text}]}) + "\n")
        shards.write_chats(out_dir / "data" / "train", tokenizer, kept)
        shards.write_chats(out_dir / "data" / "val", tokenizer, [
            (chat_prompt(p), f"{p.solution}\n{THINK_CLOSE}\n\nThe answer is {p.answer}.") for p in held_out])

    run.on_main(write_data)
    model = build_student(student, run)
    loader = shards.PackedLoader(out_dir / "data" / "train", cfg.seq_len, seed=run.seed)
    val = shards.PackedLoader(out_dir / "data" / "val", cfg.seq_len, seed=run.seed)
    trainer = Trainer(model, cfg, loader, out_dir / "student", stage="distill", val_loader=val,
                      tokenizer_dir=run.tokenizer_dir, dist=dist, seed=run.seed, show_progress=run.show_progress)
    student_path = run.fit(trainer)  # the report's stage table reads the student's summary and wall time
    if not dist.is_main:
        return {}
    eval_set = task_problems(task, levels, cfg.eval_problems, run.seed, "test")
    results = {}
    for name, source in (("teacher", teacher), ("student", str(student_path))):
        if recorded and name == "teacher":
            continue  # recorded traces: no model to ask
        if is_endpoint(source):  # a served teacher: accuracy through its API; its size is not ours to know
            results[name] = evaluate(Endpoint(source), eval_set, max_tokens=cfg.max_tokens)
            continue
        llm = inprocess_engine(source)
        results[name] = evaluate(llm, eval_set, max_tokens=cfg.max_tokens)
        results[name]["active_params"] = model_cost(llm.engine.config).active_params
    # acceptance: the verifier's pass rate over all traces; kept: distinct accepted traces (a confident teacher
    # repeats itself, and 1-digit problems recur in the training stream).
    summary = {"traces": len(traces), "kept": len(kept),
               "acceptance": sum(ok for _, _, ok in traces) / max(len(traces), 1),
               "wall_seconds": time.time() - start, "task": task, "levels": levels,
               **{f"{k}_pass@1": v["overall"]["pass@1"] for k, v in results.items()},
               **{f"{k}_active_params": v["active_params"] for k, v in results.items() if "active_params" in v}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run.run_dir / "eval_distill.json").write_text(json.dumps({"task": task, **results}, indent=2))
    return summary
