"""Which kernel runs each op of a projection, by device, compute dtype and token count: the engine's
one kernel-choice table.

With `engine.nf4_kernel` and `engine.lora_impl` left at "auto":

| device | compute dtype | tokens per step          | NF4 base matmul         | LoRA op    | decode attention |
|--------|---------------|--------------------------|-------------------------|------------|------------------|
| cpu    | float32       | any                      | nf4_cpu (fused)         | cpu_kernel | torch            |
| cpu    | bfloat16      | any                      | nf4_cpu (fused)         | grouped    | torch            |
| cpu    | float16       | any                      | bitsandbytes            | grouped    | torch            |
| cuda   | any           | <= NF4_TRITON_MAX_TOKENS | nf4_triton              | triton     | triton           |
| cuda   | any           | > NF4_TRITON_MAX_TOKENS  | bitsandbytes (+ cuBLAS) | triton     | triton           |

and, wherever a kernel cannot run (no C++ compiler for the CPU kernels, no Triton for the CUDA ones,
a CPU projection whose in_features is not a multiple of 32), bitsandbytes and `grouped`. Decode
attention "torch" is `attention.paged_attention`'s own path: `attention_cpu`'s kernel where it
supports the step (CPU, float32 or bfloat16), else batched calls over gathered rows; "triton" needs a
head_dim that is a power of two >= 16 and GQA groups of at most TRITON_ATTENTION_MAX_GROUP heads.
Prefill chunks are attended by torch on every device.

Decode steps replay CUDA graphs (cuda_graphs.py, `engine.cuda_graphs`, off by default until measured
on a GPU) only where every kernel of the step is a CUDA one that reads device-side bounds: the triton
LoRA op and the triton decode attention (`decode_graphs`). nf4_cpu switches to dequantize + BLAS
inside itself from its own threshold, measured on the CPU (`nf4_cpu.calibrated_blas_min_tokens()`); the
CUDA path switches kernels here, per call, in `BaseLinear.forward`. Every choice computes the same
dequantized weights and `lora_reference`'s op (tests/engine/test_kernel_choice.py asserts the table).

Asking for a kernel that cannot run (`nf4_kernel="fused"` on CUDA, say) is a ValueError at start-up.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from loraplex.server.engine import lora_cpu, nf4_cpu
from loraplex.server.engine.lora import LoraGroupOp, LoraOp, each_projection, lora_grouped, lora_reference

#: Token counts up to which CUDA projections run the Triton NF4 kernel (bitsandbytes + cuBLAS above): one
#: tl.dot tile of tokens. Not yet measured on a GPU: benchmarks/engine_throughput.py's projection rows
#: on CUDA are the place to move it.
NF4_TRITON_MAX_TOKENS = 16
#: Query heads per kv head the Triton decode attention handles (one tl.dot tile of rows).
TRITON_ATTENTION_MAX_GROUP = 16


@dataclass(frozen=True)
class Toolchain:
    """What this process can run besides torch and bitsandbytes."""

    cpu_kernels: bool
    """The compiled CPU kernels (nf4_cpu, lora_cpu) build here."""
    triton: bool
    """Triton is installed (the CUDA kernels)."""

    @staticmethod
    def detect(device: torch.device) -> Toolchain:
        """The kernels that could serve `device`: the CPU ones are compiled (once) only for a CPU engine."""
        on_cpu = device.type == "cpu"
        return Toolchain(cpu_kernels=on_cpu and nf4_cpu.available() and lora_cpu.available(),
                         triton=device.type == "cuda" and importlib.util.find_spec("triton") is not None)


@dataclass(frozen=True)
class Nf4Plan:
    """Which NF4 matmul a projection runs at each token count: `kernel` up to `max_tokens`, bitsandbytes above."""

    kernel: str
    """"nf4_cpu", "nf4_triton" or "bitsandbytes"."""
    max_tokens: int = sys.maxsize

    def kernel_for(self, num_tokens: int) -> str:
        """The kernel a call with `num_tokens` tokens runs."""
        return self.kernel if num_tokens <= self.max_tokens else "bitsandbytes"

    def kernel_module(self) -> ModuleType | None:
        """The module whose `nf4_linear(x, Nf4Weight, bias)` runs `kernel`; None for bitsandbytes."""
        if self.kernel == "nf4_cpu":
            return nf4_cpu
        if self.kernel == "nf4_triton":
            from loraplex.server.engine import nf4_triton  # imports Triton: CUDA engines only

            return nf4_triton
        return None


BITSANDBYTES = Nf4Plan("bitsandbytes")


def nf4_plan(device: torch.device, dtype: torch.dtype, in_features: list[int], tools: Toolchain,
             requested: str = "auto") -> Nf4Plan:
    """The NF4 plan of a model's projections (`in_features`: each distinct projection's), for
    engine.nf4_kernel `requested` ("auto", "fused" (nf4_cpu), "triton" or "bitsandbytes")."""
    cpu_fits = tools.cpu_kernels and all(nf4_cpu.supports((0, k), device, dtype) for k in in_features)
    cuda_fits = tools.triton and device.type == "cuda"
    if requested == "fused" and not cpu_fits:
        raise ValueError("nf4_kernel='fused' needs the CPU, float32 or bfloat16 compute, in_features that are "
                         "multiples of 32, and a C++ compiler; use 'auto' or 'bitsandbytes'")
    if requested == "triton" and not cuda_fits:
        raise ValueError("nf4_kernel='triton' needs a CUDA device and Triton installed; use 'auto' or 'bitsandbytes'")
    if requested == "bitsandbytes":
        return BITSANDBYTES
    if cpu_fits and requested in ("auto", "fused"):
        return Nf4Plan("nf4_cpu")
    if cuda_fits and requested in ("auto", "triton"):
        return Nf4Plan("nf4_triton", NF4_TRITON_MAX_TOKENS)
    return BITSANDBYTES


def lora_impl(device: torch.device, dtype: torch.dtype, tools: Toolchain, requested: str = "auto") -> str:
    """The LoRA op's name for engine.lora_impl `requested` ("auto", "cpu_kernel", "triton", "grouped",
    "reference")."""
    cpu_fits = tools.cpu_kernels and device.type == "cpu" and dtype == torch.float32
    cuda_fits = tools.triton and device.type == "cuda"
    if requested == "cpu_kernel" and not cpu_fits:
        raise ValueError("lora_impl='cpu_kernel' needs float32 on the CPU and a C++ compiler")
    if requested == "triton" and not cuda_fits:
        raise ValueError("lora_impl='triton' needs a CUDA device and Triton installed")
    if requested != "auto":
        return requested
    if cpu_fits:
        return "cpu_kernel"
    return "triton" if cuda_fits else "grouped"


def lora_op(name: str) -> LoraOp:
    """The function computing LoRA op `name` (see `lora_impl`)."""
    if name == "triton":
        from loraplex.server.engine import lora_triton  # imports Triton: CUDA engines only

        return lora_triton.lora_triton
    return {"grouped": lora_grouped, "reference": lora_reference, "cpu_kernel": lora_cpu.lora_cpu}[name]


def lora_group_op(name: str) -> LoraGroupOp:
    """LoRA op `name` for projections that read the same x: the CPU kernel's one call for all of them, else the op on
    each in turn."""
    if name == "cpu_kernel":
        return lora_cpu.lora_cpu_group
    return functools.partial(each_projection, lora_op(name))


def triton_attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether attention_triton's decode kernel serves this attention shape (see the table)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0
            and heads // kv_heads <= TRITON_ATTENTION_MAX_GROUP)


def decode_attention(device: torch.device, heads: int, kv_heads: int, head_dim: int, tools: Toolchain) -> str:
    """Who attends a step's decode sequences: "triton" or "torch" (see the table)."""
    if device.type == "cuda" and tools.triton and triton_attention_fits(heads, kv_heads, head_dim):
        return "triton"
    return "torch"


def decode_graphs(device: torch.device, lora: str, attention: str, requested: bool) -> bool:
    """Whether plain decode steps replay CUDA graphs: when asked for (engine.cuda_graphs) and the step's
    kernels allow it (a CUDA device, the "triton" LoRA op and decode attention)."""
    if requested and not (device.type == "cuda" and lora == "triton" and attention == "triton"):
        raise ValueError("cuda_graphs needs a CUDA device with Triton, lora_impl 'triton' (or 'auto') and a model "
                         "whose attention the Triton decode kernel serves (head_dim a power of two >= 16)")
    return requested
