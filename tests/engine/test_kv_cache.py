"""Paged KV cache: the block allocator, OutOfBlocks atomicity, block reuse, chunked prefill and
preemption equivalence on a real tiny engine, block-size independence and KV budget sizing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.engine import Engine, EngineConfig, FinishReason, SamplingParams, SequenceState
from loraplex.server.engine.kv_cache import OutOfBlocks, PagedKVCache
from loraplex.server.model_files import iter_weights, model_spec
from support import ARCHITECTURES, AdapterSpec, write_adapter, write_tiny_model

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def prompt(length: int, seed: int, vocab: int = 96) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


class LogitsRecorder:
    """Wraps an engine's model forward and files each sampled row's logits under its sequence id."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.by_seq: dict[int, list[torch.Tensor]] = {}
        self._last: torch.Tensor | None = None
        forward = engine.model.forward

        def recording_forward(*args: object) -> torch.Tensor:
            logits = forward(*args)
            self._last = logits.clone()
            return logits

        engine.model.forward = recording_forward

    def step(self, batch: Sequence[tuple[SequenceState, int]]) -> None:
        events = self.engine.step(batch)
        assert self._last is not None and len(events) == self._last.shape[0]
        for row, event in enumerate(events):
            self.by_seq.setdefault(event.seq_id, []).append(self._last[row])

    def logits(self, seq: SequenceState) -> torch.Tensor:
        return torch.stack(self.by_seq[seq.seq_id])  # [generated tokens, vocab]


def make_engine(folder: Path, block_size: int = 4, kv_cache_bytes: int = 2**20,
                quantize: bool = True) -> Engine:
    return Engine(model_spec(folder), iter_weights(folder),
                  EngineConfig(quantize=quantize, num_slots=2, max_rank=16, block_size=block_size,
                               kv_cache_bytes=kv_cache_bytes))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model("llama", tmp_path_factory.mktemp("kv") / "llama")


# -- the allocator -----------------------------------------------------------------------------------


