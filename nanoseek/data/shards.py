"""Tokenized corpora as memory-mapped shards on disk, read back as packed fixed-length training windows.

Writing streams: documents are tokenized one at a time and flushed to `tokens_NNNNN.bin` files of at most
`shard_tokens` tokens (uint16 when the vocabulary fits, else uint32), with an optional per-token loss mask
(`mask_NNNNN.bin`, uint8: 1 = train on this target). Nothing holds the corpus in memory, so a corpus larger
than RAM works. `meta.json` records counts and the UTF-8 byte total, for bits-per-byte.

Reading packs the token stream into windows of seq_len + 1 tokens (stride seq_len, so every token is a target
exactly once per epoch), visited in a seeded random order per epoch. The position (epoch, cursor) is the
loader's whole state: saved with checkpoints, it resumes exactly. Every rank computes the same order and takes
its slice of each global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import ConfigError


class ShardWriter:
    def __init__(self, directory: str | Path, vocab_size: int, with_mask: bool = False,
                 shard_tokens: int = 1 << 24):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.uint16 if vocab_size <= 65535 else np.uint32
        self.with_mask = with_mask
        self.shard_tokens = shard_tokens
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.total_tokens = self.total_bytes = self.docs = 0
        self.trained_tokens = 0  # the tokens the loss is averaged over (mask 1): bits per byte divides by these

    def add(self, ids: list[int], text_bytes: int, mask: list[int] | None = None) -> None:
        self.tokens.append(np.asarray(ids, dtype=self.dtype))
        if self.with_mask:
            self.masks.append(np.asarray(mask if mask is not None else [1] * len(ids), dtype=np.uint8))
        self.buffered += len(ids)
        self.total_tokens += len(ids)
        self.trained_tokens += len(ids) if mask is None else int(sum(mask))
        self.total_bytes += text_bytes
        self.docs += 1
        if self.buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        i = len(self.shards)
        name = f"tokens_{i:05d}.bin"
        np.concatenate(self.tokens).tofile(self.directory / name)
        entry = {"tokens": name, "count": self.buffered}
        if self.with_mask:
            entry["mask"] = f"mask_{i:05d}.bin"
            np.concatenate(self.masks).tofile(self.directory / entry["mask"])
        self.shards.append(entry)
        self.tokens, self.masks, self.buffered = [], [], 0

    def close(self, **extra) -> dict:
        self._flush()
        meta = {"dtype": np.dtype(self.dtype).name, "shards": self.shards, "total_tokens": self.total_tokens,
                "total_bytes": self.total_bytes, "docs": self.docs, "has_mask": self.with_mask, **extra}
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta


def write_documents(directory, tokenizer, texts: Iterable[str], shard_tokens: int = 1 << 24,
                    batch_chars: int = 1 << 20) -> dict:
    """Pretraining shards: BOS + text + EOS per document. Documents are tokenized a bounded batch at a time
    (about `batch_chars` characters) by the tokenizers library's batch encoder, which spreads a batch over every
    core; memory holds one batch and one shard, whatever the corpus size."""
    writer = ShardWriter(directory, tokenizer.vocab_size, shard_tokens=shard_tokens)
    eos = tokenizer.eos_token_id
    for batch in _batches(texts, batch_chars):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            writer.add(ids + [eos], len(text.encode()))
    return writer.close(bytes_per_token=writer.total_bytes / max(writer.trained_tokens, 1))


def _batches(texts: Iterable[str], batch_chars: int, max_docs: int = 4096) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_chats(directory, tokenizer, examples: Iterable[tuple[list[dict], str]],
                shard_tokens: int = 1 << 24) -> dict:
    """SFT shards: the chat-templated prompt (masked out) then the assistant completion and EOS (trained on).
    bytes_per_token counts completion bytes over completion tokens: the loss is averaged over those only."""
    writer = ShardWriter(directory, tokenizer.vocab_size, with_mask=True, shard_tokens=shard_tokens)
    eos = tokenizer.eos_token_id
    for messages, completion in examples:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        answer = tokenizer.encode(completion, add_special_tokens=False) + [eos]
        writer.add(prompt + answer, len(completion.encode()), [0] * len(prompt) + [1] * len(answer))
    return writer.close(bytes_per_token=writer.total_bytes / max(writer.trained_tokens, 1))


@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # windows already consumed in this epoch


class PackedLoader:
    def __init__(self, directory: str | Path, seq_len: int, seed: int = 0):
        self.directory = Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.exists():
            raise ConfigError(f"no tokenized data at {self.directory} (meta.json missing)")
        self.meta = json.loads(meta_file.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = [np.memmap(self.directory / s["tokens"], dtype=dtype, mode="r") for s in self.meta["shards"]]
        self.masks = ([np.memmap(self.directory / s["mask"], dtype=np.uint8, mode="r") for s in self.meta["shards"]]
                      if self.meta.get("has_mask") else None)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tokens])
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (int(self.offsets[-1]) - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError(f"{self.directory} holds {int(self.offsets[-1])} tokens: too few for one window "
                              f"of {seq_len + 1}")
        self.state = LoaderState()
        self._order_epoch, self._order = -1, None

    @property
    def has_mask(self) -> bool:
        return self.masks is not None

    def _slice(self, arrays, start: int, end: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < end:
            local = start - int(self.offsets[first])
            take = min(end - start, len(arrays[first]) - local)
            parts.append(np.asarray(arrays[first][local:local + take]))
            start += take
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        start = index * self.seq_len
        end = start + self.seq_len + 1
        mask = self._slice(self.masks, start, end) if self.masks is not None else None
        return self._slice(self.tokens, start, end), mask

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_indices(self, count: int) -> list[int]:
        """The next `count` window indices of the global order (crossing epochs as needed)."""
        out = []
        while len(out) < count:
            order = self._order_for(self.state.epoch)
            take = min(count - len(out), self.num_windows - self.state.cursor)
            out.extend(order[self.state.cursor:self.state.cursor + take].tolist())
            self.state.cursor += take
            if self.state.cursor == self.num_windows:
                self.state = LoaderState(self.state.epoch + 1, 0)
        return out

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """inputs [B, T], targets [B, T] (int64), target mask [B, T] (bool) or None."""
        windows = [self.window(i) for i in indices]
        tokens = torch.from_numpy(np.stack([w[0] for w in windows]).astype(np.int64))
        mask = None
        if self.masks is not None:
            mask = torch.from_numpy(np.stack([w[1] for w in windows]).astype(bool))[:, 1:]
        return tokens[:, :-1], tokens[:, 1:], mask

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "cursor": self.state.cursor, "seed": self.seed,
                "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_windows") != self.num_windows or state.get("seq_len") != self.seq_len:
            raise ConfigError("the training data changed since the checkpoint was written: cannot resume exactly")
        self.seed = state["seed"]
        self.state = LoaderState(state["epoch"], state["cursor"])
        self._order_epoch = -1


def iter_eval_batches(loader: PackedLoader, batch_size: int, max_windows: int) -> Iterator:
    n = min(loader.num_windows, max_windows)
    for start in range(0, n, batch_size):
        yield loader.batch(list(range(start, min(start + batch_size, n))))
