"""What every training stage shares before and after its own work: the run context.

`RunContext.open(recipe, stage)` validates the stage's config, picks the device (one GPU per rank under
torchrun) and joins the process group, seeds, makes sure the run's tokenizer exists (rank 0 trains it, the others
wait), and clears the stage's output unless it resumes; it closes the process group however the stage ends.
The context then hands every stage the same pieces: its typed config, the tokenizer, the held-out evaluator, the
checkpoint a stage starts from, and `fit`, which runs the trainer, plots its metrics and completes its summary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import ConfigError
from ..tokenizer import Tokenizer, load_tokenizer
from .config import TrainConfig
from .corpus import prepare_tokenizer, tokenizer_dir
from .distributed import Distributed
from .recipe import run_dir, stage_config

Evaluator = Callable[[object, dict], dict]  # (model config, full state dict) -> flat metrics


@dataclass
class RunContext:
    recipe: dict
    stage: str
    cfg: TrainConfig
    device: torch.device
    dist: Distributed
    tokenizer_dir: Path
    show_progress: bool = True

    @classmethod
    @contextlib.contextmanager
    def open(cls, recipe: dict, stage: str, *, resume: bool = False, show_progress: bool = True,
             device: str | None = None, tokenizer: Path | None = None, clear: bool = True) -> Iterator["RunContext"]:
        """device: the recipe's run.device, else CUDA when present; tokenizer: a directory to use instead of
        the run's own (trained on first use); clear: remove the stage's previous output unless resuming."""
        cfg = stage_config(recipe, stage)
        device = torch.device(device or recipe.get("run", {}).get("device")
                              or ("cuda" if torch.cuda.is_available() else "cpu"))
        dist = Distributed.from_env(device.type)
        try:
            if device.type == "cuda":
                device = torch.device("cuda", dist.local_rank)
                torch.cuda.set_device(device)
            torch.manual_seed(recipe["run"]["seed"])
            if tokenizer is None:
                if dist.is_main:
                    prepare_tokenizer(recipe)
                dist.barrier()
                tokenizer = tokenizer_dir(recipe)
            run = cls(recipe, stage, cfg, device, dist, Path(tokenizer), show_progress)
            if clear and not resume and run.out_dir.exists() and dist.is_main:
                shutil.rmtree(run.out_dir)
            dist.barrier()
            yield run
        finally:
            dist.close()

    @property
    def seed(self) -> int:
        return self.recipe["run"]["seed"]

    @property
    def run_dir(self) -> Path:
        return run_dir(self.recipe)

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.stage

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_dir)

    def on_main(self, work: Callable[[], object]) -> None:
        """`work` on rank 0 while the other ranks wait for it (files every rank then reads)."""
        if self.dist.is_main:
            work()
        self.dist.barrier()

    def init_path(self, name: str) -> Path | None:
        """The model a stage starts from: a stage of this run (its final model) or a checkpoint directory."""
        return resolve_init(self.recipe, name)

    def evaluator(self, levels: list | None = None) -> Evaluator | None:
        """Held-out task accuracy through an in-process engine, run by the trainer at its evaluation points;
        None when the recipe turns it off ([eval] during_training = false or problems = 0)."""
        ev = self.recipe.get("eval", {})
        data = self.recipe.get("data", {})
        count = ev.get("problems", 100)
        if not ev.get("during_training", True) or not count:
            return None
        from ..data.sources import task_problems

        levels = levels or ev.get("levels", data.get("levels", [1, 2, 3]))
        problems = task_problems(ev.get("task", data.get("task", "arithmetic")), levels, count, self.seed, "test")
        tokenizer_path = self.tokenizer_dir

        def evaluate_state(config, state: dict) -> dict:
            from ..eval import evaluate
            from .engines import EVAL_CACHE, inprocess_engine, model_copy

            llm = inprocess_engine(model_copy(config, state), load_tokenizer(tokenizer_path),
                                   dtype=ev.get("dtype", "auto"), kv_cache_memory=ev.get("kv_cache_memory", EVAL_CACHE),
                                   max_num_seqs=ev.get("max_num_seqs", 128))
            result = evaluate(llm, problems, max_tokens=ev.get("max_tokens", 256))
            out = {"task_pass@1": result["overall"]["pass@1"]}
            out.update({f"task_pass@1_level{k}": v["pass@1"] for k, v in result["levels"].items()})
            out["sample"] = result["samples"][0] if result["samples"] else None
            return out

        return evaluate_state

    def fit(self, trainer, *, resume: bool = False, **summary) -> Path:
        """Runs the stage's trainer, then `finish` with its training wall time (setup not counted)."""
        start = time.time()
        path = trainer.fit(resume=resume)
        self.finish(trainer.out_dir, wall_seconds=time.time() - start, **summary)
        return path

    def finish(self, out_dir: Path, **summary) -> None:
        """Rank 0: the stage's plots, and its summary.json completed with the world size and `summary`; every
        rank waits for it."""
        out_dir = Path(out_dir)
        if self.dist.is_main:
            from .metrics import plot_grpo, plot_metrics

            plot_metrics(out_dir / "metrics.jsonl", out_dir, title=self.stage)
            if self.stage == "grpo":
                plot_grpo(out_dir / "metrics.jsonl", out_dir)
            path = out_dir / "summary.json"
            record = json.loads(path.read_text()) if path.exists() else {}
            record.update({"world_size": self.dist.world_size, **summary})
            path.write_text(json.dumps(record, indent=2) + "\n")
        self.dist.barrier()


def resolve_init(recipe: dict, init_from: str) -> Path | None:
    if not init_from:
        return None
    path = run_dir(recipe) / init_from / "model"
    if path.exists():
        return path
    if Path(init_from).exists():
        return Path(init_from)
    raise ConfigError(f"init_from {init_from!r}: neither {path} nor a checkpoint directory: run that stage first")
