"""Keys of the prefix cache: which full KV blocks hold the same keys and values.

A block's keys and values depend only on the base weights, the adapter version, and the token ids at
and before its positions. So a full block's key is a hash chain: block 0 hashes the sequence's root
(base model digest, adapter version digest or "base", cache salt) with its token ids, block i hashes
block i-1's key with its own. Two blocks with one key hold the same prefix under the same weights;
an adapter replaced under the same name has a new digest, so its blocks can never match the old
version's, and a salted request only ever matches requests with the same salt.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

BASE_VERSION = "base"
"""What stands for the adapter version of a base-model sequence in its root (no digest is this)."""


def chain_root(base_digest: str, adapter_version: str, cache_salt: str) -> bytes:
    """The root of a sequence's chain: `adapter_version` is its adapter's content digest, "" for the base
    model; `cache_salt` ("" for none) keeps its blocks to requests with the same salt."""
    fields = [base_digest, adapter_version or BASE_VERSION, cache_salt]
    return hashlib.sha256(json.dumps(fields).encode()).digest()


def block_key(previous: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a full block: the previous block's key (the root for block 0) and the block's token ids."""
    return hashlib.sha256(previous + array("Q", token_ids).tobytes()).digest()


@dataclass
class BlockChain:
    """The keys of one sequence's full blocks, computed as far as they were asked for."""

    root: bytes
    block_size: int
    keys: list[bytes] = field(default_factory=list)

    def key(self, index: int, token_ids: Sequence[int]) -> bytes:
        """The key of block `index` of a sequence whose token ids are `token_ids` (covering that block)."""
        size = self.block_size
        while len(self.keys) <= index:
            start = len(self.keys) * size
            previous = self.keys[-1] if self.keys else self.root
            self.keys.append(block_key(previous, token_ids[start:start + size]))
        return self.keys[index]
