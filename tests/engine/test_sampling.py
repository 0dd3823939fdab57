"""Sampling semantics: repetition penalty, top-k/top-p against transformers' processors, greedy,
OpenAI's presence/frequency penalties and top log-probabilities, per-request seeds (alone vs in a
mixed batch on a real tiny engine) and SamplingParams validation."""

from __future__ import annotations

import math
from collections.abc import Sequence
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

from loraplex.server.engine import Engine, EngineConfig, FinishReason, SamplingParams, SequenceState
from loraplex.server.engine.sampling import (
    NUCLEUS_CANDIDATES,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    draw,
    filter_top_k_top_p,
    sample,
)
from loraplex.server.model_files import iter_weights, model_spec
from support import write_tiny_model

VOCAB = 96


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def row(params: SamplingParams, prompt: Sequence[int] = (), output: Sequence[int] = (),
        generator: torch.Generator | None = None) -> SequenceState:
    """A sequence as `sample` sees it: its sampling, prompt and generated ids, and its generator."""
    return SequenceState(0, list(prompt), params, output_ids=list(output), generator=generator)


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


@pytest.mark.parametrize(("scale", "top_p", "grows"), [(0.3, 0.9, True), (3.0, 0.9, True), (4.0, 0.9, False),
                                                       (8.0, 0.5, False), (0.05, 0.999, True)])
def test_top_p_on_a_large_vocabulary_ranks_only_what_it_needs(scale: float, top_p: float, grows: bool) -> None:
    """49k tokens: the nucleus may need far more than NUCLEUS_CANDIDATES (flat logits) or a handful."""
    logits = torch.randn(49_152, generator=torch.Generator().manual_seed(9)) * scale
    expected = kept(TopPLogitsWarper(top_p)(None, logits[None])[0])
    assert kept(filter_top_k_top_p(logits, 0, top_p)) == expected
    assert (len(expected) > NUCLEUS_CANDIDATES) == grows  # both the grown and the first-try path


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
    tokens, logprobs, top_logprobs, _ = sample(logits, [row(SamplingParams())] * 3)
    assert tokens == logits.argmax(-1).tolist()
    assert top_logprobs == [(), (), ()]
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_greedy_applies_repetition_penalty_but_reports_raw_logprob() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 20] = 4.0, 3.0
    tokens, logprobs, _, _ = sample(logits, [row(SamplingParams(repetition_penalty=2.0), prompt=[10])])
    assert tokens == [20], "4.0 / 2.0 = 2.0 falls below 3.0"
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[20].item(), abs=1e-6)
    tokens, _, _, _ = sample(logits, [row(SamplingParams(), prompt=[10])])
    assert tokens == [10]


def test_sampled_tokens_stay_inside_the_top_k_set() -> None:
    logits = random_logits(1, seed=7, scale=0.5)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    generator = torch.Generator().manual_seed(0)
    seqs = [row(SamplingParams(temperature=1.0, top_k=3), generator=generator)]
    drawn = [sample(logits, seqs).tokens[0] for _ in range(300)]
    assert set(drawn) == allowed, "all three survivors of a flat distribution should be drawn, nothing else"


def test_temperature_scales_the_sampling_distribution() -> None:
    logits = torch.full((1, VOCAB), -float("inf"))
    logits[0, :4] = torch.tensor([1.0, 0.5, 0.0, -1.0])
    temperature = 0.5
    expected = (logits[0, :4] / temperature).softmax(-1)
    generator = torch.Generator().manual_seed(123)
    seqs = [row(SamplingParams(temperature=temperature), generator=generator)]
    draws = torch.tensor([sample(logits, seqs).tokens[0] for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=4)[:4].float() / len(draws)
    assert draws.max().item() < 4
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.03)


def test_seeded_row_ignores_the_other_rows_of_the_batch() -> None:
    logits = random_logits(3, seed=8, scale=1.0)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=5)

    def draws_alone() -> list[int]:
        seqs = [row(seeded, generator=torch.Generator().manual_seed(5))]
        return [sample(logits[1:2], seqs).tokens[0] for _ in range(20)]

    seqs = [row(SamplingParams(temperature=1.3, seed=99), generator=torch.Generator().manual_seed(99)),
            row(seeded, generator=torch.Generator().manual_seed(5)),
            row(SamplingParams())]
    in_batch = [sample(logits, seqs).tokens[1] for _ in range(20)]
    assert in_batch == draws_alone()
    assert len(set(in_batch)) > 1


