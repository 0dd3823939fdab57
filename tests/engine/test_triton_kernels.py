"""The Triton kernels (lora_triton, nf4_triton, attention_triton) against their oracles: `lora_reference`,
bitsandbytes' dequantize + matmul, and `batch_invariant_attention` over gathered rows.

On CUDA they run compiled on the GPU (float32 and bfloat16); elsewhere in Triton's interpreter on CPU
tensors (`TRITON_INTERPRET=1`, which tests/conftest.py sets before anything imports Triton). The
interpreter does not emulate bfloat16 faithfully (its bf16 `tl.dot` returns garbage), so the bfloat16
cases are collected on CUDA only. Shapes are small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import copy
import os

import bitsandbytes.functional as bnbf
import pytest
import torch

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.engine import (
    Engine,
    EngineConfig,
    SamplingParams,
    attention_triton,
    kernel_choice,
    lora_triton,
    nf4_triton,
)
from loraplex.server.engine.attention import AttentionBatch, batch_invariant_attention, paged_attention
from loraplex.server.engine.kernel_choice import NF4_TRITON_MAX_TOKENS, Nf4Plan
from loraplex.server.engine.lora import LARGE_GROUP, NO_ADAPTER, LoraBatch, LoraSlots, lora_reference
from loraplex.server.engine.nf4 import NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, BaseLinear
from loraplex.server.engine.nf4_cpu import Nf4Weight
from loraplex.server.model_files import iter_weights, model_spec
from support import MIXED_ADAPTERS, write_adapter, write_tiny_model

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(nf4_triton._nf4_matmul, InterpretedFunction) and os.environ.get("TRITON_INTERPRET") == "1", (
        "without CUDA the kernels must be interpreted: Triton was imported before conftest.py set TRITON_INTERPRET")
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if ON_CUDA else [torch.float32]
#: |kernel - reference| / max |reference| allowed: summation order differs (and bfloat16 rounds the hidden).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# -- multi-LoRA -------------------------------------------------------------------------------------

IN_FEATURES, OUT_FEATURES = 160, 144  # neither a multiple of the kernels' K / N tiles
MAX_RANK = 32
#: Rank of each slot's adapter; slot 3 holds nothing in this projection (an adapter that does not target it).
RANKS = [8, 32, 4, 16]


@pytest.fixture(params=DTYPES, ids=str)
def slots(request) -> LoraSlots:
    dtype = request.param
    generator = torch.Generator().manual_seed(0)
    buffers = LoraSlots(len(RANKS), MAX_RANK, IN_FEATURES, OUT_FEATURES, dtype, DEVICE)
    for slot, rank in enumerate(RANKS[:3]):
        buffers.set_slot(slot, torch.randn(rank, IN_FEATURES, generator=generator).to(dtype),
                         torch.randn(OUT_FEATURES, rank, generator=generator).to(dtype), 0.5 + slot)
    return buffers


def run_both(slots: LoraSlots, slot_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y before, lora_triton's y, lora_reference's y) for random x and y of len(slot_ids) tokens."""
    generator = torch.Generator().manual_seed(len(slot_ids))
    dtype = slots.A.dtype
    x = torch.randn(len(slot_ids), IN_FEATURES, generator=generator).to(DEVICE, dtype)
    y = torch.randn(len(slot_ids), OUT_FEATURES, generator=generator).to(DEVICE, dtype)
    batch = LoraBatch.build(slot_ids, RANKS, DEVICE)
    return y, lora_triton.lora_triton(y.clone(), x, slots, batch), lora_reference(y.clone(), x, slots, batch)


def assert_matches(slots: LoraSlots, slot_ids: list[int]) -> None:
    before, fast, reference = run_both(slots, slot_ids)
    base_rows = torch.tensor([s == NO_ADAPTER for s in slot_ids], device=DEVICE)
    assert torch.equal(fast[base_rows], before[base_rows]), "slot -1 rows must be left untouched"
    assert relative_error(fast, reference) < TOLERANCE[slots.A.dtype]
    assert relative_error(fast - before, reference - before) < 10 * TOLERANCE[slots.A.dtype]


