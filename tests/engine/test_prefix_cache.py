"""Prefix cache: keys, reuse that gives bit-identical logits, version and salt safety, the partial last
block, OutOfBlocks with shared blocks, and the engine.prefix_cache switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_kv_cache import LogitsRecorder, prompt

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.engine import Engine, EngineConfig, SamplingParams, SequenceState
from loraplex.server.engine.kv_cache import OutOfBlocks
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.prefix_cache import BlockChain, block_key, chain_root
from loraplex.server.model_files import iter_weights, model_spec
from support import ARCHITECTURES, AdapterSpec, write_adapter, write_tiny_model

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
V1, V2 = "1" * 64, "2" * 64


def make_engine(folder: Path, prefix_cache: bool = True, kv_cache_bytes: int = 2**20) -> Engine:
    return Engine(model_spec(folder), iter_weights(folder),
                  EngineConfig(num_slots=2, max_rank=16, block_size=4, kv_cache_bytes=kv_cache_bytes,
                               prefix_cache=prefix_cache), base_digest="b" * 64)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp(f"prefix_{request.param}")
    base = write_tiny_model(request.param, root / "base")
    first = write_adapter(base, AdapterSpec("one", 8, ("q_proj", "k_proj", "v_proj", "down_proj")), root / "a",
                          seed=3)
    second = write_adapter(base, AdapterSpec("two", 8, ("q_proj", "k_proj", "v_proj", "down_proj")), root / "b",
                           seed=4)
    return base, first, second


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model("llama", tmp_path_factory.mktemp("prefix") / "llama")


def run(recorder: LogitsRecorder, seq: SequenceState, chunks: list[int]) -> None:
    """Prefill `seq` in `chunks` (after whatever it reused), then decode it to the end."""
    for count in chunks:
        recorder.step([(seq, count)])
    while not seq.finished:
        recorder.step([(seq, 1)])


# -- keys --------------------------------------------------------------------------------------------


def test_keys_separate_base_version_and_salt() -> None:
    roots = {chain_root(base, version, salt) for base in ("b1", "b2") for version in ("", V1, V2)
             for salt in ("", "tenant", "other")}
    assert len(roots) == 18
    assert chain_root("b", "", "") == chain_root("b", "base", ""), "the base model's version is 'base'"
    root = chain_root("b", V1, "")
    chain = BlockChain(root, 4)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert chain.key(1, tokens) == block_key(block_key(root, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert chain.keys == [block_key(root, [1, 2, 3, 4]), chain.key(1, tokens)]
    other = BlockChain(root, 4)
    assert other.key(1, [9, 2, 3, 4, 5, 6, 7, 8]) != chain.key(1, tokens), "a block's key covers every earlier token"


# -- reuse gives the very same numbers ---------------------------------------------------------------


def test_reused_blocks_give_bit_identical_logits(family: tuple[Path, Path, Path]) -> None:
    """A sequence started from cached blocks computes exactly what it computes when it prefills them in
    the same chunks itself, for base rows and adapter rows (each reusing only its own version's blocks)."""
    base, adapter, _ = family
    shared = prompt(12, seed=1)  # 3 full blocks
    first, second = shared + prompt(5, seed=2), shared + prompt(7, seed=3)

    def outputs(prefix_cache: bool) -> tuple[list[list[int]], list[torch.Tensor], list[int]]:
        engine = make_engine(base, prefix_cache)
        engine.set_slot(0, read_lora_weights(adapter))
        recorder = LogitsRecorder(engine)
        seqs, reused = [], []
        for slot, version in ((NO_ADAPTER, ""), (0, V1)):
            for tokens in (first, second):
                seq = engine.add_sequence(tokens, PARAMS, slot, version)
                reused.append(engine.reuse_prefix(seq))
                run(recorder, seq, [len(tokens) - 12] if seq.num_computed else [12, len(tokens) - 12])
                seqs.append(seq)
        assert engine.cache.free_blocks == engine.cache.num_blocks
        return [s.output_ids for s in seqs], [recorder.logits(s) for s in seqs], reused

    cached_tokens, cached_logits, reused = outputs(prefix_cache=True)
    plain_tokens, plain_logits, none_reused = outputs(prefix_cache=False)
    assert reused == [0, 12, 0, 12], "the second prompt of each version reuses the 3 shared blocks, only them"
    assert none_reused == [0, 0, 0, 0]
    assert cached_tokens == plain_tokens
    for row, (actual, expected) in enumerate(zip(cached_logits, plain_logits, strict=True)):
        assert torch.equal(actual, expected), f"row {row}"
    assert not torch.equal(cached_logits[0], cached_logits[2]), "the adapter changes the output (the test can " \
        "tell versions apart)"


def test_reuse_within_a_mixed_batch_matches_no_cache(llama: Path) -> None:
    """Sequences started from cached prefixes decode next to others in one batch; greedy tokens equal a
    run without the cache, logits within chunked-prefill rounding."""
    system = prompt(16, seed=5)
    prompts = [system + prompt(n, seed=10 + n) for n in (3, 6, 9)] + [prompt(11, seed=7)]

    def outputs(prefix_cache: bool) -> list[list[int]]:
        engine = make_engine(llama, prefix_cache)
        warm = engine.add_sequence([*system, 1], PARAMS, version="")
        engine.step([(warm, warm.num_pending)])
        engine.release(warm)  # its 4 full blocks stay cached
        return engine.generate(prompts, PARAMS, versions=[""] * len(prompts))

    assert outputs(True) == outputs(False)


# -- version and salt safety -------------------------------------------------------------------------


def test_same_slot_new_version_never_reuses_old_blocks(llama: Path, tmp_path: Path) -> None:
    """An adapter replaced in its slot under the same name: the new version's digest keys its blocks, so it
    prefills in full and matches a fresh engine. Keyed by the name instead, it would reuse version 1's
    blocks and answer differently (checked, so the test can fail)."""
    one = write_adapter(llama, AdapterSpec("support", 8, ("k_proj", "v_proj")), tmp_path / "v1", seed=8)
    two = write_adapter(llama, AdapterSpec("support", 8, ("k_proj", "v_proj")), tmp_path / "v2", seed=9)
    tokens = prompt(13, seed=11)

    def serve(first: str, second: str) -> tuple[int, list[int]]:
        engine = make_engine(llama)
        engine.set_slot(0, read_lora_weights(one))
        engine.generate([tokens], PARAMS, slots=[0], versions=[first])
        engine.set_slot(0, read_lora_weights(two))  # the same slot, the same name, new weights
        seq = engine.add_sequence(tokens, PARAMS, 0, second)
        reused = engine.reuse_prefix(seq)
        run(LogitsRecorder(engine), seq, [seq.num_pending])
        return reused, seq.output_ids

    fresh = make_engine(llama)
    fresh.set_slot(0, read_lora_weights(two))
    expected = fresh.generate([tokens], PARAMS, slots=[0])[0]
    assert serve(V1, V2) == (0, expected)
    name_keyed = serve("support", "support")
    assert name_keyed[0] == 12 and name_keyed[1] != expected, "a name-keyed cache serves version 1's KV"


def test_salted_sequences_share_only_with_the_same_salt(llama: Path) -> None:
    engine = make_engine(llama)
    tokens = prompt(9, seed=12)
    engine.generate([tokens], PARAMS, versions=[""])
    reused = {}
    for salt in ("tenant-a", "", "tenant-b", "tenant-a"):
        seq = engine.add_sequence(tokens, PARAMS, version="", cache_salt=salt)
        reused.setdefault(salt, []).append(engine.reuse_prefix(seq))
        run(LogitsRecorder(engine), seq, [seq.num_pending])
    assert reused == {"": [8], "tenant-a": [0, 8], "tenant-b": [0]}


def test_sequences_without_a_version_stay_out_of_the_cache(llama: Path) -> None:
    engine = make_engine(llama)
    tokens = prompt(9, seed=13)
    engine.generate([tokens], PARAMS)  # no version: nothing cached
    assert engine.cache.cached_blocks == 0
    engine.generate([tokens], PARAMS, versions=[""])
    assert engine.cache.cached_blocks == 3, "9 prompt tokens + 5 computed outputs: 3 full blocks"
    seq = engine.add_sequence(tokens, PARAMS)
    assert engine.reuse_prefix(seq) == 0


def test_prefix_cache_off_caches_nothing(llama: Path) -> None:
    engine = make_engine(llama, prefix_cache=False)
    tokens = prompt(9, seed=14)
    engine.generate([tokens, tokens], PARAMS, versions=["", ""])
    seq = engine.add_sequence(tokens, PARAMS, version="")
    assert engine.reuse_prefix(seq) == 0 and engine.cache.cached_blocks == 0


# -- blocks: the partial last block, accounting, OutOfBlocks -----------------------------------------


def test_partial_last_block_is_never_shared(llama: Path) -> None:
    engine = make_engine(llama)
    total = engine.cache.num_blocks
    holder = engine.add_sequence(prompt(10, seed=15), SamplingParams(max_new_tokens=3, ignore_eos=True), version="")
    engine.step([(holder, 10)])
    assert engine.cache.cached_blocks == 2, "positions 8 and 9 fill no block"
    partial = holder.block_table[2]
    same = engine.add_sequence(holder.prompt_ids, PARAMS, version="")
    assert engine.reuse_prefix(same) == 8 and same.block_table == holder.block_table[:2]
    engine.step([(same, 2), (holder, 1)])
    assert partial not in same.block_table, "the partial block is computed again, privately"
    assert [engine.cache.refcount(b) for b in same.block_table] == [2, 2, 1]
    assert engine.cache.free_blocks == total - 4, "2 shared blocks and 2 private ones"
    whole = engine.add_sequence(prompt(8, seed=16), PARAMS, version="")
    engine.step([(whole, 8)])
    engine.release(whole)
    again = engine.add_sequence(whole.prompt_ids, PARAMS, version="")
    assert engine.reuse_prefix(again) == 4, "a prompt of exactly 2 blocks still computes its last one"
    engine.release(again)
    engine.release(same)
    engine.release(holder)
    assert engine.cache.free_blocks == total


def test_out_of_blocks_with_shared_blocks_changes_nothing(llama: Path) -> None:
    spec = model_spec(llama)
    block_bytes = 2 * spec.num_layers * 4 * spec.num_kv_heads * spec.head_dim * 4
    engine = make_engine(llama, kv_cache_bytes=6 * block_bytes)
    system = prompt(8, seed=17)
    holder = engine.add_sequence(system + prompt(4, seed=18), PARAMS, version="")
    engine.step([(holder, 12)])  # 3 blocks, all cached
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    reader = engine.add_sequence(system + prompt(9, seed=19), short, version="")
    assert engine.reuse_prefix(reader) == 8
    assert engine.cache.free_blocks == 3
    state = (engine.cache.free_blocks, engine.cache.cached_blocks, list(holder.block_table), list(reader.block_table),
             [engine.cache.refcount(b) for b in range(engine.cache.num_blocks)])
    keys = engine.cache.keys.clone()
    with pytest.raises(OutOfBlocks, match="step needs 4 KV blocks, 3 free"):
        engine.step([(reader, 9), (holder, 1)])  # reader needs 3 more (17 positions), holder 1 (13)
    assert state == (engine.cache.free_blocks, engine.cache.cached_blocks, holder.block_table, reader.block_table,
                     [engine.cache.refcount(b) for b in range(engine.cache.num_blocks)])
    assert reader.num_computed == 8 and holder.num_computed == 12 and torch.equal(engine.cache.keys, keys)
    engine.step([(reader, 9)])
    while not reader.finished:
        engine.step([(reader, 1)])
    expected = make_engine(llama, prefix_cache=False).generate([reader.prompt_ids], short)[0]
    assert reader.output_ids == expected
    engine.release(holder)
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_reuse_prefix_refuses_a_started_sequence(llama: Path) -> None:
    engine = make_engine(llama)
    seq = engine.add_sequence(prompt(6, seed=20), PARAMS, version="")
    engine.step([(seq, 3)])
    with pytest.raises(ValueError, match="has started"):
        engine.reuse_prefix(seq)
