"""CUDA-graph decode (cuda_graphs.py): buckets, the static step's buffers and forward against the eager step
(across KV growth into new blocks, a hot-swapped slot and padding rows), and, on CUDA, captured graphs
against eager decoding.

Off CUDA the static step runs eagerly with the table's CUDA LoRA op and decode attention forced
(kernel_choice patched; the kernels interpreted, see tests/conftest.py): graph capture and replay
themselves need a GPU and run in the `gpu` test only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.engine import Engine, EngineConfig, SamplingParams, kernel_choice
from loraplex.server.engine.cuda_graphs import BUCKETS, StaticDecodeStep, bucket_for, is_plain_decode
from loraplex.server.model_files import iter_weights, model_spec
from support import MIXED_ADAPTERS, write_adapter, write_tiny_model

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BLOCK_SIZE = 2  # a decode step crosses into a new KV block every other token


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny llama and three adapters: r4 on q/v, r16 on all projections, r8 on k/gate."""
    root = tmp_path_factory.mktemp("graphs")
    base = write_tiny_model("llama", root / "base")
    specs = [MIXED_ADAPTERS[i] for i in (0, 1, 3)]
    return base, [write_adapter(base, spec, root / spec.name, seed=40 + i) for i, spec in enumerate(specs)]


def cuda_row_engine(base: Path, monkeypatch, **config: object) -> Engine:
    """An engine on the table's CUDA LoRA op and decode attention (what a static step needs): its own choice
    on CUDA, forced (kernel_choice patched) elsewhere. Off CUDA the NF4 base stays on the CPU's kernel: the
    static step runs whatever the projections run, and nf4_triton has its own tests."""
    with monkeypatch.context() as patch:
        if not ON_CUDA:
            patch.setattr(kernel_choice, "lora_impl", lambda *_: "triton")
            patch.setattr(kernel_choice, "decode_attention", lambda *_: "triton")
        engine = Engine(model_spec(base), iter_weights(base), EngineConfig(
            device=DEVICE, compute_dtype="float32", num_slots=2, max_rank=16, block_size=BLOCK_SIZE,
            kv_cache_bytes=2**22, **config))
    assert (engine.lora_impl, engine.decode_attention) == ("triton", "triton")
    assert engine.nf4_plan.kernel == ("nf4_triton" if ON_CUDA else "nf4_cpu")
    return engine


def test_a_step_replays_the_smallest_bucket_that_holds_it() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 16, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert bucket_for(BUCKETS[-1] + 1) is None


def test_only_plain_decode_steps_are_replayed(tiny_model, monkeypatch) -> None:
    engine = cuda_row_engine(tiny_model[0], monkeypatch)
    decoding = engine.add_sequence([1, 2, 3], SamplingParams(max_new_tokens=4))
    with_logprobs = engine.add_sequence([1, 2, 3], SamplingParams(max_new_tokens=4, prompt_logprobs=True))
    engine.step([(decoding, 3), (with_logprobs, 3)])
    prefilling = engine.add_sequence([4, 5, 6], SamplingParams(max_new_tokens=4))
    assert is_plain_decode([(decoding, 1)])
    assert not is_plain_decode([(decoding, 1), (prefilling, 1)])  # a prefill chunk of one token is not decode
    assert not is_plain_decode([(decoding, 1), (with_logprobs, 1)])


def test_the_static_step_computes_what_the_eager_step_does(tiny_model, monkeypatch) -> None:
    """Three sequences (two adapters of different ranks and targets, one base) in a bucket of 4 (one padding
    row): each decode step's logits from the static buffers equal the eager step's that follows it, while
    the contexts grow into new blocks and slot 1 is hot-swapped to another adapter mid-way."""
    base, adapters = tiny_model
    engine = cuda_row_engine(base, monkeypatch)
    engine.set_slot(0, read_lora_weights(adapters[0]))
    engine.set_slot(1, read_lora_weights(adapters[1]))
    prompts = ([5, 6, 7], [1, 2, 3, 4], [11, 12])
    seqs = [engine.add_sequence(p, SamplingParams(max_new_tokens=8, ignore_eos=True), slot)
            for p, slot in zip(prompts, (0, -1, 1), strict=True)]
    engine.step([(s, s.num_pending) for s in seqs])
    cache = engine.cache
    static = StaticDecodeStep(bucket_for(len(seqs)), cache.blocks_needed(engine.max_model_len), engine.num_slots,
                              engine.config.max_rank, cache.block_size, engine.device)
    eager: list[torch.Tensor] = []
    forward = engine.model.forward

    def recording_forward(*args: object) -> torch.Tensor:  # test-only instrumentation
        eager.append(forward(*args))
        return eager[-1]

    engine.model.forward = recording_forward
    for step in range(2):
        if step == 1:
            engine.set_slot(1, read_lora_weights(adapters[2]))  # a hot-swap: a copy into the slot
        batch = [(s, 1) for s in seqs]
        for seq in seqs:  # the blocks the step needs, as engine.step reserves them
            cache.grow(seq.block_table, seq.num_computed + 1)
        static.fill(batch, cache, engine.slot_ranks)
        replayed = static.forward(engine.model, cache)[:len(seqs)]  # [3, vocab]
        engine.step(batch)
        torch.testing.assert_close(replayed, eager[-1], rtol=1e-5, atol=1e-5)
    assert [len(s.block_table) for s in seqs] == [3, 3, 2]  # each grew by a block: 5, 6 and 4 positions


def test_cuda_graphs_are_refused_without_the_cuda_kernels(tiny_model) -> None:
    base = tiny_model[0]
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device with Triton"):
        Engine(model_spec(base), iter_weights(base), EngineConfig(
            device=DEVICE, cuda_graphs=True, lora_impl="grouped", num_slots=1, max_rank=8, kv_cache_bytes=2**20))


@pytest.mark.gpu
def test_replayed_graphs_decode_what_eager_steps_decode(tiny_model, monkeypatch) -> None:
    """Greedy decoding of a mixed batch, graphs on vs off, across buckets (3 then 2 sequences as one
    finishes early), KV growth and a slot hot-swapped between two generate calls."""
    base, adapters = tiny_model
    engines = [cuda_row_engine(base, monkeypatch, cuda_graphs=on) for on in (True, False)]
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (12, 12, 5)]
    outputs = []
    for engine in engines:
        engine.set_slot(0, read_lora_weights(adapters[0]))
        engine.set_slot(1, read_lora_weights(adapters[1]))
        first = engine.generate(prompts, params, slots=[0, -1, 1])
        engine.set_slot(1, read_lora_weights(adapters[2]))
        outputs.append((first, engine.generate(prompts, params, slots=[1, 0, -1])))
    assert engines[0].decode_graphs.captured == [2, 4] and engines[1].decode_graphs is None
    assert outputs[0] == outputs[1]