def test_decode_tokens_of_mixed_slots_and_ranks_go_through_bgmv(slots: LoraSlots) -> None:
    slot_ids = [2, NO_ADAPTER, 0, 1, 1, NO_ADAPTER, 2, 0, 1]  # one token per sequence, slots repeat
    assert_matches(slots, slot_ids)


def test_prefill_segments_go_through_sgmv(slots: LoraSlots) -> None:
    """Two prefill chunks of LARGE_GROUP + 5 and LARGE_GROUP tokens (SGMV over full token tiles and a
    partial one), a base-model prompt between them, and decode tokens in the same step: slot 2's goes
    through BGMV, slot 0's joins its slot's prefill segment (segments are per slot, not per sequence)."""
    slot_ids = [1] * (LARGE_GROUP + 5) + [NO_ADAPTER] * 3 + [0] * LARGE_GROUP + [2, NO_ADAPTER, 0]
    batch = LoraBatch.build(slot_ids, RANKS, DEVICE)
    assert batch.large_groups.slots.tolist() == [1, 0] and batch.small_slots.tolist() == [2]
    assert_matches(slots, slot_ids)


def test_a_slot_without_weights_for_this_projection_adds_exactly_zero(slots: LoraSlots) -> None:
    """Slot 3's adapter has rank 16 elsewhere but does not target this projection: its rows here are zero."""
    slot_ids = [3] * (LARGE_GROUP + 1) + [3, NO_ADAPTER, 3]
    before, fast, _ = run_both(slots, slot_ids)
    assert torch.equal(fast, before)


def test_a_batch_without_adapters_is_left_alone(slots: LoraSlots) -> None:
    before, fast, _ = run_both(slots, [NO_ADAPTER] * 4)
    assert torch.equal(fast, before)


# -- NF4 matmul -------------------------------------------------------------------------------------

NF4_OUT, NF4_IN = 80, 192  # 192 = 1.5 K tiles; 80 = 2.5 N tiles


@pytest.fixture(scope="module")
def quantized() -> tuple[torch.Tensor, bnbf.QuantState]:
    weight = torch.randn(NF4_OUT, NF4_IN, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return bnbf.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=NF4_DOUBLE_QUANT,
                              quant_type="nf4")


