"""Paged KV cache: one pool of fixed-size blocks per layer, handed out to sequences by block tables.

Blocks are refcounted: a block is in use while some sequence's table holds it, and a full block may be
held by several sequences at once (a shared prefix, see prefix_cache.py). A full block registered under
its prefix key stays cached after its last holder lets go, and can be taken again by a sequence with
the same prefix, until the pool needs the memory: unreferenced cached blocks are reused least recently
released first, after the blocks that hold nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request needs (the scheduler preempts and retries)."""


class PagedKVCache:
    """Keys and values of every layer in `num_blocks` blocks of `block_size` token positions.

    Storage is flat per layer (`[num_blocks * block_size, num_kv_heads, head_dim]`): token position p
    of a sequence whose block table is T lives at row `T[p // block_size] * block_size + p % block_size`.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache budget does not hold a single block; raise kv_cache_bytes")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, rows, kv_heads, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        """Unreferenced blocks that hold no cached prefix (popped from the end)."""
        self._refs = [0] * num_blocks
        """Block tables holding each block."""
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        """Cached full blocks by prefix key, and back (referenced or not)."""
        self._idle: OrderedDict[int, None] = OrderedDict()
        """Unreferenced cached blocks, least recently released first: reused after `_empty`."""

    @staticmethod
    def blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
        """How many blocks (keys and values of every layer) fit in `budget_bytes`."""
        element = torch.empty((), dtype=dtype).element_size()
        return budget_bytes // (2 * num_layers * block_size * num_kv_heads * head_dim * element)

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds: what `grow` can hand out (cached ones among them lose their prefix)."""
        return len(self._empty) + len(self._idle)

    @property
    def cached_blocks(self) -> int:
        """Blocks registered under a prefix key, held by sequences or not."""
        return len(self._key_of)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def blocks_needed(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def grow(self, block_table: list[int], num_positions: int) -> None:
        """Append blocks to `block_table` until it covers `num_positions`; all or nothing."""
        missing = self.blocks_needed(num_positions) - len(block_table)
        if missing <= 0:
            return
        if missing > self.free_blocks:
            raise OutOfBlocks(f"need {missing} KV blocks, {self.free_blocks} free")
        for _ in range(missing):
            block = self._empty.pop() if self._empty else self._evict()
            self._refs[block] = 1
            block_table.append(block)

    def _evict(self) -> int:
        """The least recently released cached block, its prefix forgotten."""
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def release(self, block_table: list[int]) -> None:
        """Let go of a sequence's blocks and empty its table. A block nobody holds any more becomes free;
        a cached one stays cached (its last blocks are the first to go, as they need the earlier ones)."""
        for block in reversed(block_table):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._empty.append(block)
        block_table.clear()

    def register(self, block: int, key: bytes) -> None:
        """Cache full block `block` (held by a sequence) under prefix `key`; a key already cached keeps its
        block (this one stays private and is freed with its sequence)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def cached(self, key: bytes) -> int | None:
        """The block cached under prefix `key`, if any."""
        return self._block_of.get(key)

    def share(self, block_table: list[int], blocks: list[int]) -> None:
        """Append cached `blocks` (from `cached`) to `block_table`, held until it is released."""
        for block in blocks:
            if not self._refs[block]:
                del self._idle[block]
            self._refs[block] += 1
            block_table.append(block)

    def rows(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat storage rows of token positions [start, end) of a sequence."""
        size = self.block_size
        return [block_table[p // size] * size + p % size for p in range(start, end)]

    def resident_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
