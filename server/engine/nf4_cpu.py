"""Fused NF4 matmul for the CPU: `y = x @ dequant(W).T (+ b)` straight from bitsandbytes' packed data.

bitsandbytes' CPU path dequantizes the whole weight into a new float tensor on every call, then runs
a separate matmul; for a decode step of a few tokens that reads and writes 8 bytes per weight to
save nothing. This kernel reads the packed 4-bit weight (half a byte per weight plus one byte of
nested absmax per 64 weights).

Decoding. Weights are decoded 32 at a time (16 packed bytes, always inside one 64-weight block):
each nibble picks its NF4 value from a 16-entry table in registers and is multiplied by the block's
absmax, `code2[qabsmax[b]] * absmax2[b / blocksize2] + offset` (two float32 roundings, as
bitsandbytes computes it); element f of the flattened [out, in] weight is the high nibble of byte
f / 2 when f is even, the low one when odd. So every value is bit-identical to
`bitsandbytes.functional.dequantize_4bit`'s (rounded to bfloat16 as well when the compute dtype is
bfloat16, as bitsandbytes does; the nested blocksize, a power of two, by shift). With AVX-512 the
block's 16 products `code[j] * absmax` form the table, and the 16 bytes, zero-extended to 16 lanes,
index it twice with `vpermps` (the low 4 bits: the low nibbles, odd weights; shifted by 4: the high
ones, even weights), with no multiply per weight. With AVX2 the 16 float32 values are split into 4
byte planes and looked up with `vpshufb`, 32 nibbles per instruction; the resulting vectors hold the
even weights of each 8 in their low half and the odd ones in their high half. Either way x is
permuted to the decoded order once per call (`lane_of`), so no per-weight shuffle puts them back.

Multiplying, by token count:
- up to `direct_max_tokens` (decode of a few sequences) each decoded group is used at once from
  registers by every token, tiles of 3 (AVX2) or 4 (AVX-512) rows;
- up to `blas_min_tokens - 1` each tile of rows is decoded into an L1 buffer and multiplied by
  tiles of tokens sharing each weight load (3 rows x 3 tokens with AVX2's 16 registers, 4 x 4
  with AVX-512);
- from `blas_min_tokens` (prefill) the whole weight is decoded into a reused buffer and `addmm`
  runs it: the decoding is amortized over many tokens and BLAS outruns the hand loop.
Threads split the output rows. Below `blas_min_tokens` every (row, token) sum accumulates over k
in the same lane order with explicit FMAs, so a token's result has the same bits whatever batch
it is in. Projections that read the same x (a layer's q, k and v; gate and up) go through one call
(`Nf4Group`): one pass of the threads over all their rows, each output with the bits of its
weight alone; with their adapters' terms too (`Nf4Group.with_lora`: the LoRA kernel's tiles, lora_tiles.h,
each thread adding the expand to the outputs it computed). The BLAS threshold is measured on the CPU at hand
(once, kept beside the build);
`benchmarks/engine_throughput.py` shows both paths per token count (microbenchmark).

bfloat16 compute (`compute_dtype bfloat16`). Weights are rounded to bfloat16 after decoding, as
bitsandbytes does, and x is bfloat16, so every product is exact in float32; the paths differ in how
they are summed (float32 throughout, rounded to bfloat16 once at the end). Where the CPU has AMX
(`bf16_path() == "amx"`), each decoded group becomes bfloat16 with one `vpermw` from the block's
16-entry bf16 table (`code * absmax` rounded as torch rounds it), 32 rows of a tile are decoded into a
buffer (each group just before its products, up to 32 tokens), and AMX multiplies 16 rows x 16
tokens x 32 k per instruction, four sums tiles at a time (two row tiles x two token tiles).
The bits of a token's result do not depend on its batch there either. From `BF16_BLAS_MIN_TOKENS`
(prefill) the weight is decoded into a bfloat16 buffer and oneDNN's bf16 matmul (AMX) runs it; with
AVX512-BF16 but no AMX that BLAS path is used from `calibrated_blas_min_tokens()`, the float32 loop below it.

The same tiles, without decoding, multiply a dense weight read in place (`dense_linear`): the
model's lm_head [vocab, hidden] is not quantized in either engine, and for a decode step's few rows
they outrun BLAS on it; it is read as bfloat16 when its values all are (widened exactly: same bits).

The kernel is compiled on first use for the host CPU (`cpu_extension`, `-march=native`): AMX +
AVX512-BF16, AVX-512, AVX2 + FMA, or plain C++ elsewhere; AMX is used only once Linux has granted the
process its tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked on first use; refused: "avx512_bf16").
Weights whose in_features is not a multiple of 32 are not
handled (`supports` says False): they keep bitsandbytes' path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch

from loraplex.server.engine import cpu_extension
from loraplex.server.engine.lora import LoraBatch, SlotSet

log = logging.getLogger(__name__)

#: Token counts up to which the kernel decodes weights into registers and uses them at once (at most 4).
DIRECT_MAX_TOKENS = 4
#: Token counts tried as the float32 BLAS threshold (`calibrated_blas_min_tokens`), and the [out, in] weight
#: timed (an MLP projection of SmolLM2: the largest share of a step's weights).
CALIBRATION_TOKENS = (48, 64, 96, 128, 192, 256, 384, 512)
CALIBRATION_SHAPE = (1536, 576)
_CALIBRATION_FILE = "blas_min_tokens.json"
#: The same for bfloat16 activations on AMX, whose own loop keeps up with oneDNN's bf16 matmul longer
#: (benchmarks/engine_throughput.py "projections" rows: loop ahead at 64 tokens, BLAS at 128; Xeon SPR).
BF16_BLAS_MIN_TOKENS = 96
#: Token counts up to which `dense_linear` is used for the float32 lm_head (its tiles beat BLAS on
#: [49152, 576] at 1..64 rows on an AVX2 EPYC: benchmarks/engine_throughput.py, "lm_head" rows).
DENSE_MAX_TOKENS = 64

_SOURCE = cpu_extension.with_vectors(Path(__file__).with_suffix(".cpp").read_text(), cpu_extension.LORA_TILES)
"""The kernel's C++ source (nf4_cpu.cpp beside this file, after cpu_vectors.h and lora_tiles.h), compiled on first
use."""
CFLAGS = ("-ffp-contract=off",)
"""No contraction: the tile loops' FMAs are explicit (`fmadd`), every other product and sum is rounded as
written (the absmax's two roundings, the dequantized values)."""


@functools.cache
def _extension():
    """The compiled kernel module, or None when it cannot be built here."""
    return cpu_extension.build("nf4_linear", _SOURCE, CFLAGS)


@functools.cache
def calibrated_blas_min_tokens() -> int:
    """Token counts from which `nf4_linear` (float32, and bfloat16 without AMX) dequantizes the whole weight and
    calls BLAS instead of its own loop: measured on this CPU once per build of the kernel (`measure_blas_min_tokens`)
    and kept beside the build, so every later process, and every run, uses the same value (a token's bits depend
    on which path computed it). Which is faster differs by CPU: on an AVX-512 Xeon (SPR) BLAS from about 80
    tokens, on an AVX-512 EPYC the loop up to about 500 (MKL takes a slow path there), on an AVX2 EPYC BLAS from
    about 48 (benchmarks/engine_throughput.py "projections" rows)."""
    path = cpu_extension.folder_of("nf4_linear", _SOURCE, CFLAGS) / _CALIBRATION_FILE
    try:
        return int(json.loads(path.read_text())["blas_min_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokens = measure_blas_min_tokens()
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"blas_min_tokens": tokens, "threads": torch.get_num_threads()}) + "\n")
        partial.replace(path)  # whole or not at all, whoever measured last
    except OSError as error:  # a read-only build folder (a baked image): this process keeps its own value
        log.warning("could not keep the measured BLAS threshold in %s (%s): measured again next start", path, error)
    return tokens