def dequantized(quantized, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own dequantized weight [out, in] in `dtype` (the oracle)."""
    packed, state = quantized
    state = copy.copy(state)
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_values_are_bit_identical_to_bitsandbytes(quantized, dtype: torch.dtype) -> None:
    """One-hot rows read single weights out of the product exactly: row k of x = e_k gives W[:, k]."""
    weight = Nf4Weight.from_quant_state(*quantized)
    identity = torch.eye(NF4_IN, dtype=dtype, device=DEVICE)  # [in, in]
    columns = nf4_triton.nf4_linear(identity, weight)  # [in, out] = dequant(W).T
    assert columns.dtype == dtype
    assert torch.equal(columns.T, dequantized(quantized, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 17])
def test_nf4_matmul_matches_bitsandbytes_dequantize_then_matmul(quantized, dtype: torch.dtype,
                                                               num_tokens: int) -> None:
    generator = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, NF4_IN, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(NF4_OUT, generator=generator).to(DEVICE, dtype)
    expected = x.float() @ dequantized(quantized, dtype).float().T + bias.float()  # [tokens, out]
    actual = nf4_triton.nf4_linear(x, Nf4Weight.from_quant_state(*quantized), bias)
    assert actual.shape == (num_tokens, NF4_OUT) and actual.dtype == dtype
    assert relative_error(actual, expected) < TOLERANCE[dtype]


def test_nf4_matmul_refuses_x_of_the_wrong_width(quantized) -> None:
    with pytest.raises(ValueError, match="x has 64 features, the NF4 weight 192"):
        nf4_triton.nf4_linear(torch.zeros(2, 64, device=DEVICE), Nf4Weight.from_quant_state(*quantized))


def test_base_linear_runs_the_triton_kernel_up_to_its_token_count_then_bitsandbytes() -> None:
    """`BaseLinear` with the CUDA row's plan: nf4_triton up to max_tokens, bitsandbytes' matmul_4bit above."""
    import bitsandbytes as bnb

    weight = torch.randn(NF4_OUT, NF4_IN, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    linear = BaseLinear(weight, torch.float32, quantize=True, plan=Nf4Plan("nf4_triton", max_tokens=4))
    assert linear.kernel is nf4_triton
    for num_tokens in (4, 5):
        x = torch.randn(num_tokens, NF4_IN, generator=torch.Generator().manual_seed(num_tokens)).to(DEVICE)
        portable = bnb.matmul_4bit(x, linear.packed_weight.t(), quant_state=linear.quant_state)
        if num_tokens <= 4:
            assert torch.equal(linear.forward(x), nf4_triton.nf4_linear(x, linear.kernel_weight))
            assert relative_error(linear.forward(x), portable) < TOLERANCE[torch.float32]
        else:
            assert torch.equal(linear.forward(x), portable)


# -- decode attention -------------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, CACHE_ROWS = 8, 2, 16, 512
#: Context lengths of the decode sequences: one position, under one tile, over two tiles (BLOCK_N = 64).
DECODE_LENGTHS = (1, 5, 150)


@pytest.mark.parametrize("window", [None, 8], ids=["causal", "window8"])
def test_decode_attention_reads_the_paged_cache_like_the_gathered_reference(window: int | None) -> None:
    """A step of decode sequences (contexts scattered over the cache) and a prefill chunk: paged_attention
    with decode_kernel "triton" gives the decode rows batch_invariant_attention's values over gathered
    rows, and the prefill rows its own torch path's."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(CACHE_ROWS, KV_HEADS, HEAD_DIM, generator=generator).to(DEVICE)  # [rows, kv_heads, D]
    values = torch.randn(CACHE_ROWS, KV_HEADS, HEAD_DIM, generator=generator).to(DEVICE)
    scattered = torch.randperm(CACHE_ROWS, generator=generator).tolist()
    sequences, taken = [], 0
    for length in (*DECODE_LENGTHS, 12):  # the last one: a prefill chunk of 4 new tokens
        new = 1 if length in DECODE_LENGTHS else 4
        sequences.append((length - new, new, scattered[taken:taken + length]))
        taken += length
    q = torch.randn(len(DECODE_LENGTHS) + 4, HEADS, HEAD_DIM, generator=generator).to(DEVICE)
    on_triton = AttentionBatch.build(sequences, {None, 8}, DEVICE, decode_kernel="triton")
    on_torch = AttentionBatch.build(sequences, {None, 8}, DEVICE)
    attended = paged_attention(q, keys, values, on_triton, window)  # [tokens, heads, D]

    decode = on_triton.groups[0]
    num_seqs, context = decode.context_rows.shape
    gathered = [t.index_select(0, decode.context_rows.view(-1)).view(num_seqs, context, KV_HEADS, HEAD_DIM)
                .transpose(1, 2) for t in (keys, values)]  # [G, kv_heads, K, D] each
    queries = q[decode.query_index].view(num_seqs, HEADS, 1, HEAD_DIM)
    expected = batch_invariant_attention(queries, *gathered, decode.masks[window]).view(num_seqs, HEADS, HEAD_DIM)
    assert relative_error(attended[decode.query_index], expected) < TOLERANCE[torch.float32]
    prefill = on_torch.groups[1].query_index
    assert torch.equal(attended[prefill], paged_attention(q, keys, values, on_torch, window)[prefill])


def test_decode_attention_refuses_shapes_it_does_not_tile() -> None:
    q = torch.zeros(1, 4, 24, device=DEVICE)  # head_dim 24: not a power of two
    cache = torch.zeros(8, 2, 24, device=DEVICE)
    index = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="4 heads / 2 kv heads of dim 24 unsupported"):
        attention_triton.decode_attention(torch.empty_like(q), q, cache, cache, index, index.view(1, 1), index + 1,
                                          None)


