"""A run's tokenizer and token shards: trained and tokenized once, rebuilt only when their spec changes.

The tokenizer trains on a bounded sample (the task's documents, then the start of each corpus file); the stage
data streams documents into memory-mapped shards a bounded batch at a time (data/shards.py), so a corpus larger
than memory costs only that batch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from ..data import shards
from ..data.sources import doc_text, file_chats, file_documents, is_task_file, sft_example, task_problems
from ..tokenizer import Tokenizer, train_tokenizer
from .config import TrainConfig
from .recipe import run_dir


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
    spec = recipe.get("tokenizer", {})
    texts = _tokenizer_corpus(recipe, spec.get("train_docs", 20000), spec.get("train_chars", 64 << 20))
    tok = train_tokenizer(texts, spec.get("vocab_size", 512), directory)
    sample = texts[: 2000]
    n_bytes = sum(len(t.encode()) for t in sample)
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in sample)
    stats = {"vocab_size": tok.vocab_size, "bytes_per_token": n_bytes / max(n_tokens, 1), "docs": len(texts)}
    (directory / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return directory


def _data_spec(recipe: dict, stage: str, cfg: TrainConfig) -> dict:
    data = recipe.get("data", {})
    levels_key = f"{stage}_levels"
    return {"stage": stage, "task": data.get("task", "arithmetic"), "levels": data.get(levels_key, data.get("levels")),
            "train_problems": data.get(f"{stage}_problems", data.get("train_problems", 20000)),
            "val_problems": data.get("val_problems", 200), "files": data.get("files", []),
            "seed": recipe["run"]["seed"], "with_reasoning": getattr(cfg, "with_reasoning", True),
            "tokenizer": str(tokenizer_dir(recipe))}


def prepare_data(recipe: dict, stage: str, tokenizer: Tokenizer, cfg: TrainConfig) -> tuple[Path, Path]:
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
