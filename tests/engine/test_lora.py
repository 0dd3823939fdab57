"""Adapter slots: set/reset/replace copy into preallocated buffers, a reset slot is the base model,
oversized adapters are refused, hot-swaps leave other rows alone, and `lora_grouped` equals
`lora_reference` (and an explicit per-token loop) on mixed, padded, single-slot and adapter-less batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.engine import Engine, EngineConfig, ModelSpec, SamplingParams, cpu_extension
from loraplex.server.engine import lora_cpu as lora_cpu_module
from loraplex.server.engine.lora import (
    LARGE_GROUP,
    NO_ADAPTER,
    LoraBatch,
    LoraSlots,
    SlotSet,
    each_projection,
    lora_grouped,
    lora_reference,
)
from loraplex.server.engine.lora_cpu import lora_cpu, lora_cpu_group
from loraplex.server.engine.model import LoraWeights
from loraplex.server.model_files import iter_weights, model_spec
from support import ALL_LINEAR, MIXED_ADAPTERS, write_adapter, write_tiny_model

NEW_TOKENS = 6
MAX_RANK = 16


def random_adapter(spec: ModelSpec, rank: int, targets: tuple[str, ...], seed: int,
                   scale: float = 2.0) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    weights: LoraWeights = {}
    for layer in range(spec.num_layers):
        for proj in targets:
            in_features, out_features = spec.projection_shape(proj)
            weights[(layer, proj)] = (torch.randn(rank, in_features, generator=generator) * 0.3,
                                      torch.randn(out_features, rank, generator=generator) * 0.3, scale)
    return weights


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate_with_logits(engine: Engine, prompts: list[list[int]], slots: list[int]
                         ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy outputs and logits [rows, NEW_TOKENS, vocab] (every row runs every step)."""
    steps: list[torch.Tensor] = []
    forward = engine.model.forward

    def recording_forward(*args: object) -> torch.Tensor:
        logits = forward(*args)
        steps.append(logits.clone())
        return logits

    engine.model.forward = recording_forward
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        outputs = engine.generate(prompts, params, slots=slots)
    finally:
        engine.model.forward = forward
    return outputs, torch.stack(steps, dim=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model("llama", tmp_path_factory.mktemp("slots") / "base")


def make_engine(base: Path, lora_impl: str = "grouped", num_slots: int = 4) -> Engine:
    return Engine(model_spec(base), iter_weights(base),
                  EngineConfig(quantize=True, num_slots=num_slots, max_rank=MAX_RANK, block_size=4,
                               kv_cache_bytes=2**20, lora_impl=lora_impl))


def slot_buffers(engine: Engine) -> dict[tuple[int, str, str], torch.Tensor]:
    return {(layer, name, buffer): getattr(projection.slots, buffer)
            for layer, name, projection in engine.model.projections() for buffer in ("A", "B", "scale")}


# -- set / reset / replace ---------------------------------------------------------------------------


def test_set_reset_replace_never_reallocate(base: Path) -> None:
    engine = make_engine(base)
    spec = engine.spec
    before = {key: (t.data_ptr(), t.shape) for key, t in slot_buffers(engine).items()}
    assert len(before) == spec.num_layers * len(ALL_LINEAR) * 3
    slot_bytes = engine.model.lora_slot_bytes()

    engine.set_slot(0, random_adapter(spec, MAX_RANK, ALL_LINEAR, seed=1))
    engine.set_slot(1, random_adapter(spec, 4, ("q_proj", "v_proj"), seed=2))
    replacement = random_adapter(spec, 2, ("k_proj",), seed=3, scale=0.5)
    engine.set_slot(0, replacement)  # a smaller adapter over a full-rank one
    engine.reset_slot(1)
    engine.set_slot(3, random_adapter(spec, 8, ("down_proj",), seed=4))

    after = {key: (t.data_ptr(), t.shape) for key, t in slot_buffers(engine).items()}
    assert after == before
    assert engine.model.lora_slot_bytes() == slot_bytes
    assert engine.slot_ranks == [2, 0, 0, 8]
    for layer, name, projection in engine.model.projections():
        slots = projection.slots
        if name == "k_proj":  # the replacement, with no trace of the rank-16 adapter beyond rank 2
            lora_a, lora_b, _ = replacement[(layer, name)]
            assert torch.equal(slots.A[0, :2], lora_a) and torch.equal(slots.B[0, :2], lora_b.T)
            assert not slots.A[0, 2:].any() and not slots.B[0, 2:].any()
            assert slots.scale[0].item() == 0.5
        else:  # projections the replacement does not target were cleared
            assert not slots.A[0].any() and not slots.B[0].any() and slots.scale[0].item() == 0.0
        assert not slots.A[1].any() and not slots.B[1].any() and slots.scale[1].item() == 0.0
        assert not slots.A[2].any() and not slots.B[2].any()


@pytest.mark.parametrize("lora_impl", ["grouped", "reference"])
def test_reset_slot_rows_equal_the_base_model(base: Path, lora_impl: str) -> None:
    engine = make_engine(base, lora_impl)
    engine.set_slot(0, random_adapter(engine.spec, 8, ALL_LINEAR, seed=5))
    prompts = [prompt(7, seed=1), prompt(7, seed=1), prompt(12, seed=2)]
    adapted, adapted_logits = generate_with_logits(engine, prompts, [0, NO_ADAPTER, 0])
    assert adapted[0] != adapted[1], "the adapter must change the output for this test to mean anything"

    engine.reset_slot(0)
    outputs, logits = generate_with_logits(engine, prompts, [0, NO_ADAPTER, 0])
    assert outputs[0] == outputs[1] == adapted[1]
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[1], adapted_logits[1]), "base rows do not depend on what slot 0 held"
    base_only, base_logits = generate_with_logits(make_engine(base, lora_impl), prompts, [NO_ADAPTER] * 3)
    assert outputs == base_only
    assert torch.equal(logits, base_logits)


