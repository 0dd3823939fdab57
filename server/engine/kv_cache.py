"""Paged KV cache: one pool of fixed-size blocks per layer, handed out to sequences by block tables."""

from __future__ import annotations

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
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))

    @staticmethod
    def blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
        """How many blocks (keys and values of every layer) fit in `budget_bytes`."""
        element = torch.empty((), dtype=dtype).element_size()
        return budget_bytes // (2 * num_layers * block_size * num_kv_heads * head_dim * element)

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    def blocks_needed(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def grow(self, block_table: list[int], num_positions: int) -> None:
        """Append blocks to `block_table` until it covers `num_positions`; all or nothing."""
        missing = self.blocks_needed(num_positions) - len(block_table)
        if missing <= 0:
            return
        if missing > len(self._free_blocks):
            raise OutOfBlocks(f"need {missing} KV blocks, {len(self._free_blocks)} free")
        for _ in range(missing):
            block_table.append(self._free_blocks.pop())

    def release(self, block_table: list[int]) -> None:
        """Return a sequence's blocks to the pool and empty its table."""
        self._free_blocks.extend(reversed(block_table))
        block_table.clear()

    def rows(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat storage rows of token positions [start, end) of a sequence."""
        size = self.block_size
        return [block_table[p // size] * size + p % size for p in range(start, end)]

    def resident_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