# -- the engine on the CUDA row's kernels -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(base folder, adapter folders): a tiny llama and two adapters of different ranks and targets."""
    root = tmp_path_factory.mktemp("triton-engine")
    base = write_tiny_model("llama", root / "base")
    return base, [write_adapter(base, spec, root / spec.name, seed=20 + i) for i, spec in enumerate(MIXED_ADAPTERS[:2])]


def run_engine(tiny_model, on_triton: bool, monkeypatch) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens and the last step's logits of a mixed batch: a prefill long enough for SGMV, decode
    rows of both adapters and the base. With `on_triton` the engine runs the table's CUDA choices
    (nf4_triton, triton): the table's own on CUDA, forced elsewhere (the kernel choice is patched, nothing
    else); without, bitsandbytes and the grouped LoRA op."""
    base, adapters = tiny_model
    kernels = {} if on_triton else {"nf4_kernel": "bitsandbytes", "lora_impl": "grouped"}
    with monkeypatch.context() as patch:
        if on_triton and not ON_CUDA:
            patch.setattr(kernel_choice, "nf4_plan", lambda *_: Nf4Plan("nf4_triton", NF4_TRITON_MAX_TOKENS))
            patch.setattr(kernel_choice, "lora_impl", lambda *_: "triton")
            patch.setattr(kernel_choice, "decode_attention", lambda *_: "triton")
        engine = Engine(model_spec(base), iter_weights(base), EngineConfig(
            device=str(DEVICE), compute_dtype="float32", num_slots=2, max_rank=16, kv_cache_bytes=2**22, **kernels))
    assert (engine.lora_impl == "triton") == (engine.nf4_plan.kernel == "nf4_triton") == on_triton
    assert (engine.decode_attention == "triton") == (on_triton or ON_CUDA)  # no setting: CUDA's is always Triton
    for slot, folder in enumerate(adapters):
        engine.set_slot(slot, read_lora_weights(folder))
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (LARGE_GROUP + 2, 5, 7, 3)]
    logits: list[torch.Tensor] = []
    forward = engine.model.forward

    def recording_forward(*args: object) -> torch.Tensor:  # test-only instrumentation
        logits.append(forward(*args))
        return logits[-1]

    engine.model.forward = recording_forward
    tokens = engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), slots=[0, 1, -1, 0])
    return tokens, logits[-1].cpu()


def test_an_engine_on_the_triton_kernels_matches_one_on_bitsandbytes_and_grouped(tiny_model, monkeypatch) -> None:
    triton_tokens, triton_logits = run_engine(tiny_model, True, monkeypatch)
    tokens, logits = run_engine(tiny_model, False, monkeypatch)
    assert triton_tokens == tokens
    assert relative_error(triton_logits, logits) < 1e-4


def test_bgmv_given_base_tokens_leaves_them_alone(slots: LoraSlots) -> None:
    """A CUDA-graph decode step hands BGMV every token, slot -1 ones included (cuda_graphs.py)."""
    slot_ids = [1, NO_ADAPTER, 0, NO_ADAPTER, 2]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(len(slot_ids), IN_FEATURES, generator=generator).to(DEVICE, slots.A.dtype)
    y = torch.randn(len(slot_ids), OUT_FEATURES, generator=generator).to(DEVICE, slots.A.dtype)
    every_token = torch.arange(len(slot_ids), device=DEVICE)
    token_slots = torch.tensor(slot_ids, device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE)
    fast = lora_triton.bgmv(y.clone(), x, slots, every_token, token_slots, ranks, MAX_RANK)
    reference = lora_reference(y.clone(), x, slots, LoraBatch.build(slot_ids, RANKS, DEVICE))
    base_rows = token_slots == NO_ADAPTER
    assert torch.equal(fast[base_rows], y[base_rows])
    assert relative_error(fast, reference) < TOLERANCE[slots.A.dtype]