# -- refusals ----------------------------------------------------------------------------------------


def test_adapter_above_max_rank_is_refused(base: Path, tmp_path: Path) -> None:
    engine = make_engine(base)
    with pytest.raises(ValueError, match=f"adapter rank 32 exceeds the configured max_rank {MAX_RANK}"):
        engine.set_slot(1, random_adapter(engine.spec, 32, ("q_proj",), seed=6))
    assert engine.slot_ranks[1] == 0
    peft_r64 = write_adapter(base, MIXED_ADAPTERS[2], tmp_path / "r64", seed=7)
    with pytest.raises(ValueError, match=f"adapter rank 64 exceeds the configured max_rank {MAX_RANK}"):
        engine.set_slot(1, read_lora_weights(peft_r64))
    # exactly max_rank is fine
    engine.set_slot(1, random_adapter(engine.spec, MAX_RANK, ("q_proj",), seed=8))
    assert engine.slot_ranks[1] == MAX_RANK


def test_slot_errors_name_the_problem(base: Path) -> None:
    engine = make_engine(base)
    with pytest.raises(ValueError, match=r"slot 4 outside \[0, 4\)"):
        engine.set_slot(4, {})
    with pytest.raises(ValueError, match=r"slot -1 outside \[0, 4\)"):
        engine.reset_slot(-1)
    with pytest.raises(ValueError, match=r"slot 7 outside \[0, 4\)"):
        engine.add_sequence([1, 2], SamplingParams(), slot=7)
    slots = LoraSlots(2, 8, in_features=12, out_features=20, dtype=torch.float32, device=torch.device("cpu"))
    misfit = r"A\(4, 10\) B\(20, 4\) do not fit a projection with in_features=12, out_features=20"
    with pytest.raises(ValueError, match=misfit):
        slots.set_slot(0, torch.ones(4, 10), torch.ones(20, 4), 1.0)
    with pytest.raises(ValueError, match=r"A\(4, 12\) B\(20, 3\) do not fit"):
        slots.set_slot(0, torch.ones(4, 12), torch.ones(20, 3), 1.0)
    assert not slots.A.any() and not slots.B.any()