# -- presence / frequency penalties and top log-probabilities -----------------------------------------


def penalized_by_formula(logits: torch.Tensor, generated: list[int], presence: float, frequency: float,
                         ) -> torch.Tensor:
    """logits: [vocab] -> OpenAI's formula applied token by token (the slow, obvious oracle)."""
    expected = logits.clone()
    for token in set(generated):
        expected[token] -= frequency * generated.count(token) + presence
    return expected


def test_presence_frequency_penalties_follow_the_formula() -> None:
    logits = random_logits(5, seed=9)
    generated = [[3, 3, 3, 17, 40, 95, 0], [5, 6, 5], [7, 8], [], [1, 1, 2]]
    presence = [0.5, -1.25, 0.0, 2.0, 0.0]
    frequency = [0.3, 0.0, 0.0, -2.0, 1.5]
    actual = apply_presence_frequency_penalties(logits.clone(), generated, presence, frequency)
    for r in range(5):
        expected = penalized_by_formula(logits[r], generated[r], presence[r], frequency[r])
        torch.testing.assert_close(actual[r], expected, rtol=0, atol=1e-6)
    assert torch.equal(actual[2], logits[2]), "both penalties 0: the row is left alone"
    assert torch.equal(actual[3], logits[3]), "nothing generated yet: the row is left alone"


@pytest.mark.parametrize(("presence", "frequency", "generated", "expected"), [
    (0.0, 0.0, [10, 10, 20], 10),  # 4.0 > 3.5 > 3.0
    (0.4, 0.0, [10], 10),  # 4.0 - 0.4 = 3.6 > 3.5
    (0.6, 0.0, [10], 20),  # 4.0 - 0.6 = 3.4 < 3.5
    (0.6, 0.0, [10, 10, 10], 20),  # presence counts once
    (0.0, 0.3, [10, 10, 20], 10),  # 10: 4.0 - 0.6 = 3.4, 20: 3.5 - 0.3 = 3.2, 30: 3.0
    (0.0, 0.6, [10, 10, 20], 30),  # 10: 4.0 - 1.2 = 2.8, 20: 3.5 - 0.6 = 2.9, 30: 3.0
    (0.3, 0.2, [10, 10], 20),  # 10: 4.0 - 0.4 - 0.3 = 3.3 < 3.5
    (-1.5, 0.0, [30], 30),  # a negative penalty favours what was generated: 3.0 + 1.5 = 4.5
    (0.0, -0.4, [20, 20], 20),  # 3.5 + 0.8 = 4.3
])
def test_presence_frequency_penalties_change_the_greedy_choice(presence: float, frequency: float,
                                                               generated: list[int], expected: int) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 20], logits[0, 30] = 4.0, 3.5, 3.0
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    tokens, logprobs, _, _ = sample(logits, [row(params, prompt=[1, 2], output=generated)])
    assert tokens == [expected]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[expected].item(), abs=1e-6), \
        "the reported logprob is the unprocessed one"


def test_presence_frequency_penalties_ignore_the_prompt() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 20] = 4.0, 3.5
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    assert sample(logits, [row(params, prompt=[10, 10, 10])]).tokens == [10]
    assert sample(logits, [row(params, prompt=[10, 10, 10], output=[20])]).tokens == [10]
    assert sample(logits, [row(params, prompt=[20], output=[10])]).tokens == [20]


def test_presence_frequency_penalties_come_after_the_repetition_penalty() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 20] = 4.0, 1.5
    # repetition first: 4.0 / 2.0 = 2.0, then presence: 2.0 - 0.6 = 1.4 < 1.5; the other order gives 1.7
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.6)
    assert sample(logits, [row(params, output=[10])]).tokens == [20]


def test_penalties_reshape_the_sampling_distribution() -> None:
    logits = torch.full((1, VOCAB), -float("inf"))
    logits[0, :3] = torch.tensor([1.0, 0.5, 0.0])
    params = SamplingParams(temperature=0.5, presence_penalty=0.5, frequency_penalty=0.25)
    generated = [0, 0, 1]
    expected = (penalized_by_formula(logits[0], generated, 0.5, 0.25)[:3] / 0.5).softmax(-1)
    seqs = [row(params, output=generated, generator=torch.Generator().manual_seed(321))]
    draws = torch.tensor([sample(logits, seqs).tokens[0] for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=3)[:3].float() / len(draws)
    assert draws.max().item() < 3
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.03)


