"""Turns a scheduled step into one model call: flattened tokens, positions, cache slots, attention spans."""

from __future__ import annotations

import torch

from ..model.paged import PagedBatch, PrefillSpan
from ..model.transformer import Transformer
from .cache import KVCache
from .scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache):
        self.model = model
        self.cache = cache
        self.layers = cache.layers()
        self.device = model.device
        bs = cache.block_size
        self._offsets = torch.arange(bs, device=self.device)

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (table[:, None] * self.cache.block_size + self._offsets).flatten()[:num_tokens]

    @torch.inference_mode()
    def run(self, plan: list[ScheduledSeq]) -> torch.Tensor:
        """Computes every scheduled token; returns logits [M, vocab] for the sequences that sample, in plan
        order."""
        bs = self.cache.block_size
        ids, positions, slot_mapping, prefills, logits_rows = [], [], [], [], []
        decode_rows, decode_tables, decode_lengths = [], [], []
        row = 0
        for item in plan:
            seq, n = item.seq, item.num_new
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
            if n == 1:  # decoding: one slot to write, the whole block table to read (no per-sequence tensors)
                table = seq.block_table
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
                decode_rows.append(row)
                decode_tables.append(table[: (end + bs - 1) // bs])
                decode_lengths.append(end)
            else:
                context = self._slots(seq.block_table, end)
                positions.extend(range(start, end))
                slot_mapping.extend(context[start:end].tolist())
                prefills.append(PrefillSpan(row, row + n, context))
            if item.samples:
                logits_rows.append(row + n - 1)
            row += n
        dev = self.device
        batch = PagedBatch(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev) if decode_rows else None,
            decode_slots=None,
            decode_mask=None,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
        )
        if decode_rows:
            # Block tables padded with block 0 (masked out) -> [B, blocks * block_size] slots.
            width = max(len(t) for t in decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=dev)
            batch.decode_slots = (tables[:, :, None] * bs + self._offsets).flatten(1)
            lengths = torch.tensor(decode_lengths, device=dev)
            batch.decode_mask = (torch.arange(width * bs, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
            batch.decode_lengths = lengths
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        return self.model.forward_paged(input_ids, torch.tensor(positions, device=dev), self.layers, batch)