def test_refused_adapter_leaves_the_slot_unchanged(base: Path) -> None:
    """A load that fails validation must not touch the slot: in-flight requests still use its adapter.

    The bad module (v_proj, rank > max_rank) comes after projections the new adapter does not target,
    which a non-atomic load would already have cleared.
    """
    engine = make_engine(base)
    engine.set_slot(0, random_adapter(engine.spec, 4, ALL_LINEAR, seed=9))
    before = {key: t[0].clone() for key, t in slot_buffers(engine).items()}
    with pytest.raises(ValueError, match="exceeds the configured max_rank"):
        engine.set_slot(0, random_adapter(engine.spec, MAX_RANK + 1, ("v_proj",), seed=10))
    assert engine.slot_ranks[0] == 4
    changed = [key for key, t in slot_buffers(engine).items() if not torch.equal(t[0], before[key])]
    assert changed == []


# -- hot-swap isolation ------------------------------------------------------------------------------


def test_swapping_one_slot_leaves_other_rows_unchanged(base: Path) -> None:
    engine = make_engine(base)
    spec = engine.spec
    engine.set_slot(0, random_adapter(spec, 4, ("q_proj", "v_proj"), seed=11))
    engine.set_slot(1, random_adapter(spec, 8, ALL_LINEAR, seed=12))
    engine.set_slot(2, random_adapter(spec, MAX_RANK, ("o_proj", "up_proj", "down_proj"), seed=13))
    prompts = [prompt(n, seed=20 + n) for n in (5, 9, 3, 11, 7, 4)]
    slots = [0, 1, 2, NO_ADAPTER, 1, 0]
    before, before_logits = generate_with_logits(engine, prompts, slots)

    incoming = random_adapter(spec, 2, ("gate_proj", "k_proj"), seed=14)
    engine.set_slot(1, incoming)
    after, after_logits = generate_with_logits(engine, prompts, slots)
    for row, slot in enumerate(slots):
        if slot == 1:
            assert after[row] != before[row], f"row {row} should see the new adapter"
        else:
            assert after[row] == before[row], f"row {row} (slot {slot}) changed"
            assert relative_error(after_logits[row], before_logits[row]) <= 1e-6, f"row {row}"

    # the swapped-in adapter serves exactly what it serves from any other slot of a fresh engine
    fresh = make_engine(base)
    fresh.set_slot(3, incoming)
    swapped_rows = [row for row, slot in enumerate(slots) if slot == 1]
    swapped_prompts = [prompts[r] for r in swapped_rows]
    alone, alone_logits = generate_with_logits(fresh, swapped_prompts, [3] * len(swapped_rows))
    assert alone == [after[r] for r in swapped_rows]
    assert relative_error(alone_logits, after_logits[swapped_rows]) <= 1e-5


# -- the LoRA op -------------------------------------------------------------------------------------

IN_FEATURES, OUT_FEATURES, NUM_SLOTS = 24, 40, 6
#: slot -> (rank, scale); slot 2 is set then reset, slot 4 is never set
ADAPTERS = {0: (3, 2.0), 1: (16, 0.25), 3: (7, -1.5), 5: (1, 4.0)}


@pytest.fixture(scope="module")
def op_slots() -> tuple[LoraSlots, dict[int, tuple[torch.Tensor, torch.Tensor, float]], list[int]]:
    generator = torch.Generator().manual_seed(0)
    slots = LoraSlots(NUM_SLOTS, MAX_RANK, IN_FEATURES, OUT_FEATURES, torch.float32, torch.device("cpu"))
    weights = {}
    for slot, (rank, scale) in ADAPTERS.items():
        lora_a = torch.randn(rank, IN_FEATURES, generator=generator)
        lora_b = torch.randn(OUT_FEATURES, rank, generator=generator)
        slots.set_slot(slot, lora_a, lora_b, scale)
        weights[slot] = (lora_a, lora_b, scale)
    slots.set_slot(2, torch.randn(5, IN_FEATURES, generator=generator), torch.randn(OUT_FEATURES, 5), 3.0)
    slots.reset_slot(2)
    ranks = [ADAPTERS.get(slot, (0, 0.0))[0] for slot in range(NUM_SLOTS)]
    return slots, weights, ranks


