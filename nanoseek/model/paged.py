"""The attention metadata of one engine step: the model's side of the paged-KV-cache contract.

The engine flattens the new tokens of every scheduled sequence into N rows and says, per row, which cache slot
its K/V (or MLA latent) goes to, and per sequence, which slots make up its context. The model writes and reads
the cache through this and nothing else; it knows nothing of blocks, hashes or scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSpan:
    """A sequence computing T > 1 new tokens (rows start..end) whose context is S slots, the new ones last."""
    start: int
    end: int
    context_slots: torch.Tensor  # [S] long
    mask: torch.Tensor = field(init=False)  # [T, S] bool: causal with the cached prefix fully visible

    def __post_init__(self):
        T, S = self.end - self.start, self.context_slots.shape[0]
        device = self.context_slots.device
        self.mask = torch.arange(S, device=device)[None, :] <= (S - T + torch.arange(T, device=device))[:, None]


@dataclass
class PagedBatch:
    slot_mapping: torch.Tensor  # [N] long: cache slot written by each new token
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor | None  # [B] long: rows of sequences decoding one token
    decode_slots: torch.Tensor | None  # [B, Smax] long: their context slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, Smax] bool: which padded slots are real
    logits_rows: torch.Tensor  # [M] long: rows whose next-token logits are wanted
    decode_lengths: torch.Tensor | None = None  # [B] long: how many of each decode row's slots are real