def measure_blas_min_tokens(reps: int = 5) -> int:
    """The smallest of CALIBRATION_TOKENS from which BLAS is faster than the loop at every count tried (median of
    `reps` calls each on a random CALIBRATION_SHAPE weight), else one past the largest (the loop throughout)."""
    out_features, in_features = CALIBRATION_SHAPE
    generator = torch.Generator().manual_seed(0)
    packed, state = bnbf.quantize_4bit(torch.randn(out_features, in_features, generator=generator), blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
    weight = Nf4Weight.from_quant_state(packed, state)

    def median_s(x: torch.Tensor, threshold: int) -> float:
        times = []
        for _ in range(reps + 1):  # the first call warms the path: discarded
            began = time.perf_counter()
            nf4_linear(x, weight, blas_min_tokens=threshold)
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:])

    blas_faster = []
    for tokens in CALIBRATION_TOKENS:
        x = torch.randn(tokens, in_features, generator=generator)  # [tokens, in]
        blas_faster.append(median_s(x, 0) < median_s(x, tokens + 1))
    threshold = CALIBRATION_TOKENS[-1] + 1
    for tokens, faster in zip(reversed(CALIBRATION_TOKENS), reversed(blas_faster), strict=True):
        if not faster:
            break
        threshold = tokens
    return threshold


