"""Paged KV cache: the block manager (prefix hashing, reference counts, LRU eviction) and the cache tensors.

A block holds `block_size` consecutive tokens of one sequence. Once all its tokens have been computed, a full
block is identified by a cryptographic hash chained over the whole prefix (blake2b of the previous block's digest
and its token ids), so a later request with the same prefix reuses it. Equal digests mean equal whole prefixes:
a crafted collision would have to break blake2b (Python's hash() of int tuples can be collided on purpose, the
class of bug behind vLLM's prefix-cache advisory), and a hit is still confirmed against the block's own tokens. Blocks nobody references stay cached in an LRU list and are evicted oldest first
when fresh blocks are needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None


def chain_hash(previous: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """blake2b-256 of the parent block's digest (32 zero bytes for the first block) and the token ids as int64s
    (native byte order: digests never leave the process)."""
    digest = hashlib.blake2b(previous or bytes(32), digest_size=32)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, oldest first: free to reuse, and still serving prefix hits until reused.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----
    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `token_ids`. At least the last token is always left to
        compute, because its logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        found, previous = [], None
        for i in range((len(token_ids) - 1) // self.block_size):
            chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(previous, chunk)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
            previous = h
        return found

    def register_computed(self, token_ids: list[int], block_table: list[int], num_computed: int) -> None:
        """Hashes every full block whose tokens are all computed, so later requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        previous = None
        for i in range(num_computed // self.block_size):
            block = self.blocks[block_table[i]]
            if block.hash is None:
                chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
                h = chain_hash(previous, chunk)
                if h not in self.hash_to_block:  # a twin computed concurrently keeps the mapping
                    block.hash, block.token_ids = h, chunk
                    self.hash_to_block[h] = block.block_id
                else:
                    previous = h
                    continue
            previous = block.hash

    def reset_prefix_cache(self) -> None:
        """Forgets every hash (after a weight update, cached K/V are stale)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, None
        self.hash_to_block.clear()

    # ---- allocation ----
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently used
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id

    def can_grow(self, block_table: list[int], num_tokens: int, extra_blocks: int = 0) -> bool:
        return self.blocks_needed(num_tokens) - len(block_table) + extra_blocks <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends fresh blocks until the table covers `num_tokens` tokens."""
        while len(block_table) < self.blocks_needed(num_tokens):
            block_table.append(self._fresh())

    def release(self, block_table: list[int]) -> None:
        """Drops a sequence's references. Freed blocks join the LRU tail, its last blocks first, so a shared
        prefix outlives the sequence-specific tail."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        block_table.clear()

    def fork(self, block_table: list[int], num_tokens: int) -> list[int]:
        """A child sequence's table: the parent's full blocks, shared by reference. The child recomputes the
        tokens of the parent's partial last block (fewer than block_size) instead of copying it."""
        table = list(block_table[: num_tokens // self.block_size])
        for block_id in table:
            self.blocks[block_id].ref_count += 1
        return table

    def admission_cost(self, prefix: list[int], num_tokens: int) -> int:
        """Free-list blocks that admitting a sequence with this cached prefix and `num_tokens` tokens consumes:
        cached blocks nobody references leave the free list too."""
        idle = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        return idle + max(0, self.blocks_needed(num_tokens) - len(prefix))

    def admit_prefix(self, prefix: list[int], block_table: list[int]) -> None:
        for block_id in prefix:
            self._take(block_id)
        block_table.extend(prefix)


class KVCache:
    """The cache tensors: [layers, num_blocks * block_size, *slot_shape] (per token and layer, MLA stores only
    [c_kv | k_r]; GQA stores K and V per KV head)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, slot_shape: tuple[int, ...],
                 dtype: torch.dtype, device):
        self.block_size = block_size
        self.tensor = torch.zeros(num_layers, num_blocks * block_size, *slot_shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, slot_shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = 1
        for d in slot_shape:
            n *= d
        return num_layers * n * torch.empty((), dtype=dtype).element_size()

    def layers(self) -> list[torch.Tensor]:
        return list(self.tensor.unbind(0))
