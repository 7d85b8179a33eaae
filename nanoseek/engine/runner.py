"""Turns a scheduled step into one model call: flattened tokens, positions, cache slots, attention spans."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

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
        ids, positions, slot_mapping, prefills, logits_rows = [], [], [], [], []
        decode_rows, decode_slots = [], []
        row = 0
        for item in plan:
            seq, n = item.seq, item.num_new
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            context = self._slots(seq.block_table, end)
            slot_mapping.append(context[start:end])
            if n == 1:
                decode_rows.append(row)
                decode_slots.append(context)
            else:
                prefills.append(PrefillSpan(row, row + n, context))
            if item.samples:
                logits_rows.append(row + n - 1)
            row += n
        dev = self.device
        batch = PagedBatch(
            slot_mapping=torch.cat(slot_mapping),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev) if decode_rows else None,
            decode_slots=pad_sequence(decode_slots, batch_first=True) if decode_slots else None,
            decode_mask=None,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
        )
        if decode_slots:
            lengths = torch.tensor([len(s) for s in decode_slots], device=dev)
            width = batch.decode_slots.shape[1]
            batch.decode_mask = (torch.arange(width, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
            batch.decode_lengths = lengths
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        return self.model.forward_paged(input_ids, torch.cat(positions).to(dev), self.layers, batch)