def available() -> bool:
    return _extension() is not None


@dataclass(frozen=True)
class Nf4Weight:
    """A bitsandbytes NF4 weight [out_features, in_features] in the pieces the kernel reads."""

    packed: torch.Tensor
    """[out * in / 2] uint8: two 4-bit codes per byte, high nibble first."""
    qabsmax: torch.Tensor
    """[out * in / 64] uint8: each block's absmax, quantized by the nested 8-bit state."""
    absmax2: torch.Tensor
    """[blocks / blocksize2] float32: the nested state's absmax."""
    code2: torch.Tensor
    """[256] float32: the nested state's 8-bit code."""
    code: torch.Tensor
    """[16] float32: the NF4 values."""
    offset: float
    blocksize2: int
    out_features: int
    in_features: int

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state: bnbf.QuantState) -> Nf4Weight:
        if not state.nested or state.blocksize != 64 or state.quant_type != "nf4" or state.state2.blocksize & (
                state.state2.blocksize - 1):
            raise ValueError("the fused NF4 kernel reads double-quantized NF4 with blocksize 64 (nested: a power of 2)")
        out_features, in_features = state.shape
        nested = state.state2
        return cls(packed.reshape(-1).contiguous(), state.absmax.contiguous(), nested.absmax.float().contiguous(),
                   nested.code.float().contiguous(), state.code.float().contiguous(), float(state.offset),
                   nested.blocksize, out_features, in_features)

    def _state_args(self) -> tuple:
        return (self.packed, self.qabsmax, self.absmax2, self.code2, self.code, self.offset, self.blocksize2,
                self.out_features)


def supports(weight_shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves a weight of this [out, in] shape, device and compute dtype."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and weight_shape[1] % 32 == 0


def blas_min_tokens_for(dtype: torch.dtype) -> int:
    """The token count from which `nf4_linear` takes its BLAS path for x of this dtype by default:
    BF16_BLAS_MIN_TOKENS for bfloat16 on AMX, else `calibrated_blas_min_tokens()`."""
    if dtype == torch.bfloat16 and bf16_path() == "amx":
        return BF16_BLAS_MIN_TOKENS
    return calibrated_blas_min_tokens()


def nf4_linear(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
               direct_max_tokens: int = DIRECT_MAX_TOKENS, blas_min_tokens: int | None = None) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out] = x @ dequant(W).T (+ bias), in x's dtype.

    `blas_min_tokens` defaults to `blas_min_tokens_for(x.dtype)`. Below it every (row, token) product is
    summed in the same order whatever the token count, so a token's result does not depend on the batch it is in."""
    if blas_min_tokens is None:
        blas_min_tokens = blas_min_tokens_for(x.dtype)
    return _extension().nf4_linear(x, *weight._state_args(), bias, direct_max_tokens, blas_min_tokens)


