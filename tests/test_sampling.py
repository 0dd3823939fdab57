"""Sampling semantics: repetition penalty, top-k/top-p against transformers' processors, greedy,
per-request seeds (alone vs in a mixed batch on a real tiny engine) and SamplingParams validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.server.engine import Engine, EngineConfig, FinishReason, SamplingParams
from loraplex.server.engine.sampling import apply_repetition_penalty, filter_top_k_top_p, sample
from loraplex.server.model_files import iter_weights, model_spec
from support import write_tiny_model

VOCAB = 96


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def kept(logits: torch.Tensor) -> set[int]:
    """Token ids a filter left in play (finite logits) of one row."""
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


# -- repetition penalty ------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = random_logits(3, seed=0)
    # duplicates, tokens with positive and negative logits, and one row that has seen nothing
    seen = [[3, 3, 17, 40, 95, 0], [5, 6, 7, 8, 9, 10, 11, 5], []]
    assert (logits[0, seen[0]] > 0).any() and (logits[0, seen[0]] < 0).any()
    actual = apply_repetition_penalty(logits.clone(), seen, [penalty] * 3)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for row, tokens in enumerate(seen):
        if not tokens:
            assert torch.equal(actual[row], logits[row])
            continue
        expected = processor(torch.tensor([tokens]), logits[row:row + 1].clone())[0]
        assert torch.equal(actual[row], expected)
        untouched = [t for t in range(VOCAB) if t not in tokens]
        assert torch.equal(actual[row, untouched], logits[row, untouched])


def test_repetition_penalty_per_row_and_neutral_value() -> None:
    logits = random_logits(2, seed=1)
    seen = [[1, 2, 3], [1, 2, 3]]
    actual = apply_repetition_penalty(logits.clone(), seen, [1.0, 1.5])
    assert torch.equal(actual[0], logits[0]), "penalty 1.0 must leave the row alone"
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([seen[1]]), logits[1:2].clone())[0]
    assert torch.equal(actual[1], expected)


# -- top-k / top-p -----------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 7, 50, VOCAB - 1, VOCAB, 500])
def test_top_k_keeps_transformers_set(top_k: int) -> None:
    logits = random_logits(4, seed=2)
    warper = TopKLogitsWarper(top_k)
    for row in range(4):
        actual = filter_top_k_top_p(logits[row], top_k, 1.0)
        expected = warper(None, logits[row:row + 1])[0]
        assert kept(actual) == kept(expected)
        assert len(kept(actual)) == min(top_k, VOCAB)
        assert torch.equal(actual[torch.isfinite(actual)], logits[row][torch.isfinite(actual)])


@pytest.mark.parametrize("top_p", [0.01, 0.1, 0.35, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_top_p_keeps_transformers_set(top_p: float, scale: float) -> None:
    logits = random_logits(6, seed=3, scale=scale)
    warper = TopPLogitsWarper(top_p)
    for row in range(6):
        actual = filter_top_k_top_p(logits[row], 0, top_p)
        expected = warper(None, logits[row:row + 1])[0]
        assert kept(actual) == kept(expected), f"row {row}"
        # the nucleus is the smallest prefix of the sorted distribution whose mass reaches top_p
        probs = logits[row].softmax(-1)
        mass = probs[sorted(kept(actual))].sum().item()
        assert mass >= top_p - 1e-6
        smallest_kept = probs[sorted(kept(actual))].min().item()
        assert mass - smallest_kept < top_p


def test_top_p_keeps_the_argmax_when_it_alone_exceeds_top_p() -> None:
    logits = torch.full((VOCAB,), -5.0)
    logits[42] = 10.0
    assert kept(filter_top_k_top_p(logits, 0, 0.5)) == {42}
    assert kept(TopPLogitsWarper(0.5)(None, logits[None])[0]) == {42}


def test_top_p_one_and_top_k_zero_keep_everything() -> None:
    logits = random_logits(1, seed=4)[0]
    assert torch.equal(filter_top_k_top_p(logits, 0, 1.0), logits)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 10, 0.8), (1.5, 40, 0.5), (1.0, 5, 0.999)])
def test_temperature_top_k_top_p_chain_matches_transformers(temperature: float, top_k: int,
                                                            top_p: float) -> None:
    logits = random_logits(4, seed=5)
    chain = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])
    for row in range(4):
        actual = filter_top_k_top_p(logits[row] / temperature, top_k, top_p)
        expected = chain(None, logits[row:row + 1].clone())[0]
        assert kept(actual) == kept(expected)
        finite = torch.isfinite(actual)
        torch.testing.assert_close(actual[finite], expected[finite], rtol=0, atol=0)


# -- sample() ----------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_raw_logprob() -> None:
    logits = random_logits(3, seed=6)
    params = [SamplingParams()] * 3
    tokens, logprobs = sample(logits, params, [[], [], []], [None, None, None])
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_greedy_applies_repetition_penalty_but_reports_raw_logprob() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 20] = 4.0, 3.0
    tokens, logprobs = sample(logits, [SamplingParams(repetition_penalty=2.0)], [[10]], [None])
    assert tokens == [20], "4.0 / 2.0 = 2.0 falls below 3.0"
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[20].item(), abs=1e-6)
    tokens, _ = sample(logits, [SamplingParams()], [[10]], [None])
    assert tokens == [10]


def test_sampled_tokens_stay_inside_the_top_k_set() -> None:
    logits = random_logits(1, seed=7, scale=0.5)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    generator = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_k=3)]
    drawn = [sample(logits, params, [[]], [generator])[0][0] for _ in range(300)]
    assert set(drawn) == allowed, "all three survivors of a flat distribution should be drawn, nothing else"


def test_temperature_scales_the_sampling_distribution() -> None:
    logits = torch.full((1, VOCAB), -float("inf"))
    logits[0, :4] = torch.tensor([1.0, 0.5, 0.0, -1.0])
    temperature = 0.5
    expected = (logits[0, :4] / temperature).softmax(-1)
    generator = torch.Generator().manual_seed(123)
    params = [SamplingParams(temperature=temperature)]
    draws = torch.tensor([sample(logits, params, [[]], [generator])[0][0] for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=4)[:4].float() / len(draws)
    assert draws.max().item() < 4
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.03)


def test_seeded_row_ignores_the_other_rows_of_the_batch() -> None:
    logits = random_logits(3, seed=8, scale=1.0)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=5)

    def draws_alone() -> list[int]:
        generator = torch.Generator().manual_seed(5)
        return [sample(logits[1:2], [seeded], [[]], [generator])[0][0] for _ in range(20)]

    generators = [torch.Generator().manual_seed(99), torch.Generator().manual_seed(5), None]
    params = [SamplingParams(temperature=1.3, seed=99), seeded, SamplingParams()]
    in_batch = [sample(logits, params, [[], [], []], generators)[0][1] for _ in range(20)]
    assert in_batch == draws_alone()
    assert len(set(in_batch)) > 1


# -- seeds on a real engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder: Path = write_tiny_model("llama", tmp_path_factory.mktemp("sampling") / "base")
    return Engine(model_spec(folder), iter_weights(folder),
                  EngineConfig(quantize=True, num_slots=2, max_rank=8, block_size=4, kv_cache_bytes=2**20))


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


SEEDED = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)


def test_same_seed_same_tokens_alone_and_in_a_batch(engine: Engine) -> None:
    target = prompt(9, seed=0)
    alone = engine.generate([target], SEEDED)[0]
    assert alone == engine.generate([target], SEEDED)[0], "same seed twice alone"
    others = [prompt(4, seed=1), prompt(15, seed=2), prompt(6, seed=3)]
    batch = engine.generate(
        [others[0], target, others[1], others[2]],
        [SamplingParams(max_new_tokens=5, ignore_eos=True),  # greedy, finishes early
         SEEDED,
         SamplingParams(max_new_tokens=20, temperature=1.2, seed=7, ignore_eos=True),
         SamplingParams(max_new_tokens=12, temperature=0.8, top_k=5, ignore_eos=True)],  # unseeded
        max_step_tokens=8,  # prefill is chunked, so the target shares steps with other prefills and decodes
    )
    assert batch[1] == alone
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_same_seed_when_joining_a_running_batch_via_step(engine: Engine) -> None:
    target = prompt(11, seed=10)
    alone = engine.generate([target], SEEDED)[0]
    runners = [engine.add_sequence(prompt(n, seed=20 + n), SamplingParams(max_new_tokens=30, temperature=1.0,
                                                                          seed=n, ignore_eos=True))
               for n in (5, 8)]
    engine.step([(s, s.num_pending) for s in runners])
    engine.step([(s, 1) for s in runners])
    seq = engine.add_sequence(target, SEEDED)
    engine.step([(runners[0], 1), (seq, 4), (runners[1], 1)])  # first prefill chunk next to decodes
    engine.step([(seq, seq.num_pending), (runners[0], 1)])  # rest of the prompt; runners[1] sits out
    while not seq.finished:
        engine.step([(s, 1) for s in (*runners, seq) if not s.finished])
    assert seq.output_ids == alone
    assert seq.finish_reason is FinishReason.LENGTH
    for s in runners:
        engine.release(s)
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_different_seeds_give_different_tokens(engine: Engine) -> None:
    target = prompt(9, seed=0)
    outputs = [tuple(engine.generate([target], SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed,
                                                               ignore_eos=True))[0]) for seed in range(4)]
    assert len(set(outputs)) == 4
    greedy = engine.generate([target], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    seeded_greedy = engine.generate([target], SamplingParams(max_new_tokens=12, ignore_eos=True, seed=3))[0]
    assert greedy == seeded_greedy, "the seed does not matter for greedy decoding"


def test_stop_tokens_and_max_new_tokens_end_a_sequence(engine: Engine) -> None:
    target = prompt(7, seed=30)
    free = engine.generate([target], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert len(free) == 10
    stop_at = free[4]
    first = free.index(stop_at)
    seq = engine.add_sequence(target, SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,)))
    events = engine.step([(seq, seq.num_pending)])
    while not seq.finished:
        events = engine.step([(seq, 1)])
    assert seq.output_ids == free[:first + 1]
    assert events[-1].token_id == stop_at and events[-1].finish_reason is FinishReason.STOP
    assert seq.block_table == []


def test_max_model_len_ends_a_sequence(tmp_path: Path) -> None:
    folder = write_tiny_model("llama", tmp_path / "base")
    engine = Engine(model_spec(folder), iter_weights(folder),
                    EngineConfig(quantize=True, block_size=4, kv_cache_bytes=2**20, max_model_len=12))
    assert engine.max_model_len == 12
    seq = engine.add_sequence(prompt(9, seed=40), SamplingParams(max_new_tokens=10, ignore_eos=True))
    events = engine.step([(seq, 9)])
    while not seq.finished:
        events = engine.step([(seq, 1)])
    assert len(seq.output_ids) == 3 and seq.num_tokens == 12
    assert events[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(ValueError, match="prompt of 12 tokens leaves no room in max_model_len=12"):
        engine.add_sequence(prompt(12, seed=41), SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token ids must lie in \[0, 96\)"):
        engine.add_sequence([1, 96], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_sequence([], SamplingParams())


# -- SamplingParams validation -----------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("max_new_tokens", -3),
    ("temperature", -0.1), ("temperature", math.nan),
    ("top_k", -1),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
])
def test_sampling_params_reject_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}="):
        SamplingParams(**{field: value})


def test_sampling_params_accept_boundary_values() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=0.5)
    assert params.greedy
    assert not SamplingParams(temperature=1e-3, top_p=1e-6).greedy