def test_grow_and_release_blocks() -> None:
    cache = PagedKVCache(num_layers=2, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8,
                         dtype=torch.float32, device=torch.device("cpu"))
    table: list[int] = []
    cache.grow(table, 1)
    assert len(table) == 1 and cache.free_blocks == 4
    cache.grow(table, 4)  # still fits the first block
    assert len(table) == 1
    cache.grow(table, 5)
    assert len(table) == 2 and cache.free_blocks == 3
    first_two = list(table)
    cache.grow(table, 3)  # shrinking never frees
    assert table == first_two
    other: list[int] = []
    cache.grow(other, 12)
    assert len(other) == 3 and cache.free_blocks == 0
    assert sorted(table + other) == list(range(5)), "every block handed out once"
    assert cache.rows(table, 2, 6) == [table[0] * 4 + 2, table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    with pytest.raises(OutOfBlocks, match="need 1 KV blocks, 0 free"):
        cache.grow(table, 9)
    assert table == first_two, "a failed grow appends nothing"
    cache.release(other)
    assert other == [] and cache.free_blocks == 3
    with pytest.raises(OutOfBlocks):
        cache.grow(table, 4 * 6)  # needs 4 more, 3 free: all or nothing
    assert table == first_two and cache.free_blocks == 3
    cache.grow(table, 20)
    assert len(table) == 5 and cache.free_blocks == 0
    cache.release(table)
    assert table == [] and cache.free_blocks == 5


def test_blocks_needed() -> None:
    cache = PagedKVCache(1, 4, 16, 1, 4, torch.float32, torch.device("cpu"))
    assert [cache.blocks_needed(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize(("dtype", "element"), [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_blocks_for_budget(dtype: torch.dtype, element: int) -> None:
    layers, block_size, kv_heads, head_dim = 3, 16, 2, 32
    block_bytes = 2 * layers * block_size * kv_heads * head_dim * element  # keys and values
    shape = (layers, block_size, kv_heads, head_dim, dtype)
    assert PagedKVCache.blocks_for_budget(block_bytes * 7, *shape) == 7
    assert PagedKVCache.blocks_for_budget(block_bytes * 8 - 1, *shape) == 7
    assert PagedKVCache.blocks_for_budget(block_bytes - 1, *shape) == 0
    cache = PagedKVCache(layers, 7, block_size, kv_heads, head_dim, dtype, torch.device("cpu"))
    assert cache.resident_bytes() == block_bytes * 7


def test_engine_sizes_the_cache_from_its_budget(llama: Path) -> None:
    spec = model_spec(llama)
    block_bytes = 2 * spec.num_layers * 8 * spec.num_kv_heads * spec.head_dim * 4  # float32 on CPU
    engine = make_engine(llama, block_size=8, kv_cache_bytes=block_bytes * 5 + block_bytes // 2)
    assert engine.cache.num_blocks == engine.cache.free_blocks == 5
    assert engine.cache.resident_bytes() == block_bytes * 5
    with pytest.raises(ValueError, match="does not hold a single block"):
        make_engine(llama, block_size=8, kv_cache_bytes=block_bytes - 1)


# -- OutOfBlocks and block reuse on the engine -------------------------------------------------------


def test_out_of_blocks_from_step_changes_nothing(llama: Path) -> None:
    spec = model_spec(llama)
    block_bytes = 2 * spec.num_layers * 4 * spec.num_kv_heads * spec.head_dim * 4
    engine = make_engine(llama, block_size=4, kv_cache_bytes=block_bytes * 5)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)  # 12 + 6 tokens fit the 5 blocks
    first = engine.add_sequence(prompt(12, seed=1), params)
    engine.step([(first, 12)])  # 3 blocks; its next decode needs a 4th
    second = engine.add_sequence(prompt(8, seed=2), params)  # needs 2 more: 3 > 2 free
    free, table, outputs = engine.cache.free_blocks, list(first.block_table), list(first.output_ids)
    keys, values = engine.cache.keys.clone(), engine.cache.values.clone()
    with pytest.raises(OutOfBlocks, match="step needs 3 KV blocks, 2 free"):
        engine.step([(first, 1), (second, 8)])
    assert engine.cache.free_blocks == free == 2
    assert first.block_table == table and first.num_computed == 12 and first.output_ids == outputs
    assert second.block_table == [] and second.num_computed == 0 and second.output_ids == []
    assert torch.equal(engine.cache.keys, keys) and torch.equal(engine.cache.values, values)
    with pytest.raises(ValueError, match="cannot run 2 of 1 pending"):
        engine.step([(first, 1), (second, 2), (first, 2)])
    assert engine.cache.free_blocks == 2 and first.num_computed == 12 and second.num_computed == 0
    # the engine carries on as if the failed steps never happened
    while not first.finished:
        engine.step([(first, 1)])
    fresh = make_engine(llama)
    assert first.output_ids == fresh.generate([first.prompt_ids], params)[0]
    assert engine.cache.free_blocks == 5


def test_blocks_return_to_the_pool_when_sequences_finish(llama: Path) -> None:
    engine = make_engine(llama, block_size=4)
    total = engine.cache.num_blocks
    short = engine.add_sequence(prompt(6, seed=3), SamplingParams(max_new_tokens=2, ignore_eos=True))
    long = engine.add_sequence(prompt(9, seed=4), SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.step([(short, 6), (long, 9)])
    assert engine.cache.free_blocks == total - 2 - 3
    events = engine.step([(short, 1), (long, 1)])
    assert [e.finish_reason for e in events] == [FinishReason.LENGTH, None]
    assert short.block_table == [] and short.num_computed == 0
    assert engine.cache.free_blocks == total - 3, "the long sequence keeps its 3 blocks (11 positions)"
    while not long.finished:
        engine.step([(long, 1)])
    assert long.block_table == [] and engine.cache.free_blocks == total
    engine.generate([prompt(n, seed=n) for n in (3, 17, 8)], GREEDY)
    assert engine.cache.free_blocks == total
    with pytest.raises(ValueError, match="cannot run"):
        engine.step([(long, 1)])  # a finished sequence cannot be stepped


# -- chunked prefill ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_with_adapter(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"chunk_{request.param}")
    base = write_tiny_model(request.param, root / "base")
    adapter = write_adapter(base, AdapterSpec("qvo", 8, ("q_proj", "v_proj", "o_proj", "down_proj")),
                            root / "adapter", seed=5)
    return base, adapter


def test_chunked_prefill_matches_one_chunk(arch_with_adapter: tuple[Path, Path]) -> None:
    base, adapter = arch_with_adapter
    prompts = [prompt(23, seed=11), prompt(6, seed=12), prompt(14, seed=13)]
    slots = [0, -1, 0]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def run(chunks: list[list[int]] | None) -> tuple[list[list[int]], list[torch.Tensor]]:
        engine = make_engine(base, block_size=4)
        engine.set_slot(0, read_lora_weights(adapter))
        recorder = LogitsRecorder(engine)
        seqs = [engine.add_sequence(p, params, s) for p, s in zip(prompts, slots, strict=True)]
        if chunks is None:  # every prompt in one chunk, all in one step
            recorder.step([(s, s.num_pending) for s in seqs])
        else:  # step i runs chunks[seq][i] tokens of each sequence still prefilling, decodes the others
            for i in range(max(len(c) for c in chunks)):
                batch = []
                for seq, plan in zip(seqs, chunks, strict=True):
                    if i < len(plan):
                        batch.append((seq, plan[i]))
                    elif not seq.finished:
                        batch.append((seq, 1))
                recorder.step(batch)
        while not all(s.finished for s in seqs):
            recorder.step([(s, 1) for s in seqs if not s.finished])
        assert engine.cache.free_blocks == engine.cache.num_blocks
        return [s.output_ids for s in seqs], [recorder.logits(s) for s in seqs]

    one_tokens, one_logits = run(None)
    # chunks cross block boundaries and mistral's 8-token window; a 1-token chunk that is not the last
    # runs next to decode tokens; the short prompt finishes prefill early and decodes beside the others
    chunk_tokens, chunk_logits = run([[5, 7, 1, 10], [6], [3, 1, 4, 6]])
    assert chunk_tokens == one_tokens
    for row, (actual, expected) in enumerate(zip(chunk_logits, one_logits, strict=True)):
        assert actual.shape == expected.shape == (8, 96)
        assert relative_error(actual, expected) <= 1e-5, f"row {row}"
    assert len({tuple(t) for t in one_tokens}) == 3


# -- preemption and block size -----------------------------------------------------------------------


@pytest.mark.parametrize("preempt_after", [0, 1, 5])
def test_preempted_sequence_continues_with_the_same_output(llama: Path, preempt_after: int) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    target = prompt(13, seed=21)
    reference = make_engine(llama)
    reference_recorder = LogitsRecorder(reference)
    ref_seq = reference.add_sequence(target, params)
    reference_recorder.step([(ref_seq, 13)])
    while not ref_seq.finished:
        reference_recorder.step([(ref_seq, 1)])

    engine = make_engine(llama)
    recorder = LogitsRecorder(engine)
    seq = engine.add_sequence(target, params)
    if preempt_after == 0:
        recorder.step([(seq, 6)])  # preempted in the middle of its prefill
    else:
        recorder.step([(seq, 13)])
        for _ in range(preempt_after - 1):
            recorder.step([(seq, 1)])
    engine.release(seq)
    assert seq.block_table == [] and seq.num_computed == 0
    assert engine.cache.free_blocks == engine.cache.num_blocks
    # another sequence takes (and overwrites) the freed blocks before the preempted one comes back
    intruder = engine.add_sequence(prompt(16, seed=22), SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.step([(intruder, 16)])
    assert seq.num_pending == 13 + preempt_after
    recorder.step([(seq, seq.num_pending), (intruder, 1)])  # recompute prompt + outputs so far, in one chunk
    while not seq.finished:
        recorder.step([(s, 1) for s in (seq, intruder) if not s.finished])
    assert seq.output_ids == ref_seq.output_ids
    assert relative_error(recorder.logits(seq), reference_recorder.logits(ref_seq)) <= 1e-5


def test_block_size_does_not_change_outputs(llama: Path) -> None:
    prompts = [prompt(n, seed=30 + n) for n in (1, 5, 16, 17, 31)]
    results = {}
    for block_size in (1, 16, 3):
        engine = make_engine(llama, block_size=block_size)
        recorder = LogitsRecorder(engine)
        seqs = [engine.add_sequence(p, GREEDY) for p in prompts]
        recorder.step([(s, s.num_pending) for s in seqs])
        while not all(s.finished for s in seqs):
            recorder.step([(s, 1) for s in seqs if not s.finished])
        results[block_size] = ([s.output_ids for s in seqs], torch.stack([recorder.logits(s) for s in seqs]))
    tokens_1, logits_1 = results[1]
    for block_size in (16, 3):
        tokens, logits = results[block_size]
        assert tokens == tokens_1, f"block_size {block_size}"
        assert relative_error(logits, logits_1) <= 1e-5, f"block_size {block_size}"


# -- refcounts and the cached blocks (prefix cache) --------------------------------------------------


def small_cache(num_blocks: int) -> PagedKVCache:
    return PagedKVCache(1, num_blocks, 4, 1, 4, torch.float32, torch.device("cpu"))


def test_shared_blocks_are_refcounted_and_freed_once() -> None:
    cache = small_cache(6)
    first: list[int] = []
    cache.grow(first, 10)  # 2 full blocks and a partial one
    cache.register(first[0], b"k0")
    cache.register(first[1], b"k1")
    assert cache.cached_blocks == 2 and cache.free_blocks == 3
    second: list[int] = []
    cache.share(second, [cache.cached(b"k0"), cache.cached(b"k1")])
    cache.grow(second, 9)
    assert second[:2] == first[:2] and [cache.refcount(b) for b in second] == [2, 2, 1]
    assert cache.free_blocks == 2, "a shared block is held once"
    cache.release(first)
    assert cache.free_blocks == 3 and [cache.refcount(b) for b in second] == [1, 1, 1], "only the private block"
    cache.release(second)
    assert cache.free_blocks == 6 and cache.cached_blocks == 2, "released cached blocks stay cached"
    third: list[int] = []
    cache.share(third, [cache.cached(b"k0")])
    assert cache.free_blocks == 5 and cache.refcount(third[0]) == 1
    cache.release(third)


def test_a_key_keeps_its_first_block() -> None:
    cache = small_cache(4)
    first, second = [], []
    cache.grow(first, 4)
    cache.grow(second, 4)
    cache.register(first[0], b"same")
    cache.register(second[0], b"same")  # computed twice at once: the second copy stays private
    assert cache.cached(b"same") == first[0] and cache.cached_blocks == 1
    cache.release(second)
    cache.release(first)
    assert cache.free_blocks == 4 and cache.cached_blocks == 1


def test_eviction_takes_empty_blocks_first_then_least_recently_released() -> None:
    cache = small_cache(4)
    old, new = [], []
    cache.grow(old, 8)
    cache.grow(new, 4)
    for block, key in zip(old + new, (b"old0", b"old1", b"new0"), strict=True):
        cache.register(block, key)
    cache.release(old)  # released first: its last block is the least recently used, then its first
    cache.release(new)
    assert cache.free_blocks == 4 and cache.cached_blocks == 3
    taken: list[int] = []
    cache.grow(taken, 4)  # the one block that holds nothing
    assert cache.cached_blocks == 3
    cache.grow(taken, 8)
    assert cache.cached(b"old1") is None and cache.cached(b"old0") is not None, "a chain loses its tail first"
    cache.grow(taken, 12)
    assert cache.cached(b"old0") is None and cache.cached(b"new0") is not None
    with pytest.raises(OutOfBlocks):
        cache.grow(taken, 20)  # 2 more, 1 free: nothing changes
    assert len(taken) == 3 and cache.cached(b"new0") is not None and cache.free_blocks == 1
    cache.grow(taken, 16)
    assert cache.cached_blocks == 0 and cache.free_blocks == 0
    assert sorted(taken) == [0, 1, 2, 3]
