"""The core test: every row of a mixed-adapter batch equals transformers + PEFT running that row alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import Engine, EngineConfig, SamplingParams
from loraplex.server.model_files import iter_weights, model_spec
from support import (
    ALL_LINEAR,
    ARCHITECTURES,
    MIXED_ADAPTERS,
    AdapterSpec,
    reference_generate,
    write_adapter,
    write_tiny_model,
)

NEW_TOKENS = 16
#: (prompt length, adapter index into MIXED_ADAPTERS or None for the base), one row each.
ROWS = [(5, None), (11, 0), (3, 1), (17, None), (9, 2), (20, 3), (7, 1), (13, 2)]


def record_logits(engine: Engine) -> list[torch.Tensor]:
    """Keep each step's logits by wrapping the engine model's forward (test-only instrumentation)."""
    steps: list[torch.Tensor] = []
    forward = engine.model.forward

    def recording_forward(*args):
        logits = forward(*args)
        steps.append(logits.clone())
        return logits

    engine.model.forward = recording_forward
    return steps


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = write_tiny_model(arch, root / "base")
    adapters = {s.name: write_adapter(base, s, root / s.name, seed=10 + i) for i, s in enumerate(MIXED_ADAPTERS)}
    generator = torch.Generator().manual_seed(1)
    vocab = model_spec(base).vocab_size
    rows = [(torch.randint(0, vocab, (length,), generator=generator).tolist(),
             None if index is None else MIXED_ADAPTERS[index].name) for length, index in ROWS]
    return arch, base, adapters, rows


def run_engine(base: Path, adapters: dict[str, Path], rows, quantize: bool, lora_impl: str = "auto",
               new_tokens: int = NEW_TOKENS, device: str = "cpu", compute_dtype: str = "float32",
               nf4_kernel: str = "auto"):
    engine = Engine(model_spec(base), iter_weights(base),
                    EngineConfig(quantize=quantize, num_slots=8, max_rank=64, block_size=4, device=device,
                                 compute_dtype=compute_dtype, kv_cache_bytes=64 * 2**20, lora_impl=lora_impl,
                                 nf4_kernel=nf4_kernel))
    slot_of = {}
    for slot, (name, folder) in enumerate(adapters.items()):
        engine.set_slot(slot, read_lora_weights(folder))
        slot_of[name] = slot
    steps = record_logits(engine)
    outputs = engine.generate([p for p, _ in rows], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                              slots=[-1 if a is None else slot_of[a] for _, a in rows])
    logits = torch.stack(steps, dim=1).float().cpu()  # [rows, steps, vocab]: every row runs every step
    return outputs, logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_parity(setup, quantize: bool, tolerance: float, new_tokens: int = NEW_TOKENS, device: str = "cpu",
                  compute_dtype: str = "float32") -> None:
    arch, base, adapters, rows = setup
    expected = reference_generate(base, adapters, rows, new_tokens, quantized=quantize, device=device,
                                  dtype=getattr(torch, compute_dtype))
    outputs, logits = run_engine(base, adapters, rows, quantize, new_tokens=new_tokens, device=device,
                                 compute_dtype=compute_dtype)
    outputs_distinct = {tuple(o) for o in outputs}
    assert len(outputs_distinct) > len(rows) // 2, "adapters should change the outputs"
    for row, ((ref_tokens, ref_logits), tokens) in enumerate(zip(expected, outputs, strict=True)):
        assert tokens == ref_tokens, f"{arch} row {row} ({rows[row][1]}): tokens differ"
        error = relative_error(logits[row], ref_logits)
        assert error < tolerance, f"{arch} row {row} ({rows[row][1]}): logits relative error {error:.2e}"


def test_mixed_batch_matches_peft_unquantized(tiny_setup):
    assert_parity(tiny_setup, quantize=False, tolerance=1e-4)


def test_mixed_batch_matches_peft_nf4(tiny_setup):
    assert_parity(tiny_setup, quantize=True, tolerance=1e-3)


#: bfloat16 keeps 8 significant bits: activations are rounded to ~2**-8 relative at every layer, in a
#: different order than transformers' (attention, norms, oneDNN's matmul blocking), so logits agree to
#: about ten such steps.
BF16_TOLERANCE = 4e-2
#: The same for SmolLM2's 30 layers (see test_smollm2_bfloat16_matches_peft_bfloat16).
SMOLLM2_BF16_TOLERANCE = 8e-2


def test_bfloat16_fused_kernel_matches_bitsandbytes(tiny_setup):
    """compute_dtype bfloat16: the fused kernel's engine and the bitsandbytes engine produce identical
    tokens on the mixed batch, logits within two bf16 steps (same bf16-rounded dequantized weights; the
    products are summed in another order, so a rounding to bf16 can land one step apart)."""
    _, base, adapters, rows = tiny_setup
    fused = run_engine(base, adapters, rows, quantize=True, compute_dtype="bfloat16")
    portable = run_engine(base, adapters, rows, quantize=True, compute_dtype="bfloat16", nf4_kernel="bitsandbytes")
    assert fused[0] == portable[0]
    assert relative_error(fused[1], portable[1]) < 2 * 2**-8


def test_bfloat16_first_step_matches_peft_bfloat16(tiny_setup):
    """Against transformers + PEFT loaded in bfloat16 on the same NF4 weights: every row's first token
    (prefill) is the same and its logits are within BF16_TOLERANCE. Later steps are not compared: on these
    random tiny models bf16 rounding flips near-tied greedy picks after a few tokens on both engines alike."""
    arch, base, adapters, rows = tiny_setup
    expected = reference_generate(base, adapters, rows, 1, quantized=True, dtype=torch.bfloat16)
    outputs, logits = run_engine(base, adapters, rows, quantize=True, new_tokens=1, compute_dtype="bfloat16")
    for row, ((ref_tokens, ref_logits), tokens) in enumerate(zip(expected, outputs, strict=True)):
        assert tokens == ref_tokens, f"{arch} row {row}: first token differs"
        error = relative_error(logits[row], ref_logits)
        assert error < BF16_TOLERANCE, f"{arch} row {row}: logits relative error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_mixed_batch_matches_peft_on_cuda(tiny_setup, quantize):
    """The same equivalence with everything on the GPU (grouped LoRA op, bnb CUDA kernels)."""
    assert_parity(tiny_setup, quantize=quantize, tolerance=1e-4 if not quantize else 1e-3, device="cuda")


@pytest.mark.parametrize("lora_impl", ["grouped", "cpu_kernel"])
def test_fast_lora_paths_match_reference_op(tiny_setup, lora_impl):
    _, base, adapters, rows = tiny_setup
    fast_tokens, fast_logits = run_engine(base, adapters, rows, quantize=True, lora_impl=lora_impl)
    reference_tokens, reference_logits = run_engine(base, adapters, rows, quantize=True, lora_impl="reference")
    assert fast_tokens == reference_tokens
    assert relative_error(fast_logits, reference_logits) < 1e-5


# -- the real default model ------------------------------------------------------------------------

SMOLLM2_ADAPTERS = (
    AdapterSpec("qv_r8", 8, ("q_proj", "v_proj")),
    AdapterSpec("all_r16_rslora", 16, ALL_LINEAR, rslora=True),
    AdapterSpec("mlp_r32", 32, ("gate_proj", "up_proj", "down_proj")),
)
SMOLLM2_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def smollm2_setup(tmp_path_factory):
    base = default_model_path()
    root = tmp_path_factory.mktemp("smollm2")
    adapters = {s.name: write_adapter(base, s, root / s.name, seed=30 + i, b_scale=0.05)
                for i, s in enumerate(SMOLLM2_ADAPTERS)}
    generator = torch.Generator().manual_seed(2)
    rows = [(torch.randint(100, 49000, (length,), generator=generator).tolist(), name)
            for length, name in [(12, None), (21, "qv_r8"), (9, "all_r16_rslora"), (30, "mlp_r32"), (15, "qv_r8")]]
    return "smollm2", base, adapters, rows


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_peft_unquantized(smollm2_setup):
    assert_parity(smollm2_setup, quantize=False, tolerance=1e-4, new_tokens=SMOLLM2_NEW_TOKENS)


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_peft_nf4(smollm2_setup):
    assert_parity(smollm2_setup, quantize=True, tolerance=1e-3, new_tokens=SMOLLM2_NEW_TOKENS)


@pytest.mark.slow
def test_smollm2_bfloat16_matches_peft_bfloat16(smollm2_setup):
    """compute_dtype bfloat16 (AMX where the CPU has it) against transformers + PEFT in bfloat16 on the same
    NF4 weights: identical greedy tokens on every row of the mixed batch, logits within BF16_TOLERANCE. A
    real model's logits are peaked enough that bf16 rounding does not flip its greedy picks here.

    The tolerance is SMOLLM2_BF16_TOLERANCE: 30 layers round activations to bf16 about 15 times as often
    as the tiny models' 2, and those steps add up like a random walk (sqrt(15) x BF16_TOLERANCE's ten
    steps would be 0.15); measured: 4.4e-2 at most (Xeon, AMX)."""
    assert_parity(smollm2_setup, quantize=True, tolerance=SMOLLM2_BF16_TOLERANCE, new_tokens=SMOLLM2_NEW_TOKENS,
                  compute_dtype="bfloat16")
