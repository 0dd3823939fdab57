"""Decode steps under CUDA graphs: one captured forward per bucket of batch sizes, replayed with new inputs.

A decode step of n sequences (one new token each, no prompt logprobs) runs as the graph of the smallest
bucket >= n (BUCKETS); larger or mixed steps run eagerly. Everything the captured forward reads lives in
static buffers allocated once per bucket (`StaticDecodeStep`); a step copies its inputs into them (one
host-to-device copy) and replays:

- token ids, positions (the rotary tables are computed inside the graph), the KV row each token writes,
  each sequence's context length and its block table [bucket, max_blocks]; the graph turns the tables
  into cache rows [bucket, max_blocks * block_size], so KV growth changes values (a length, a new
  block id), never a shape;
- each token's adapter slot: the LoRA op is BGMV over all the bucket's tokens (slot -1 adds zero) with
  its rank tile at max_rank, reading the slot buffers and their ranks where they lie, so hot-swapping
  an adapter (a copy into its slot) needs no recapture;
- padding rows (bucket > n) repeat the last real token: they compute the same keys and values into
  the same cache row, and their logits are dropped.

Decode attention is attention_triton's (its loop bound is each length read on the device); NF4
projections are nf4_triton's up to its token count, bitsandbytes' above. The first step of a bucket
runs its forward twice eagerly on a side stream (Triton compiles, the allocator warms; both write the
KV values the step itself writes), captures it into a graph sharing one memory pool with the other
buckets, then replays. kernel_choice.decode_graphs says when an engine uses this.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import torch

from loraplex.server.engine.attention import AttentionBatch, AttentionGroup
from loraplex.server.engine.kv_cache import PagedKVCache
from loraplex.server.engine.lora import GroupLayout, LoraBatch
from loraplex.server.engine.model import DecoderModel, StepMetadata
from loraplex.server.engine.sequence import SequenceState

#: Batch sizes a decode graph is captured for; a step of n sequences replays the smallest bucket >= n.
BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_for(num_sequences: int) -> int | None:
    """The bucket a decode step of `num_sequences` replays, None above the largest."""
    index = bisect.bisect_left(BUCKETS, num_sequences)
    return BUCKETS[index] if index < len(BUCKETS) else None


def is_plain_decode(batch: Sequence[tuple[SequenceState, int]]) -> bool:
    """Whether every sequence of the step computes its one pending token and wants no prompt logprobs."""
    return all(count == 1 and seq.num_pending == 1 and not seq.sampling.prompt_logprobs for seq, count in batch)


class StaticDecodeStep:
    """The static inputs of one bucket's decode step and the forward that reads them (what a graph captures).

    All integer inputs share one buffer, `packed`, so a step's inputs arrive in one copy."""

    def __init__(self, bucket: int, max_blocks: int, num_slots: int, max_rank: int, block_size: int,
                 device: torch.device) -> None:
        self.bucket = bucket
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.packed = torch.zeros(5 * bucket + bucket * max_blocks + num_slots, dtype=torch.long, device=device)
        fields = self.packed.split([bucket] * 5 + [bucket * max_blocks, num_slots])
        self.token_ids, self.positions, self.write_rows, self.lengths, self.slot_ids = fields[:5]  # [bucket] each
        self.block_tables = fields[5].view(bucket, max_blocks)  # [bucket, max_blocks] block ids (0-padded)
        self.slot_ranks = fields[6]  # [num_slots]
        self.every_token = torch.arange(bucket, device=device)  # [bucket]: queries, LoRA tokens, logits rows
        context = torch.arange(max_blocks * block_size, device=device)  # [max_context] positions
        self.block_of, self.row_in_block = context // block_size, context % block_size
        no_groups = GroupLayout.build({}, [], device)  # here, not in metadata(): no host copies while capturing
        self.lora = LoraBatch(
            slot_ids=self.slot_ids, groups=dataclasses.replace(no_groups, rank=max_rank), large_groups=no_groups,
            small_tokens=self.every_token, small_slots=self.slot_ids,
            grouped_slots=no_groups.token_index, slot_ranks=self.slot_ranks, has_adapters=True,
        )
        """Every token through BGMV (slot -1 adds zero), rank tile max_rank: the same launches whatever the slots."""

    def fill(self, batch: Sequence[tuple[SequenceState, int]], cache: PagedKVCache, slot_ranks: list[int]) -> None:
        """Copy a plain decode step's inputs into the buffers; rows past len(batch) repeat its last sequence."""
        seqs = [seq for seq, _ in batch]
        seqs += [seqs[-1]] * (self.bucket - len(seqs))
        positions = [seq.num_computed for seq in seqs]
        tables = [seq.block_table + [0] * (self.max_blocks - len(seq.block_table)) for seq in seqs]
        host = [seq.token_ids[p] for seq, p in zip(seqs, positions, strict=True)] + positions
        host += [cache.rows(seq.block_table, p, p + 1)[0] for seq, p in zip(seqs, positions, strict=True)]
        host += [p + 1 for p in positions] + [seq.slot for seq in seqs]
        host += [block for table in tables for block in table] + slot_ranks
        self.packed.copy_(torch.tensor(host, dtype=torch.long))

    def metadata(self, model: DecoderModel) -> StepMetadata:
        """The step's metadata computed from the buffers, on the device (inside the graph when captured)."""
        cos, sin = model.rotary(self.positions)
        rows = self.block_tables[:, self.block_of] * self.block_size + self.row_in_block  # [bucket, max_context]
        decode = AttentionGroup(self.every_token, rows, {}, self.lengths, 1)
        return StepMetadata(cos, sin, AttentionBatch(self.write_rows, (decode,), "triton"), self.lora, self.every_token)

    def forward(self, model: DecoderModel, cache: PagedKVCache) -> torch.Tensor:
        """Logits [bucket, vocab] of the step in the buffers (KV rows written as an eager step writes them)."""
        return model.forward(self.token_ids, self.metadata(model), cache)


class DecodeGraphs:
    """The captured decode steps of one engine, by bucket (see the module docstring)."""

    def __init__(self, model: DecoderModel, cache: PagedKVCache, max_model_len: int, num_slots: int,
                 max_rank: int, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.max_blocks = cache.blocks_needed(max_model_len)
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = device
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, tuple[StaticDecodeStep, torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def captured(self) -> list[int]:
        """The buckets captured so far."""
        return sorted(self._graphs)

    def serves(self, batch: Sequence[tuple[SequenceState, int]]) -> bool:
        return bool(batch) and bucket_for(len(batch)) is not None and is_plain_decode(batch)

    def run(self, batch: Sequence[tuple[SequenceState, int]], slot_ranks: list[int]) -> torch.Tensor:
        """Logits [len(batch), vocab] of a plain decode step (`serves`), replayed from its bucket's graph."""
        bucket = bucket_for(len(batch))
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket, batch, slot_ranks)
        else:
            self._graphs[bucket][0].fill(batch, self.cache, slot_ranks)
        _, graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:len(batch)]

    def _capture(self, bucket: int, batch: Sequence[tuple[SequenceState, int]], slot_ranks: list[int]
                 ) -> tuple[StaticDecodeStep, torch.cuda.CUDAGraph, torch.Tensor]:
        static = StaticDecodeStep(bucket, self.max_blocks, self.num_slots, self.max_rank, self.cache.block_size,
                                  self.device)
        static.fill(batch, self.cache, slot_ranks)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                static.forward(self.model, self.cache)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = static.forward(self.model, self.cache)
        return static, graph, logits
