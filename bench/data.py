"""Corpora larger than memory: a generated text corpus and a directory of parquet shards, tokenized into the
memory-mapped training shards with bounded memory.

    python bench/data.py [--text-gb 2 --parquet-gb 1] [--keep DIR]

The corpora are generated (Zipf-distributed words from a 20,000-word vocabulary, in paragraphs; the parquet files
FineWeb-style, a `text` column plus metadata columns, several row groups per file). Each one is then tokenized in
its own child process (so its peak RSS, from `resource.getrusage`, is that run's alone) by the same code a recipe
uses (`data.sources.file_documents` -> `data.shards.write_documents`), with a tokenizer trained on a bounded sample
of the text. One JSON line last: per corpus its size, MB/s, tokens, documents and peak RSS, with the CPU class.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

WORDS = 20_000


def _vocabulary(rng) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 10, WORDS)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths])


def _paragraphs(rng, vocab, chars: int):
    """Text of about `chars` characters: sentences of Zipf-distributed words, paragraphs between blank lines."""
    words = vocab[np.minimum(rng.zipf(1.2, chars // 5), WORDS) - 1]
    text = " ".join(words)
    out, i = [], 0
    while i < len(text):
        j = text.find(" ", i + int(rng.integers(200, 2000)))
        j = len(text) if j == -1 else j
        out.append(text[i:j].strip().capitalize() + ".")
        i = j + 1
    return "\n\n".join(out) + "\n\n"


def write_text(path: Path, size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    written = 0
    with path.open("w") as f:
        while written < size:
            chunk = _paragraphs(rng, vocab, min(1 << 24, size - written + 100))
            f.write(chunk)
            written += len(chunk)
    return path.stat().st_size


def write_parquet(directory: Path, size: int, files: int = 8, seed: int = 1) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    directory.mkdir(parents=True, exist_ok=True)
    per_file, doc = size // files, 0
    for k in range(files):
        with pq.ParquetWriter(directory / f"shard_{k:05d}.parquet", pa.schema(
                [("text", pa.string()), ("id", pa.string()), ("url", pa.string()), ("token_count", pa.int64())]),
                compression="zstd") as writer:
            done = 0
            while done < per_file:
                texts = _paragraphs(rng, vocab, min(1 << 24, per_file - done + 100)).split("\n\n")
                texts = ["\n\n".join(texts[i:i + 4]) for i in range(0, len(texts), 4) if texts[i]]
                ids = [f"doc-{doc + i}" for i in range(len(texts))]
                doc += len(texts)
                writer.write_table(pa.table({"text": texts, "id": ids, "url": [f"https://example.com/{i}" for i in ids],
                                             "token_count": [len(t) // 4 for t in texts]}), row_group_size=4096)
                done += sum(len(t) for t in texts)
    return sum(p.stat().st_size for p in directory.glob("*.parquet"))


def tokenize(source: str, tokenizer: str, out: str) -> dict:
    """In this process: `source` (a file or a directory) into shards; its peak RSS is this run's."""
    from nanoseek.data import shards
    from nanoseek.data.sources import file_documents
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    meta = shards.write_documents(out, tok, file_documents(source))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "text_mb": round(meta["total_bytes"] / 1e6, 1),
            "mb_per_s": round(meta["total_bytes"] / 1e6 / seconds, 2), "tokens": meta["total_tokens"],
            "docs": meta["docs"], "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def build(root: Path, text_gb: float, parquet_gb: float) -> dict:
    """In this process: the two corpora and a tokenizer trained on a bounded sample of the text."""
    from nanoseek.data.sources import file_documents
    from nanoseek.tokenizer import train_tokenizer

    t = time.perf_counter()
    text_bytes = write_text(root / "corpus.txt", int(text_gb * 1e9))
    parquet_bytes = write_parquet(root / "parquet", int(parquet_gb * 1e9))
    generated = time.perf_counter() - t
    sample, chars = [], 0  # the tokenizer trains on a bounded sample, as a recipe's does
    for doc in file_documents(root / "corpus.txt"):
        sample.append(doc)
        chars += len(doc)
        if chars > 8 << 20:
            break
    train_tokenizer(sample, 4096, root / "tokenizer")
    return {"text_bytes": text_bytes, "parquet_bytes": parquet_bytes, "generated_s": round(generated, 1)}


def child(*args: str) -> dict:
    """Runs a step in a fresh process started from this small one: Linux carries a parent's peak RSS into a
    forked child, so the parent must stay small for the child's getrusage figure to be its own."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench/data.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-gb", type=float, default=2.0)
    ap.add_argument("--parquet-gb", type=float, default=1.0)
    ap.add_argument("--keep", default=None, help="build the corpora here and keep them (default: a temp dir)")
    ap.add_argument("--build", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--tokenize", nargs=3, metavar=("SOURCE", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build(Path(args.build[0]), float(args.build[1]), float(args.build[2]))))
        return
    if args.tokenize:
        print(json.dumps(tokenize(*args.tokenize)))
        return
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    built = child("--build", str(root), str(args.text_gb), str(args.parquet_gb))
    print(f"generated {built['text_bytes'] / 1e9:.2f} GB text, {built['parquet_bytes'] / 1e9:.2f} GB parquet in "
          f"{built['generated_s']:.0f} s", flush=True)
    result = {"bench": "data", "tokenizer_vocab": 4096}
    for name, source in (("text", root / "corpus.txt"), ("parquet_dir", root / "parquet")):
        result[name] = child("--tokenize", str(source), str(root / "tokenizer"), str(root / f"shards_{name}"))
        size = built["text_bytes"] if name == "text" else built["parquet_bytes"]
        result[name]["file_gb"] = round(size / 1e9, 2)
        print(name, result[name], flush=True)
    from common import emit  # imports torch: only after the children ran (the parent stays small until then)

    emit(result)


if __name__ == "__main__":
    main()