CASES = {
    "mixed_padded": [0, -1, 1, 3, 0, 0, -1, 5, 1, 3, 3, 3, 2, 4, -1, 1],
    "one_slot": [1] * 9,
    "one_low_rank_slot": [5, 5, 5],
    "no_adapter": [-1] * 7,
    "equal_groups": [0, 3, 0, 3],
    "single_token": [3],
    "only_empty_slots": [2, 4, 2, -1],
    "prefill_and_decode": [1] * LARGE_GROUP + [0, -1, 3] + [5] * (LARGE_GROUP + 3) + [3, 0],
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_ops_match_reference_and_explicit_loop(op_slots, case: str) -> None:
    slots, weights, ranks = op_slots
    slot_ids = CASES[case]
    generator = torch.Generator().manual_seed(len(slot_ids))
    x = torch.randn(len(slot_ids), IN_FEATURES, generator=generator)
    y = torch.randn(len(slot_ids), OUT_FEATURES, generator=generator)
    batch = LoraBatch.build(slot_ids, ranks, torch.device("cpu"))

    expected = y.clone()
    for token, slot in enumerate(slot_ids):
        if slot in weights:
            lora_a, lora_b, scale = weights[slot]
            expected[token] += (x[token] @ lora_a.T) @ lora_b.T * scale
    reference = lora_reference(y.clone(), x, slots, batch)
    grouped = lora_grouped(y.clone(), x, slots, batch)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_cpu(y.clone(), x, slots, batch), reference, rtol=1e-5, atol=1e-5)
    untouched = [t for t, s in enumerate(slot_ids) if s not in weights]  # -1, reset and never-set slots
    assert torch.equal(grouped[untouched], y[untouched]) and torch.equal(reference[untouched], y[untouched])
    touched = [t for t, s in enumerate(slot_ids) if s in weights]
    if touched:
        assert (grouped[touched] - y[touched]).abs().min() > 0


def test_lora_batch_groups_and_pads() -> None:
    ranks = [3, 16, 0, 7, 0, 1]
    mixed = LoraBatch.build(CASES["mixed_padded"], ranks, torch.device("cpu"))
    assert mixed.groups.slots.tolist() == [0, 1, 3, 5, 2, 4]
    assert mixed.groups.group_len == 4  # slot 3 has four tokens
    assert mixed.groups.rank == 16
    assert mixed.groups.valid_positions is not None
    assert mixed.groups.valid_positions.numel() == mixed.groups.token_index.numel() == 13
    assert mixed.groups.gather_index.numel() == 6 * 4
    one = LoraBatch.build(CASES["one_slot"], ranks, torch.device("cpu"))
    assert one.groups.valid_positions is None and one.groups.group_len == 9 and one.groups.rank == 16
    low = LoraBatch.build(CASES["one_low_rank_slot"], ranks, torch.device("cpu"))
    assert low.groups.rank == 1, "the batch reads slot buffers only up to its largest rank"
    none = LoraBatch.build(CASES["no_adapter"], ranks, torch.device("cpu"))
    assert none.groups.empty and none.groups.rank == 0 and none.groups.group_len == 0
    assert none.groups.token_index.numel() == 0
    equal = LoraBatch.build(CASES["equal_groups"], ranks, torch.device("cpu"))
    assert equal.groups.valid_positions is None and equal.groups.gather_index.tolist() == [0, 2, 1, 3]
    assert mixed.large_groups.empty and mixed.small_tokens.numel() == 13
    order = (0, 1, 3, 5, 2, 4)  # first appearance in the batch; each slot's tokens adjacent
    assert mixed.small_slots.tolist() == [slot for slot in order for _ in range(CASES["mixed_padded"].count(slot))]
    prefill = LoraBatch.build([1] * LARGE_GROUP + [0, -1, 0], ranks, torch.device("cpu"))
    assert prefill.large_groups.slots.tolist() == [1] and prefill.large_groups.group_len == LARGE_GROUP
    assert prefill.small_tokens.tolist() == [LARGE_GROUP, LARGE_GROUP + 2] and prefill.small_slots.tolist() == [0, 0]


def test_empty_batch_returns_y_untouched(op_slots) -> None:
    slots, _, ranks = op_slots
    x, y = torch.randn(3, IN_FEATURES), torch.randn(3, OUT_FEATURES)
    batch = LoraBatch.build([-1, -1, -1], ranks, torch.device("cpu"))
    for op in (lora_grouped, lora_reference, lora_cpu):
        result = op(y.clone(), x, slots, batch)
        assert torch.equal(result, y)


