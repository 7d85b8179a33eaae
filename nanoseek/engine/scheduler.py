"""Continuous batching with chunked prefill and preemption by recomputation.

Each step spends a token budget (`max_num_batched_tokens`): running sequences first, in arrival order (a
decode costs one token, an unfinished prompt the rest of its chunk), then waiting sequences, first come first
served, up to `max_num_seqs` running. A prompt longer than the remaining budget is split into chunks over
several steps, so long prompts never stall the decodes batched with them. When a running sequence needs a
block and none is free, the most recently arrived running sequence is preempted: its blocks are released and it
goes back to the front of the queue, to be recomputed later (its full blocks usually come back from the prefix
cache). Since the engine refuses any single request that could not fit the whole cache alone, the oldest
sequence can always make progress: no deadlock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, draft tokens included
    draft: list[int] = field(default_factory=list)  # speculative tokens after the last one, verified this step
    draft_probs: torch.Tensor | None = None  # [len(draft), vocab]: the distribution each was sampled from

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed + self.num_new - len(self.draft) == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """Places a forked child right after its parent, already holding its shared blocks."""
        seq.status = Status.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out and releases its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.draft, seq.draft_probs = [], None
        self.num_preemptions += 1
        self.add(seq, front=True)

    def preempt_all(self) -> None:
        for seq in reversed(list(self.running)):
            self.preempt(seq)

    def schedule(self, only=None) -> list[ScheduledSeq]:
        """The next batch. With `only` (a Request), the batch holds that request's sequences alone: the engine
        runs a request suspected of a fault by itself, so a fault is pinned on the request that causes it."""
        budget = self.max_num_batched_tokens
        plan: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if only is not None and seq.request is not only:
                i += 1
                continue
            pending = len(seq.token_ids) - seq.num_computed
            # Draft tokens ride along with a decode when the budget and free blocks allow; they never cause a
            # preemption (without room the sequence decodes plainly this step).
            draft = seq.draft if pending == 1 and 1 + len(seq.draft) <= budget and self.blocks.can_grow(
                seq.block_table, seq.num_computed + 1 + len(seq.draft)) else []
            draft_probs = seq.draft_probs if draft else None
            seq.draft, seq.draft_probs = [], None
            n = min(pending, budget) + len(draft)
            while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            plan.append(ScheduledSeq(seq, n, draft, draft_probs))
            budget -= n
            i += 1
        # Admit waiting sequences only when nothing had to be preempted: room is scarce otherwise.
        while not preempted and self.waiting and budget > 0:
            seq = next((s for s in self.waiting if only is None or s.request is only), None)
            if seq is None or self._slots_in_use() + self._slots_needed(seq) > self.max_num_seqs:
                break
            prefix = self.blocks.cached_prefix(seq.token_ids)
            cached = len(prefix) * self.blocks.block_size
            n = min(len(seq.token_ids) - cached, budget)
            if self.blocks.admission_cost(prefix, cached + n) > self.blocks.num_free:
                break
            self.waiting.remove(seq)
            self.blocks.admit_prefix(prefix, seq.block_table)
            seq.num_computed = cached
            self.blocks.grow(seq.block_table, cached + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._first_admission(seq, cached)
            plan.append(ScheduledSeq(seq, n))
            budget -= n
        return plan

    @staticmethod
    def _slots_needed(seq: Sequence) -> int:
        """An n > 1 request forks its siblings once its prompt is done: it is admitted only with room for all."""
        return 1 if seq.request.forked else seq.request.params.n

    def _slots_in_use(self) -> int:
        return sum(self._slots_needed(s) for s in self.running)

    def _first_admission(self, seq: Sequence, cached: int) -> None:
        metrics = seq.request.metrics
        if seq.index == 0 and metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.monotonic()
            metrics.prompt_cache_hit_tokens = cached
            metrics.prompt_cache_miss_tokens = seq.num_prompt_tokens - cached
