"""Running a recipe's stages: tokenizer -> pretrain -> sft (GRPO and distillation live in their own modules).

Layout of a run (`runs/<name>/`): tokenizer/, data/<stage>/{train,val}/ (token shards), <stage>/ (metrics.jsonl,
plots, checkpoints/step_N/, model/ = the stage's final HF checkpoint, summary.json), eval_*.json, report.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data import shards
from ..data.sources import doc_text, file_chats, file_documents, is_task_file, sft_example, task_problems
from ..errors import ConfigError
from ..model.transformer import Transformer
from ..presets import load_preset
from ..runtime import fast_precision
from ..tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .distributed import Distributed
from .recipe import run_dir, stage_config

PRETRAIN_SPLIT_SEED = 0


# ------------------------------------------------------------------ tokenizer
def tokenizer_dir(recipe: dict) -> Path:
    path = recipe.get("tokenizer", {}).get("path")
    return Path(path) if path else run_dir(recipe) / "tokenizer"


def _tokenizer_corpus(recipe: dict, limit: int, max_chars: int) -> list[str]:
    """A bounded sample to train the tokenizer on: task documents, then the start of each file (at most `limit`
    documents and `max_chars` characters per file), so a corpus larger than memory costs only its sample."""
    data = recipe.get("data", {})
    texts = []
    task = data.get("task", "arithmetic")
    problems = task_problems(task, data.get("levels", [1, 2, 3]), min(limit, data.get("train_problems", limit)),
                             recipe["run"]["seed"], "train")
    for p in problems:
        texts.append(doc_text(p))
        texts.append(p.question + "\n" + sft_example(p)[1])
    for f in data.get("files", []):
        taken = 0
        for doc in itertools.islice(file_documents(f), limit):
            texts.append(doc)
            taken += len(doc)
            if taken >= max_chars:
                break
    return texts


def prepare_tokenizer(recipe: dict) -> Path:
    """Trains the run's BPE tokenizer on its corpus unless one exists (or `tokenizer.path` names one)."""
    directory = tokenizer_dir(recipe)
    if (directory / "tokenizer.json").exists():
        return directory
    cfg = recipe.get("tokenizer", {})
    texts = _tokenizer_corpus(recipe, cfg.get("train_docs", 20000), cfg.get("train_chars", 64 << 20))
    tok = train_tokenizer(texts, cfg.get("vocab_size", 512), directory)
    sample = texts[: 2000]
    n_bytes = sum(len(t.encode()) for t in sample)
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in sample)
    stats = {"vocab_size": tok.vocab_size, "bytes_per_token": n_bytes / max(n_tokens, 1), "docs": len(texts)}
    (directory / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return directory


# ------------------------------------------------------------------ data
def _data_spec(recipe: dict, stage: str, cfg: dict) -> dict:
    data = recipe.get("data", {})
    levels_key = f"{stage}_levels"
    return {"stage": stage, "task": data.get("task", "arithmetic"), "levels": data.get(levels_key, data.get("levels")),
            "train_problems": data.get(f"{stage}_problems", data.get("train_problems", 20000)),
            "val_problems": data.get("val_problems", 200), "files": data.get("files", []),
            "seed": recipe["run"]["seed"], "with_reasoning": cfg.get("with_reasoning", True),
            "tokenizer": str(tokenizer_dir(recipe))}


def prepare_data(recipe: dict, stage: str, tokenizer: Tokenizer, cfg: dict) -> tuple[Path, Path]:
    """Tokenized train/val shards for the stage, rebuilt only when the data spec changes."""
    spec = _data_spec(recipe, stage, cfg)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    base = run_dir(recipe) / "data" / stage
    train, val = base / "train", base / "val"
    if (base / "spec.json").exists() and json.loads((base / "spec.json").read_text()).get("digest") == digest:
        return train, val
    levels = spec["levels"] or [1, 2, 3]
    problems = task_problems(spec["task"], levels, spec["train_problems"], spec["seed"], "train") \
        if spec["train_problems"] else []
    held_out = task_problems(spec["task"], levels, spec["val_problems"], spec["seed"], "test")
    # Streams, never lists: a corpus larger than memory goes to the shards a bounded batch at a time.
    if stage == "pretrain":
        texts = itertools.chain((doc_text(p) for p in problems), *(file_documents(f) for f in spec["files"]))
        shards.write_documents(train, tokenizer, texts)
        shards.write_documents(val, tokenizer, [doc_text(p) for p in held_out])
    else:
        examples = itertools.chain(
            (sft_example(p, spec["with_reasoning"]) for p in problems),
            *(file_chats(f) if not is_task_file(f) else
              (sft_example(p, spec["with_reasoning"]) for p in task_problems(f, [], 0, 0, "train"))
              for f in spec["files"]))
        shards.write_chats(train, tokenizer, examples)
        shards.write_chats(val, tokenizer, [sft_example(p, spec["with_reasoning"]) for p in held_out])
    (base / "spec.json").write_text(json.dumps({"digest": digest, **spec}, indent=2) + "\n")
    return train, val


# ------------------------------------------------------------------ model
def model_config(recipe: dict, tokenizer: Tokenizer) -> ModelConfig:
    spec = dict(recipe.get("model", {}))
    spec.pop("init_std", None)
    preset = spec.pop("preset", None)
    base = load_preset(preset).to_hf_dict() if preset else {}
    hf = {**base, **spec}
    hf.setdefault("model_type", "deepseek_v3")
    vocab = tokenizer.vocab_size
    hf["vocab_size"] = max(hf.get("vocab_size", 0), -(-vocab // 32) * 32)
    hf["bos_token_id"], hf["eos_token_id"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    hf["pad_token_id"] = tokenizer.token_to_id(tokenizer.pad_token) if tokenizer.pad_token else None
    return ModelConfig.from_hf_dict(hf)


def resolve_init(recipe: dict, init_from: str) -> Path | None:
    if not init_from:
        return None
    path = run_dir(recipe) / init_from / "model"
    if path.exists():
        return path
    if Path(init_from).exists():
        return Path(init_from)
    raise ConfigError(f"init_from {init_from!r}: neither {path} nor a checkpoint directory: run that stage first")


def build_model(recipe: dict, cfg: dict, tokenizer: Tokenizer, device: torch.device) -> Transformer:
    from ..checkpoint import load_model

    source = resolve_init(recipe, cfg["init_from"])
    if source is not None:
        return load_model(source, device=device, dtype=torch.float32)
    config = model_config(recipe, tokenizer)
    generator = torch.Generator().manual_seed(recipe["run"]["seed"])
    model = Transformer(config)
    model.init_weights(std=recipe.get("model", {}).get("init_std", 0.02), generator=generator)
    return model.to(device)


# ------------------------------------------------------------------ evaluation during training
def make_evaluator(recipe: dict, tok_dir: Path):
    """A callable(model) -> flat metrics dict: held-out task accuracy through the engine."""
    ev = recipe.get("eval", {})
    data = recipe.get("data", {})
    task = ev.get("task", data.get("task", "arithmetic"))
    levels = ev.get("levels", data.get("levels", [1, 2, 3]))
    count = ev.get("problems", 100)
    if not count:
        return None
    problems = task_problems(task, levels, count, recipe["run"]["seed"], "test")

    def evaluator(config, state: dict) -> dict:
        from ..engine import LLM
        from ..eval import evaluate

        copy_ = Transformer(config)
        copy_.load_state_dict(state)
        precision = fast_precision(ev.get("dtype", "auto"), torch.device("cpu"))
        copy_ = copy_.set_precision(precision.weights, precision.compute).eval()
        llm = LLM(copy_, tokenizer=load_tokenizer(tok_dir), kv_cache_memory=ev.get("kv_cache_memory", "256MiB"),
                  max_num_seqs=ev.get("max_num_seqs", 128))
        result = evaluate(llm, problems, max_tokens=ev.get("max_tokens", 256))
        out = {"task_pass@1": result["overall"]["pass@1"]}
        out.update({f"task_pass@1_level{k}": v["pass@1"] for k, v in result["levels"].items()})
        out["sample"] = result["samples"][0] if result["samples"] else None
        return out

    return evaluator


# ------------------------------------------------------------------ a stage
def run_stage(recipe: dict, stage: str, resume: bool = False, show_progress: bool = True) -> Path:
    from .metrics import plot_metrics
    from .trainer import Trainer

    cfg = stage_config(recipe, stage)
    if stage not in ("pretrain", "sft"):
        raise ConfigError(f"`train {stage}` has its own command; this runs pretrain and sft")
    device = torch.device(recipe.get("run", {}).get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    dist = Distributed.from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(recipe["run"]["seed"])
    if dist.is_main:
        prepare_tokenizer(recipe)
    dist.barrier()
    tok_dir = tokenizer_dir(recipe)
    tokenizer = load_tokenizer(tok_dir)
    if dist.is_main:
        prepare_data(recipe, stage, tokenizer, cfg)
    dist.barrier()
    train_dir, val_dir = prepare_data(recipe, stage, tokenizer, cfg) if not dist.is_main else \
        (run_dir(recipe) / "data" / stage / "train", run_dir(recipe) / "data" / stage / "val")
    seed = recipe["run"]["seed"]
    train = shards.PackedLoader(train_dir, cfg["seq_len"], seed=seed)
    val = shards.PackedLoader(val_dir, cfg["seq_len"], seed=seed)
    if cfg["batch_size"] % (cfg["micro_batch_size"] * dist.world_size):
        raise ConfigError(f"batch_size {cfg['batch_size']} must split into micro-batches of "
                          f"{cfg['micro_batch_size']} on each of {dist.world_size} processes")
    model = build_model(recipe, cfg, tokenizer, device)
    out_dir = run_dir(recipe) / stage
    if not resume and out_dir.exists() and dist.is_main:
        import shutil

        shutil.rmtree(out_dir)
    dist.barrier()
    evaluator = make_evaluator(recipe, tok_dir) if recipe.get("eval", {}).get("during_training", True) else None
    trainer = Trainer(model, cfg, train, out_dir, stage=stage, val_loader=val, evaluator=evaluator,
                      tokenizer_dir=tok_dir, dist=dist, seed=seed, show_progress=show_progress)
    start = time.time()
    path = trainer.fit(resume=resume)
    if dist.is_main:
        plot_metrics(out_dir / "metrics.jsonl", out_dir, title=stage)
        summary = json.loads((out_dir / "summary.json").read_text())
        summary["wall_seconds"] = time.time() - start
        summary["train_tokens_meta"] = train.meta["total_tokens"]
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    dist.close()
    return path