@pytest.mark.parametrize("flags", [(), ("-mno-avx512f",), ("-mno-avx2", "-mno-fma", "-mno-avx512f")],
                         ids=["native", "avx2_only", "plain_cpp"])
def test_the_cpu_kernel_on_every_vector_path_matches_the_reference_whatever_the_batch(op_slots, flags) -> None:
    """lora_cpu's kernel built as for this CPU, for one with AVX2 but no AVX-512, and for one with neither
    (`-march=native` minus those, so each path runs on the CPUs that have them): the reference's result on a
    mixed batch (ranks 1..16, tiles of 1..8 tokens, tails of 24 inputs and 40 outputs past the vector width),
    and each token's bits the same alone as in that batch."""
    if "-mno-avx2" not in flags and flags and "avx2" not in cpu_extension.cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    kernel = cpu_extension.build("lora_bgmv_" + "_".join(f.strip("-").replace("-", "_") for f in flags),
                                 lora_cpu_module._SOURCE, (*lora_cpu_module.CFLAGS, *flags)
                                 ) if flags else lora_cpu_module._extension()
    assert kernel is not None
    slots, _, ranks = op_slots
    slot_ids = CASES["mixed_padded"] + [1] * 11  # slot 1: 14 tokens, tiles of 8 and 6 (4, 4, 4, 2 on AVX2)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(len(slot_ids), IN_FEATURES, generator=generator)
    y = torch.randn(len(slot_ids), OUT_FEATURES, generator=generator)

    def run(rows: list[int]) -> torch.Tensor:
        batch = LoraBatch.build([slot_ids[row] for row in rows], ranks, torch.device("cpu"))
        out = y[rows].clone()
        kernel.lora_bgmv([out], x[rows].contiguous(), [slots.A], [slots.B], [slots.scale], batch.slot_ranks,
                         batch.groups.token_index, batch.grouped_slots)
        return out

    whole = run(list(range(len(slot_ids))))
    reference = lora_reference(y.clone(), x, slots, LoraBatch.build(slot_ids, ranks, torch.device("cpu")))
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-5)
    for row in range(len(slot_ids)):
        assert torch.equal(run([row])[0], whole[row]), f"token {row} alone differs from its batch"


@pytest.mark.parametrize("case", ["mixed_padded", "one_slot", "prefill_and_decode"])
def test_a_group_of_projections_in_one_call_has_each_ones_bits(op_slots, case: str) -> None:
    """lora_cpu_group over projections that read the same x (here: three with 40, 8 and 64 outputs, each with its
    own adapters) gives each projection the bits of a lora_cpu call for it alone, and the group form of any other
    op (each_projection) its own results."""
    slots, _, ranks = op_slots
    generator = torch.Generator().manual_seed(5)
    projections = [slots]
    for out_features in (8, 64):
        other = LoraSlots(NUM_SLOTS, MAX_RANK, IN_FEATURES, out_features, torch.float32, torch.device("cpu"))
        for slot, (rank, scale) in ADAPTERS.items():
            other.set_slot(slot, torch.randn(rank, IN_FEATURES, generator=generator),
                           torch.randn(out_features, rank, generator=generator), scale)
        projections.append(other)
    group = SlotSet(projections)
    batch = LoraBatch.build(CASES[case], ranks, torch.device("cpu"))
    x = torch.randn(len(CASES[case]), IN_FEATURES, generator=generator)
    ys = [torch.randn(len(CASES[case]), s.B.shape[2], generator=generator) for s in projections]
    together = lora_cpu_group([y.clone() for y in ys], x, group, batch)
    for y, projection_slots, result in zip(ys, projections, together, strict=True):
        assert torch.equal(result, lora_cpu(y.clone(), x, projection_slots, batch))
    each = each_projection(lora_reference, [y.clone() for y in ys], x, group, batch)
    for y, projection_slots, result in zip(ys, projections, each, strict=True):
        assert torch.equal(result, lora_reference(y.clone(), x, projection_slots, batch))
