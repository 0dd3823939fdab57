"""Engine.step's per-row extras: token constraints (bitmasks applied to constrained rows only, in mixed-adapter
batches) and prompt log-probabilities (full-prompt logits for the asking rows only, chunked prefill, no
prefix-cache reuse), against solo runs and transformers' own logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.server.engine import FinishReason, SamplingParams, lora_cpu, nf4_cpu
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.sampling import allowed_tokens
from serving_support import generate_alone, make_engine
from support import MIXED_ADAPTERS, write_adapter, write_tiny_model


class EvenTokens:
    """A TokenConstraint: only even token ids below `limit`, terminated after `length` tokens."""

    def __init__(self, limit: int, length: int) -> None:
        self.limit, self.length, self.taken = limit, length, []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        allowed = torch.zeros(bitmask.shape[1] * 32, dtype=torch.bool)
        allowed[0:self.limit:2] = True
        words = allowed.view(-1, 32).to(torch.int64) << torch.arange(32)  # [words, 32]
        bitmask[row] = words.sum(-1).to(torch.int64).remainder(2**32).to(torch.uint32).view(torch.int32)

    def advance(self, token_id: int) -> None:
        self.taken.append(token_id)

    @property
    def terminated(self) -> bool:
        return len(self.taken) >= self.length


def test_allowed_tokens_unpacks_bits_in_order():
    bitmask = torch.tensor([[0b101, -2**31], [0, 1]], dtype=torch.int32)  # [2 rows, 2 words]
    allowed = allowed_tokens(bitmask, 64)
    assert allowed.shape == (2, 64) and allowed[0].nonzero().flatten().tolist() == [0, 2, 63]
    assert allowed[1].nonzero().flatten().tolist() == [32]
    assert allowed_tokens(bitmask, 40)[0].nonzero().flatten().tolist() == [0, 2]  # beyond the vocabulary: cut


def test_constrained_rows_keep_their_rule_and_free_rows_get_their_solo_tokens(tmp_path):
    base = write_tiny_model("llama", tmp_path / "base")
    adapters = {s.name: write_adapter(base, s, tmp_path / s.name, seed=10 + i) for i, s in enumerate(MIXED_ADAPTERS)}
    engine = make_engine(base, adapters, prefix_cache=False)
    names = ["", *adapters]
    prompts = [[(7 * i + j) % 96 for j in range(5 + 3 * i)] for i in range(len(names))]
    free_params = [SamplingParams(max_new_tokens=8, ignore_eos=True,
                                  **({"temperature": 0.9, "seed": i} if i % 2 else {})) for i in range(len(names))]
    alone = [generate_alone(engine, adapters, p, name, s) for p, name, s in zip(prompts, names, free_params,
                                                                                strict=True)]
    seqs, rules = [], []
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        slot = NO_ADAPTER if name == "" else list(adapters).index(name)
        seqs.append(engine.add_sequence(prompt, free_params[i], slot))
        rule = EvenTokens(limit=20, length=5)
        rules.append(rule)
        seqs.append(engine.add_sequence(prompt[::-1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=i),
                                        slot, constraint=rule))
    running = list(seqs)
    while running:
        engine.step([(seq, seq.num_pending) for seq in running])
        running = [seq for seq in running if not seq.finished]
    assert [seqs[2 * i].output_ids for i in range(len(names))] == alone
    for rule, seq in zip(rules, seqs[1::2], strict=True):
        assert seq.output_ids == rule.taken and len(seq.output_ids) == 5 and seq.finish_reason == FinishReason.STOP
        assert all(token < 20 and token % 2 == 0 for token in seq.output_ids)


def test_prompt_logprobs_match_transformers_and_skip_the_prefix_cache(tmp_path):
    base = write_tiny_model("qwen2", tmp_path / "base")
    engine = make_engine(base, quantize=False)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompt = [(11 * j + 3) % 96 for j in range(23)]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0]  # [len(prompt), vocab]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    engine.generate([prompt], SamplingParams(max_new_tokens=1), versions=[""])  # its blocks are cached now
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=True, top_logprobs=2)
    seq = engine.add_sequence(prompt, params, version="")
    assert engine.reuse_prefix(seq) == 0
    free = engine.add_sequence(prompt[:9], SamplingParams(max_new_tokens=2))
    events = []
    for chunk in (7, 10, 6):  # chunked prefill next to a row that asks for nothing
        events += engine.step([(seq, chunk)] + ([(free, free.num_pending)] if not free.finished else []))
    first = next(e for e in events if e.seq_id == seq.seq_id)
    got = torch.tensor([entry.logprob for entry in first.prompt_logprobs])
    assert len(first.prompt_logprobs) == len(prompt) - 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert all(len(entry.top_logprobs) == 2 for entry in first.prompt_logprobs)
    assert all(e.prompt_logprobs is None for e in events if e.seq_id == free.seq_id)
    later = engine.step([(seq, 1)])
    assert later[0].prompt_logprobs is None


def test_a_step_paused_between_layers_for_another_step_gives_the_uninterrupted_tokens(tmp_path):
    """A long prefill (plus a decode) pauses after layer 0 while a second step prefills and decodes other sequences
    to the end; then it resumes. Every sequence gets the tokens it gets in steps that never pause, and while the
    first step is paused a step over one of its sequences is refused."""
    base = write_tiny_model("llama", tmp_path / "base")
    adapters = {s.name: write_adapter(base, s, tmp_path / s.name, seed=20 + i) for i, s in enumerate(MIXED_ADAPTERS)}
    engine = make_engine(base, adapters, prefix_cache=False)
    long_prompt, short_prompts = [(5 * j + 1) % 96 for j in range(40)], [[3, 9, 27, 81], [11, 22, 33]]
    greedy, seeded = SamplingParams(max_new_tokens=6, ignore_eos=True), SamplingParams(
        max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=4)

    def run(pause: bool) -> list[list[int]]:
        decoding = engine.add_sequence([1, 2, 3], seeded, 0)
        engine.step([(decoding, 3)])
        long = engine.add_sequence(long_prompt, greedy, 1)
        shorts = [engine.add_sequence(p, greedy, slot) for p, slot in zip(short_prompts, (NO_ADAPTER, 2),
                                                                        strict=True)]
        calls = []

        def between_layers() -> None:
            calls.append(len(calls))
            if len(calls) == 1:
                with pytest.raises(ValueError, match="not returned"):
                    engine.step([(decoding, 1)])
                engine.step([(s, s.num_pending) for s in shorts])
                while not all(s.finished for s in shorts):
                    engine.step([(s, 1) for s in shorts if not s.finished])

        engine.step([(long, long.num_pending), (decoding, 1)], between_layers if pause else None)
        assert len(calls) == (engine.spec.num_layers - 1 if pause else 0)
        if not pause:
            for seq in shorts:
                engine.step([(seq, seq.num_pending)])
                while not seq.finished:
                    engine.step([(seq, 1)])
        while not (long.finished and decoding.finished):
            engine.step([(s, 1) for s in (long, decoding) if not s.finished])
        return [seq.output_ids for seq in (long, decoding, *shorts)]

    assert engine.spec.num_layers >= 2
    assert run(pause=True) == run(pause=False)
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_adapter_terms_added_in_the_nf4_call_give_the_bits_of_the_lora_op_after_it(tmp_path, monkeypatch):
    """With the CPU LoRA kernel as the op, steps below the BLAS threshold add the adapters' terms inside the fused NF4
    call (`Nf4Group.with_lora`); the same requests with the op wrapped (the model then calls it after the base
    matmuls, as for any other op) get the same tokens and the same logprobs, bit for bit."""
    if not (nf4_cpu.available() and lora_cpu.available()):
        pytest.skip("no C++ compiler: neither kernel can be built here")
    base = write_tiny_model("llama", tmp_path / "base")
    adapters = {s.name: write_adapter(base, s, tmp_path / s.name, seed=30 + i) for i, s in enumerate(MIXED_ADAPTERS)}
    engine = make_engine(base, adapters, prefix_cache=False)
    assert engine.lora_impl == "cpu_kernel"
    fused_calls = []
    with_lora = nf4_cpu.Nf4Group.with_lora

    def counted(group, x, batch, *args):
        ys = with_lora(group, x, batch, *args)
        fused_calls.append(ys is not None)
        return ys

    monkeypatch.setattr(nf4_cpu.Nf4Group, "with_lora", counted)
    prompts = [[(7 * j + i) % 96 for j in range(5 + 3 * i)] for i in range(5)]
    slots = [0, 1, NO_ADAPTER, 2, 0]

    def run() -> list[list[tuple[int, float]]]:
        seqs = [engine.add_sequence(p, SamplingParams(max_new_tokens=5, ignore_eos=True), s)
                for p, s in zip(prompts, slots, strict=True)]
        emitted = [[] for _ in seqs]
        by_id = {seq.seq_id: i for i, seq in enumerate(seqs)}
        for event in engine.step([(s, s.num_pending) for s in seqs]):
            emitted[by_id[event.seq_id]].append((event.token_id, event.logprob))
        while not all(s.finished for s in seqs):
            for event in engine.step([(s, 1) for s in seqs if not s.finished]):
                emitted[by_id[event.seq_id]].append((event.token_id, event.logprob))
        return emitted

    fused = run()
    assert fused_calls and all(fused_calls)  # every projection group of every step, in the NF4 call
    op = engine.model.lora_op
    engine.model.lora_op = lambda ys, x, slot_set, batch: op(ys, x, slot_set, batch)
    fused_calls.clear()
    assert run() == fused and not fused_calls
