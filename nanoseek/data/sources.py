"""Where training text comes from: the embedded synthetic tasks or your own files, as documents and chats.

Every stage reads the same sources:
  * pretraining documents: plain text (`doc_text`);
  * SFT examples: (chat messages up to the assistant turn, assistant completion) pairs (`sft_example`);
  * evaluation and RL problems: `Problem`s with a verifier.
Formats: plain text files (.txt, .md: one document per file, a large file cut at blank lines into documents of
64K-1M characters), JSONL with `text` or chat `messages`, parquet with the same columns (needs pyarrow; read a
batch of rows at a time), a directory of such files as one source, and JSONL task files (`question`, `answer`,
optional `verifier` exact|numeric|math, `solution`, `level`). Everything streams: no reader holds a file whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError
from .tasks import Problem, generate, is_held_out
from .verify import VERIFIERS

ANSWER_PREFIX = "The answer is "
DOC_CHARS, MAX_DOC_CHARS = 1 << 16, 1 << 20  # how large text files are cut into documents
DATA_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


def doc_text(problem: Problem) -> str:
    """A pretraining document: the problem with its worked solution (when it has one) and its answer."""
    if problem.solution:
        return f"Question: {problem.question}\nReasoning:\n{problem.solution}\nAnswer: {problem.answer}"
    return f"Question: {problem.question}\nAnswer: {problem.answer}"


def completion_text(problem: Problem, with_reasoning: bool = True) -> str:
    """What the assistant writes after the template's opening `<think>\\n`: reasoning, `</think>`, answer."""
    reasoning = problem.solution if with_reasoning and problem.solution else ""
    return f"{reasoning}\n</think>\n\n{ANSWER_PREFIX}{problem.answer}."


def chat_prompt(problem: Problem) -> list[dict]:
    return [{"role": "user", "content": problem.question}]


def sft_example(problem: Problem, with_reasoning: bool = True) -> tuple[list[dict], str]:
    return chat_prompt(problem), completion_text(problem, with_reasoning)


# ------------------------------------------------------------------ files
def _jsonl(path: Path) -> Iterator[dict]:
    with path.open() as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n} is not valid JSON ({e.msg}): one JSON object per line") from None


def _parquet(path: Path) -> Iterator[dict]:
    """Records of a parquet file, a batch of rows at a time (row group by row group, never the whole table)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path} is parquet: install pyarrow (pip install pyarrow) to read it") from None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        yield from batch.to_pylist()


def _text(path: Path) -> Iterator[dict]:
    """A text file as {"text"} documents, read a bounded piece at a time: a small file is one document; a large one
    is cut into documents of at least DOC_CHARS characters at blank lines (at most MAX_DOC_CHARS, then at a line
    end; a line longer than that is cut too)."""
    buf, size = [], 0
    with path.open(errors="replace") as f:
        for line in iter(lambda: f.readline(MAX_DOC_CHARS), ""):
            blank = not line.strip()
            if size >= MAX_DOC_CHARS or (size >= DOC_CHARS and blank):
                yield {"text": "".join(buf)}
                buf, size = [], 0
                if blank:
                    continue
            buf.append(line)
            size += len(line)
    if buf:
        yield {"text": "".join(buf)}


def data_files(path: Path) -> list[Path]:
    """A directory as one source: its data files (any depth), in name order."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise ConfigError(f"data directory {path} holds no {'/'.join(DATA_SUFFIXES)} files")
    return files


def read_records(path: str | Path) -> Iterator[dict]:
    """Records of a JSONL or parquet file, {"text": ...} documents of a text file, or the records of every data
    file in a directory (e.g. a FineWeb-style parquet dump), streamed: memory does not grow with the corpus."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist")
    if path.is_dir():
        for f in data_files(path):
            yield from read_records(f)
    elif path.suffix == ".jsonl" or path.suffix == ".json":
        yield from _jsonl(path)
    elif path.suffix == ".parquet":
        yield from _parquet(path)
    else:
        yield from _text(path)


def load_task_file(path: str | Path) -> list[Problem]:
    """A JSONL task file: `question`, `answer`, optional `verifier`, `solution`, `level`."""
    problems = []
    for n, rec in enumerate(read_records(path), 1):
        if "question" not in rec or "answer" not in rec:
            raise ConfigError(f"{path} record {n} lacks 'question' or 'answer': a task file needs both")
        verifier = rec.get("verifier", "math")
        if verifier not in VERIFIERS:
            raise ConfigError(f"{path} record {n}: verifier {verifier!r} is not one of {', '.join(VERIFIERS)}")
        problems.append(Problem(task=Path(path).stem, level=int(rec.get("level", 0)), question=str(rec["question"]),
                                answer=str(rec["answer"]), solution=str(rec.get("solution") or ""),
                                verifier=verifier, key=f"{Path(path).stem}:{n}"))
    if not problems:
        raise ConfigError(f"{path} holds no problems")
    return problems


def is_task_file(path: str | Path) -> bool:
    first = next(iter(read_records(path)), None) if Path(path).suffix in (".jsonl", ".parquet") else None
    return bool(first) and "question" in first and "answer" in first


def file_documents(path: str | Path) -> Iterator[str]:
    """Pretraining text from any supported file: `text` records, chats flattened, tasks as documents."""
    for rec in read_records(path):
        if "text" in rec:
            yield str(rec["text"])
        elif "messages" in rec:
            yield "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"])
        elif "question" in rec and "answer" in rec:
            yield doc_text(Problem("file", int(rec.get("level", 0)), str(rec["question"]), str(rec["answer"]),
                                   str(rec.get("solution") or "")))


def file_chats(path: str | Path) -> Iterator[tuple[list[dict], str]]:
    """SFT examples from a JSONL/parquet with chat `messages` (the last assistant turn is the target) or from a
    task file."""
    for n, rec in enumerate(read_records(path), 1):
        if "messages" in rec:
            messages = list(rec["messages"])
            if not messages or messages[-1].get("role") != "assistant":
                raise ConfigError(f"{path} record {n}: the last message must be the assistant's")
            target = messages[-1]["content"]
            if target.startswith("<think>"):
                target = target[len("<think>"):].lstrip("\n")
            elif "</think>" not in target:
                target = "\n</think>\n\n" + target  # an answer without reasoning
            yield messages[:-1], target
        elif "question" in rec and "answer" in rec:
            p = Problem("file", 0, str(rec["question"]), str(rec["answer"]), str(rec.get("solution") or ""))
            yield sft_example(p)
        else:
            raise ConfigError(f"{path} record {n} has neither 'messages' nor 'question'/'answer'")


# ------------------------------------------------------------------ the embedded default
def task_problems(task: str, levels: list[int], count: int, seed: int, split: str) -> list[Problem]:
    """Problems of a synthetic family (training streams may repeat; test sets never do), or of a task file.
    split: "train", "test" (held out) or, for files, "all"."""
    if Path(task).suffix in (".jsonl", ".parquet") or Path(task).exists():
        problems = load_task_file(task)
        problems = [p for p in problems if not levels or p.level in levels or p.level == 0]
        if split != "all":  # a file is split by the same question hash as the synthetic families
            problems = [p for p in problems if is_held_out(p.question) == (split == "test")]
        return problems[:count] if count else problems
    try:
        return generate(task, levels, count, seed, split, distinct=(split == "test"))
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
