"""The kernel-choice table: which NF4 matmul, LoRA op and decode attention run for each device, compute
dtype and token count (the GPU rows are read here without a GPU), refusals of kernels that cannot run,
and a CPU engine built by the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.server.engine import Engine, EngineConfig, kernel_choice, lora_cpu, nf4_triton
from loraplex.server.engine.kernel_choice import (
    NF4_TRITON_MAX_TOKENS,
    Toolchain,
    decode_attention,
    lora_impl,
    nf4_plan,
)
from loraplex.server.engine.lora import lora_grouped
from loraplex.server.model_files import iter_weights, model_spec
from support import write_tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
EVERYTHING = Toolchain(cpu_kernels=True, triton=True)
NOTHING = Toolchain(cpu_kernels=False, triton=False)
SMOLLM2_IN_FEATURES = [576, 1536]  # hidden and intermediate sizes: multiples of 32

SMOLLM2_HEADS = (9, 3, 64)  # query heads, kv heads, head_dim

#: (device, dtype, toolchain, tokens in the step) -> (NF4 base matmul, LoRA op, decode attention), everything
#: left at "auto".
TABLE = [
    (CPU, F32, EVERYTHING, 1, ("nf4_cpu", "cpu_kernel", "torch")),
    (CPU, F32, EVERYTHING, 512, ("nf4_cpu", "cpu_kernel", "torch")),  # nf4_cpu runs dequantize + BLAS inside
    (CPU, BF16, EVERYTHING, 1, ("nf4_cpu", "grouped", "torch")),
    (CPU, F16, EVERYTHING, 1, ("bitsandbytes", "grouped", "torch")),
    (CPU, F32, NOTHING, 1, ("bitsandbytes", "grouped", "torch")),  # no C++ compiler
    (CUDA, BF16, EVERYTHING, 1, ("nf4_triton", "triton", "triton")),  # decode of one sequence
    (CUDA, BF16, EVERYTHING, NF4_TRITON_MAX_TOKENS, ("nf4_triton", "triton", "triton")),
    (CUDA, BF16, EVERYTHING, NF4_TRITON_MAX_TOKENS + 1, ("bitsandbytes", "triton", "triton")),  # + cuBLAS
    (CUDA, BF16, EVERYTHING, 2048, ("bitsandbytes", "triton", "triton")),  # prefill
    (CUDA, F16, EVERYTHING, 8, ("nf4_triton", "triton", "triton")),
    (CUDA, F32, EVERYTHING, 8, ("nf4_triton", "triton", "triton")),
    (CUDA, BF16, NOTHING, 1, ("bitsandbytes", "grouped", "torch")),  # no Triton installed
]


@pytest.mark.parametrize(("device", "dtype", "tools", "tokens", "expected"), TABLE)
def test_the_kernel_choice_table(device, dtype, tools, tokens, expected) -> None:
    plan = nf4_plan(device, dtype, SMOLLM2_IN_FEATURES, tools)
    chosen = (plan.kernel_for(tokens), lora_impl(device, dtype, tools), decode_attention(device, *SMOLLM2_HEADS, tools))
    assert chosen == expected


@pytest.mark.parametrize(("heads", "expected"), [
    ((32, 8, 128), "triton"),  # Llama-3-8B
    ((16, 16, 64), "triton"),  # no GQA
    ((8, 2, 24), "torch"),  # head_dim not a power of two
    ((64, 2, 64), "torch"),  # GQA groups of 32 query heads
])
def test_decode_attention_on_cuda_needs_shapes_the_kernel_tiles(heads, expected: str) -> None:
    assert decode_attention(CUDA, *heads, EVERYTHING) == expected


def test_a_cpu_projection_the_fused_kernel_cannot_hold_falls_back_to_bitsandbytes() -> None:
    assert nf4_plan(CPU, F32, [576, 1000], EVERYTHING).kernel_for(1) == "bitsandbytes"  # 1000 % 32 != 0


def test_explicit_choices_win_over_the_table() -> None:
    assert nf4_plan(CUDA, BF16, SMOLLM2_IN_FEATURES, EVERYTHING, "bitsandbytes").kernel_for(1) == "bitsandbytes"
    assert nf4_plan(CPU, F32, SMOLLM2_IN_FEATURES, EVERYTHING, "fused").kernel_for(1) == "nf4_cpu"
    assert lora_impl(CUDA, BF16, EVERYTHING, "grouped") == "grouped"
    assert lora_impl(CPU, F32, EVERYTHING, "reference") == "reference"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: nf4_plan(CUDA, BF16, SMOLLM2_IN_FEATURES, EVERYTHING, "fused"), "nf4_kernel='fused' needs the CPU"),
    (lambda: nf4_plan(CPU, F32, SMOLLM2_IN_FEATURES, EVERYTHING, "triton"), "nf4_kernel='triton' needs a CUDA"),
    (lambda: nf4_plan(CUDA, BF16, SMOLLM2_IN_FEATURES, NOTHING, "triton"), "nf4_kernel='triton' needs a CUDA"),
    (lambda: lora_impl(CUDA, BF16, EVERYTHING, "cpu_kernel"), "lora_impl='cpu_kernel' needs float32 on the CPU"),
    (lambda: lora_impl(CPU, F32, EVERYTHING, "triton"), "lora_impl='triton' needs a CUDA device"),
])
def test_asking_for_a_kernel_that_cannot_run_is_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_each_plan_names_the_module_that_runs_it() -> None:
    assert kernel_choice.Nf4Plan("nf4_triton", NF4_TRITON_MAX_TOKENS).kernel_module() is nf4_triton
    assert kernel_choice.BITSANDBYTES.kernel_module() is None
    assert kernel_choice.lora_op("triton").__module__ == "loraplex.server.engine.lora_triton"
    assert kernel_choice.lora_op("grouped") is lora_grouped
    assert kernel_choice.lora_group_op("cpu_kernel") is lora_cpu.lora_cpu_group  # one call for q, k and v
    assert kernel_choice.lora_group_op("grouped").args == (lora_grouped,)  # each projection in turn


@pytest.mark.parametrize(("device", "lora", "attention", "requested", "expected"), [
    (CUDA, "triton", "triton", True, True),
    (CUDA, "triton", "triton", False, False),  # off unless asked for (engine.cuda_graphs)
    (CPU, "cpu_kernel", "torch", False, False),
])
def test_decode_graphs_are_used_when_asked_for_and_the_kernels_allow(device, lora, attention, requested,
                                                                    expected: bool) -> None:
    assert kernel_choice.decode_graphs(device, lora, attention, requested) is expected


@pytest.mark.parametrize(("device", "lora", "attention"), [
    (CPU, "cpu_kernel", "torch"), (CUDA, "grouped", "triton"), (CUDA, "triton", "torch")])
def test_decode_graphs_are_refused_where_a_kernel_would_not_replay(device, lora: str, attention: str) -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        kernel_choice.decode_graphs(device, lora, attention, True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama") / "base")


def test_a_cpu_engine_is_built_by_the_table(tiny_llama: Path) -> None:
    engine = Engine(model_spec(tiny_llama), iter_weights(tiny_llama),
                    EngineConfig(num_slots=1, max_rank=8, kv_cache_bytes=2**20))
    tools = Toolchain.detect(CPU)
    in_features = sorted({engine.spec.projection_shape(p)[0] for p in ("q_proj", "down_proj")})
    assert engine.nf4_plan == nf4_plan(CPU, F32, in_features, tools)
    assert engine.lora_impl == lora_impl(CPU, F32, tools)
    assert engine.decode_attention == "torch"
    assert all(p.base.plan == engine.nf4_plan for _, _, p in engine.model.projections())
    assert engine.lora_impl == "cpu_kernel" and engine.model.lora_op is lora_cpu.lora_cpu_group  # CI has a C++ compiler


def test_a_cpu_engine_runs_where_triton_is_not_installed(tiny_llama: Path) -> None:
    """Triton is an optional import: with `import triton` failing, a CPU engine starts, generates, and never
    loads a Triton kernel module."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError, as where it is not installed\n"
        "from pathlib import Path\n"
        "from loraplex.server.engine import Engine, EngineConfig, SamplingParams\n"
        "from loraplex.server.model_files import iter_weights, model_spec\n"
        "folder = Path(sys.argv[1])\n"
        "config = EngineConfig(num_slots=1, max_rank=8, kv_cache_bytes=2**20)\n"
        "e = Engine(model_spec(folder), iter_weights(folder), config)\n"
        "print(e.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0])\n"
        "assert not [m for m in sys.modules if m.startswith('loraplex') and m.endswith('_triton')], 'Triton used'\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU engine on a GPU machine too
    done = subprocess.run([sys.executable, "-c", script, str(tiny_llama)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split(",")) == 3  # three generated token ids