def test_top_logprobs_are_the_most_likely_of_the_unprocessed_distribution() -> None:
    logits = random_logits(4, seed=10)
    asked = [5, 0, 1, 20]
    seqs = [row(SamplingParams(top_logprobs=asked[0], presence_penalty=2.0, repetition_penalty=1.5),
                prompt=[4], output=logits[0].topk(3).indices.tolist()),  # penalties move the choice, not the report
            row(SamplingParams(top_logprobs=asked[1])),
            row(SamplingParams(top_logprobs=asked[2], temperature=0.8), generator=torch.Generator().manual_seed(0)),
            row(SamplingParams(top_logprobs=asked[3]))]
    tokens, logprobs, top_logprobs, _ = sample(logits, seqs)
    raw = torch.log_softmax(logits, -1)  # [rows, vocab]
    for r, k in enumerate(asked):
        pairs = top_logprobs[r]
        assert len(pairs) == k
        if k == 0:
            assert pairs == ()
            continue
        values, ids = raw[r].topk(k)
        assert [t for t, _ in pairs] == ids.tolist()
        assert [v for _, v in pairs] == pytest.approx(values.tolist(), abs=1e-6)
        assert [v for _, v in pairs] == sorted((v for _, v in pairs), reverse=True)
        assert all(isinstance(t, int) and isinstance(v, float) for t, v in pairs)
    assert tokens[0] != top_logprobs[0][0][0], "the penalized row chose another token than the raw argmax"
    assert tokens[3] == top_logprobs[3][0][0]
    assert logprobs[3] == pytest.approx(top_logprobs[3][0][1], abs=1e-6)


def test_rows_without_the_options_are_unaffected_in_a_mixed_batch() -> None:
    logits = random_logits(5, seed=11, scale=1.0)
    top3 = logits.topk(3, dim=-1).indices.tolist()
    specs = [  # (params, generated, generator seed)
        (SamplingParams(), top3[0], None),
        (SamplingParams(presence_penalty=1.5, frequency_penalty=0.5, top_logprobs=4), top3[1] * 2, None),
        (SamplingParams(temperature=0.9, seed=3), top3[2], 3),
        (SamplingParams(temperature=0.9, seed=4, frequency_penalty=2.0, top_logprobs=2), top3[3], 4),
        (SamplingParams(repetition_penalty=1.3), top3[4], None),
    ]

    def seqs() -> list[SequenceState]:
        return [row(p, prompt=[7, 8], output=generated,
                    generator=None if seed is None else torch.Generator().manual_seed(seed))
                for p, generated, seed in specs]

    in_batch = seqs()
    batch = [sample(logits, in_batch) for _ in range(10)]  # seeded rows draw on from their generators
    for r in range(5):
        alone = seqs()[r]
        for attempt in range(10):
            single = sample(logits[r:r + 1], [alone])
            assert batch[attempt].tokens[r] == single.tokens[0]
            assert batch[attempt].logprobs[r] == pytest.approx(single.logprobs[0], abs=1e-6)
            assert len(batch[attempt].top_logprobs[r]) == len(single.top_logprobs[0]) == specs[r][0].top_logprobs
            assert [t for t, _ in batch[attempt].top_logprobs[r]] == [t for t, _ in single.top_logprobs[0]]
    plain = torch.log_softmax(logits, -1)
    assert batch[0].tokens[0] == plain[0].argmax().item(), "no option: greedy stays the raw argmax"
    assert batch[0].top_logprobs[0] == batch[0].top_logprobs[2] == batch[0].top_logprobs[4] == ()
    assert batch[0].tokens[1] not in top3[1], "the penalized row left its generated tokens"


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


