"""The core test: every row of a mixed-adapter batch equals transformers + PEFT running that row alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.engine import Engine, EngineConfig, SamplingParams
from loraplex.server.model_files import iter_weights, model_spec
from support import ARCHITECTURES, MIXED_ADAPTERS, reference_generate, write_adapter, write_tiny_model

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


def run_engine(base: Path, adapters: dict[str, Path], rows, quantize: bool, lora_impl: str = "auto"):
    engine = Engine(model_spec(base), iter_weights(base),
                    EngineConfig(quantize=quantize, num_slots=8, max_rank=64, block_size=4,
                                 kv_cache_bytes=4 * 2**20, lora_impl=lora_impl))
    slot_of = {}
    for slot, (name, folder) in enumerate(adapters.items()):
        engine.set_slot(slot, read_lora_weights(folder))
        slot_of[name] = slot
    steps = record_logits(engine)
    outputs = engine.generate([p for p, _ in rows], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                              slots=[-1 if a is None else slot_of[a] for _, a in rows])
    logits = torch.stack(steps, dim=1)  # [rows, steps, vocab]: every row runs every step
    return outputs, logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_parity(setup, quantize: bool, tolerance: float) -> None:
    arch, base, adapters, rows = setup
    expected = reference_generate(base, adapters, rows, NEW_TOKENS, quantized=quantize)
    outputs, logits = run_engine(base, adapters, rows, quantize)
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


@pytest.mark.parametrize("lora_impl", ["grouped", "cpu_kernel"])
def test_fast_lora_paths_match_reference_op(tiny_setup, lora_impl):
    _, base, adapters, rows = tiny_setup
    fast_tokens, fast_logits = run_engine(base, adapters, rows, quantize=True, lora_impl=lora_impl)
    reference_tokens, reference_logits = run_engine(base, adapters, rows, quantize=True, lora_impl="reference")
    assert fast_tokens == reference_tokens
    assert relative_error(fast_logits, reference_logits) < 1e-5
