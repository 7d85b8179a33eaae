"""Turns a scheduled step into one model call: flattened tokens, positions, cache slots, attention spans. With MTP
speculation it also runs the draft module over the positions a step settled (`run_mtp`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.paged import PagedBatch, PrefillSpan
from ..model.transformer import Transformer
from .cache import KVCache
from .scheduler import ScheduledSeq


@dataclass
class Span:
    """Rows of one sequence in a model call: `tokens` at positions start.. (their K/V written to the cache);
    `logits`: which of its rows give next-token logits ("last", "all" or "none")."""

    block_table: list[int]
    start: int
    tokens: list[int]
    logits: str = "last"
    # Run each row as a single-token decode (row j attends to positions <= start + j): a few rows -- drafts being
    # verified, the draft module's rows -- then take the decode path plain decoding takes, with its kernels.
    as_decodes: bool = False


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, num_model_layers: int | None = None):
        self.model = model
        self.cache = cache
        layers = cache.layers()
        # The main model's layers first; with MTP speculation, the draft module's own layer last.
        self.layers = layers[:num_model_layers] if num_model_layers is not None else layers
        self.mtp_layer = layers[num_model_layers] if num_model_layers is not None and len(layers) > num_model_layers \
            else None
        self.device = model.device
        bs = cache.block_size
        self._offsets = torch.arange(bs, device=self.device)

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (table[:, None] * self.cache.block_size + self._offsets).flatten()[:num_tokens]

    def batch(self, spans: list[Span]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch]:
        """(token ids [N], positions [N], attention metadata) of the spans, rows in span order."""
        bs = self.cache.block_size
        ids, positions, slot_mapping, prefills, logits_rows = [], [], [], [], []
        decode_rows, decode_tables, decode_lengths = [], [], []
        row = 0
        for span in spans:
            n, start = len(span.tokens), span.start
            end = start + n
            ids.extend(span.tokens)
            if n == 1 or span.as_decodes:
                # Decoding: one slot to write per row, the block table to read (no per-sequence tensors). The
                # rows' own K/V are written before any row reads the cache, so row j sees rows before it.
                table = span.block_table
                for j in range(n):
                    p = start + j
                    positions.append(p)
                    slot_mapping.append(table[p // bs] * bs + p % bs)
                    decode_rows.append(row + j)
                    decode_tables.append(table[: (p + bs) // bs])
                    decode_lengths.append(p + 1)
            else:
                context = self._slots(span.block_table, end)
                positions.extend(range(start, end))
                slot_mapping.extend(context[start:end].tolist())
                prefills.append(PrefillSpan(row, row + n, context))
            if span.logits == "last":
                logits_rows.append(row + n - 1)
            elif span.logits == "all":
                logits_rows.extend(range(row, row + n))
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
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, device=dev), batch)

    @staticmethod
    def spans(plan: list[ScheduledSeq]) -> list[Span]:
        """A step's spans: each sequence's new tokens, then its draft tokens (all rows give logits, to verify
        them), logits from the last row of a sequence that samples."""
        spans = []
        for item in plan:
            seq, start = item.seq, item.seq.num_computed
            tokens = seq.token_ids[start:start + item.num_new - len(item.draft)] + item.draft
            logits = ("all" if item.draft else "last") if item.samples else "none"
            spans.append(Span(seq.block_table, start, tokens, logits, as_decodes=bool(item.draft)))
        return spans

    @torch.inference_mode()
    def run(self, plan: list[ScheduledSeq], return_hidden: bool = False):
        """Computes every scheduled token; returns logits [M, vocab] for the rows that sample (one per sequence,
        1 + drafts for a sequence verifying drafts), in plan order; with `return_hidden`, also every row's
        final hidden state [N, hidden]."""
        ids, positions, batch = self.batch(self.spans(plan))
        return self.model.forward_paged(ids, positions, self.layers, batch, return_hidden=return_hidden)

    @torch.inference_mode()
    def run_mtp(self, spans: list[Span], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP draft module over spans whose `tokens` are each position's next token, hidden [N, hidden]
        the states it combines them with -> (its output states [N, hidden], logits of the spans' logits rows)."""
        ids, positions, batch = self.batch(spans)
        return self.model.mtp_forward_paged(hidden, ids, positions, self.mtp_layer, batch)