class Nf4Group:
    """Weights that read the same x (a layer's q, k and v projections; gate and up), multiplied in one call and one
    pass of the threads over all their rows, x put in lane order once; the weights are described to the kernel once,
    here, so a call passes x alone. At decode sizes a call's fixed cost (arguments converted, threads woken and
    joined, x permuted) is a fifth of a small projection's time."""

    def __init__(self, weights: list[Nf4Weight], biases: list[torch.Tensor | None], lora: SlotSet | None = None
                 ) -> None:
        """`lora`: the weights' LoRA slot buffers, in their order, for `with_lora` (float32 ones only)."""
        if len({weight.in_features for weight in weights}) != 1:
            raise ValueError("the weights of a group read the same x: one in_features")
        self.weights, self.biases = weights, biases
        self.adds_lora = lora is not None and all(
            a.dtype == torch.float32 and a.device.type == "cpu" for a in lora.As) and all(
            bias is None or bias.dtype == torch.float32 for bias in biases)
        """Whether `with_lora` serves this group (float32 slot buffers and biases on the CPU)."""
        state = [list(field) for field in zip(*(weight._state_args() for weight in weights), strict=True)]
        slot_buffers = (lora.As, lora.Bs, lora.scales, biases) if self.adds_lora else ([], [], [], [])
        self._native = _extension().Nf4Group(*state, weights[0].in_features, *slot_buffers)

    def __call__(self, x: torch.Tensor, direct_max_tokens: int = DIRECT_MAX_TOKENS) -> list[torch.Tensor]:
        """x: [num_tokens, in] -> [x @ dequant(W_i).T (+ bias_i) for each weight], each bit-identical to
        `nf4_linear(x, W_i, bias_i)`: float32 x below the BLAS threshold in one call, else one `nf4_linear` each."""
        if x.dtype != torch.float32 or x.shape[0] >= calibrated_blas_min_tokens():
            return [nf4_linear(x, weight, bias, direct_max_tokens)
                    for weight, bias in zip(self.weights, self.biases, strict=True)]
        ys = self._native.linear(x, direct_max_tokens)
        return [y if bias is None else y.add_(bias) for y, bias in zip(ys, self.biases, strict=True)]

    def with_lora(self, x: torch.Tensor, batch: LoraBatch, direct_max_tokens: int = DIRECT_MAX_TOKENS
                  ) -> list[torch.Tensor] | None:
        """x: [num_tokens, in] -> [x @ dequant(W_i).T (+ bias_i) + lora_i(x) for each weight], the bits of this group's
        call followed by `lora_cpu.lora_cpu_group` on its outputs, in one kernel call: the shrinks in one pass of the
        threads, then the fused loop, each thread adding the expand to the outputs it has just computed (a decode
        step's outputs otherwise move from the core that computed them to the one that adds their LoRA term). None
        where the call does not serve (not `adds_lora`, x not float32, or at the BLAS threshold or above)."""
        if not self.adds_lora or x.dtype != torch.float32 or x.shape[0] >= calibrated_blas_min_tokens():
            return None
        return self._native.linear_lora(x, direct_max_tokens, batch.slot_ranks, batch.groups.token_index,
                                        batch.grouped_slots)


@functools.cache
def bf16_path() -> str:
    """How bfloat16 activations are multiplied on this CPU (see the module docstring):
    "amx" (AMX tiles below the BLAS threshold, bf16 BLAS above), "avx512_bf16" (the float32 loop on
    bf16-rounded weights below, bf16 BLAS above) or "float32" (float32 loop and BLAS)."""
    return _extension().bf16_path()


def nf4_dequantize(weight: Nf4Weight, bf16: bool = False) -> torch.Tensor:
    """The weight's values [out, in] float32, as the kernel computes them (bfloat16-rounded with `bf16`)."""
    return _extension().nf4_dequantize(*weight._state_args(), weight.in_features, bf16)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, in] float32 -> [num_tokens, out] = x @ weight.T for a dense float32 or bfloat16 weight
    [out, in], on the kernel's tiles (rows read in place; a token's bits do not depend on its batch). A bfloat16
    weight is widened exactly: the same values give the same bits as their float32 copy, from half the bytes."""
    return _extension().dense_linear(x, weight)