def test_top_logprobs_on_every_token_event(engine: Engine) -> None:
    target = prompt(9, seed=50)
    plain = engine.generate([target], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    seq = engine.add_sequence(target, SamplingParams(max_new_tokens=8, ignore_eos=True, top_logprobs=3))
    other = engine.add_sequence(prompt(5, seed=51), SamplingParams(max_new_tokens=8, ignore_eos=True))
    events = engine.step([(seq, 4), (other, other.num_pending)])  # a partial prefill chunk reports nothing
    assert [e.seq_id for e in events] == [other.seq_id] and events[0].top_logprobs == ()
    events = engine.step([(seq, seq.num_pending), (other, 1)])
    while not seq.finished:
        mine = [e for e in events if e.seq_id == seq.seq_id]
        assert len(mine) == 1
        event = mine[0]
        assert len(event.top_logprobs) == 3
        assert event.top_logprobs[0][0] == event.token_id, "greedy picks the most likely token"
        assert event.top_logprobs[0][1] == pytest.approx(event.logprob, abs=1e-6)
        assert [v for _, v in event.top_logprobs] == sorted((v for _, v in event.top_logprobs), reverse=True)
        assert len({t for t, _ in event.top_logprobs}) == 3
        assert all(e.top_logprobs == () for e in events if e.seq_id != seq.seq_id)
        events = engine.step([(s, 1) for s in (seq, other) if not s.finished])
    assert len(events) >= 1 and len(events[0].top_logprobs) == 3
    assert seq.output_ids == plain, "asking for alternatives does not change the choice"
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_presence_frequency_penalties_on_the_engine_count_generated_tokens_only(engine: Engine) -> None:
    """Each greedy choice is the best of the step's raw top-20 (and the chosen token itself) after the
    formula over the tokens generated so far; the prompt counts for nothing."""
    target = prompt(9, seed=0)
    plain = engine.generate([target], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    presence, frequency = -1.0, -0.5  # negative: the tiny model repeats itself more than without them
    seq = engine.add_sequence(target, SamplingParams(max_new_tokens=16, ignore_eos=True, top_logprobs=20,
                                                     presence_penalty=presence, frequency_penalty=frequency))
    events = engine.step([(seq, seq.num_pending)])
    generated: list[int] = []
    while True:
        (event,) = events

        def penalized(token: int, logprob: float) -> float:
            count = generated.count(token)
            return logprob - frequency * count - presence * (count > 0)

        best = max(penalized(t, v) for t, v in event.top_logprobs)
        assert penalized(event.token_id, event.logprob) >= best - 1e-5, f"step {len(generated)}"
        generated.append(event.token_id)
        if seq.finished:
            break
        events = engine.step([(seq, 1)])
    assert seq.output_ids == generated
    assert generated[0] == plain[0], "nothing generated yet: the prompt is not penalized"
    assert len(set(generated)) < len(set(plain)), "negative penalties make the model repeat itself more"


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
    ("presence_penalty", 2.01), ("presence_penalty", -2.01), ("presence_penalty", math.nan),
    ("frequency_penalty", 2.5), ("frequency_penalty", -3.0), ("frequency_penalty", math.nan),
    ("top_logprobs", -1), ("top_logprobs", 21),
])
def test_sampling_params_reject_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}="):
        SamplingParams(**{field: value})


def test_sampling_params_accept_boundary_values() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=0.5)
    assert params.greedy
    for bound in (-2.0, 2.0):
        SamplingParams(presence_penalty=bound, frequency_penalty=bound)
    assert SamplingParams(top_logprobs=20).top_logprobs == 20
    assert SamplingParams(top_logprobs=0).top_logprobs == 0
    assert not SamplingParams(temperature=1e-3, top_p=1e-6).greedy


def test_draw_follows_the_distribution_and_its_generator():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.0, 0.3])  # zero-probability tokens must never come out
    generator = torch.Generator().manual_seed(3)
    draws = torch.stack([draw(probs, generator) for _ in range(20_000)])
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    assert frequencies[1] == frequencies[3] == 0
    assert torch.allclose(frequencies, probs, atol=0.015)  # about 4 standard errors at p=0.6
    again = torch.Generator().manual_seed(3)
    assert [int(draw(probs, again)) for _ in range(50)] == draws[:50].tolist()
    assert int(draw(torch.tensor([0.0, 0.0, 1.0]), generator)) == 2


def test_constrained_rows_take_only_allowed_tokens_and_a_row_allowing_none_is_a_dead_end() -> None:
    logits = random_logits(3, seed=12)
    vocab = logits.shape[1]
    bits = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)  # rows 0 and 2 constrained
    bits[0, 1] = 1 << 3  # row 0 may take only token 35
    seqs = [row(SamplingParams()), row(SamplingParams()), row(SamplingParams(temperature=0.7),
                                                               generator=torch.Generator().manual_seed(1))]
    chosen = sample(logits, seqs, ([0, 2], bits))
    assert chosen.tokens[0] == 35 and chosen.tokens[1] == logits[1].argmax().item()
    assert chosen.dead_ends == {2}
    assert sample(logits, seqs).dead_ends == frozenset()
