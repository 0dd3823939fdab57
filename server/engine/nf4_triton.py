"""NF4 matmul for decode-sized token counts on CUDA: `y = x @ dequant(W).T (+ b)` in one Triton kernel.

bitsandbytes on CUDA runs a projection as dequantize (a full dense copy of W written to and read
back from memory) then cuBLAS, or its one-token gemv; for a decode step of a few tokens the copy
costs more than the product. This kernel reads the packed weight once per token tile and decodes
it in registers, so a step reads half a byte per weight plus one byte of nested absmax per 64.

Decoding is bitsandbytes' (the same pieces as `nf4_cpu.Nf4Weight`): element f of the flattened
[out, in] weight is the high nibble of packed byte f / 2 when f is even, the low one when odd; its
value is `code[nibble] * absmax[f / 64]` with the block's absmax itself double-quantized,
`absmax = code2[qabsmax[b]] * absmax2[b / blocksize2] + offset`. Each product and the sum are
rounded to float32 separately (the kernel is launched with `enable_fp_fusion=False`, so no FMA
merges them), then the value is rounded to the compute dtype, as `bitsandbytes.functional.
dequantize_4bit` does: the dequantized values are bit-identical to bitsandbytes'.

The product accumulates in float32 (`tl.dot`, full precision for float32 inputs) over tiles of
BLOCK_K input features and is rounded to x's dtype once, with the bias added in float32. A program
computes BLOCK_M tokens x BLOCK_N outputs; the grid spans the outputs (and token tiles beyond 16),
so decode steps spread over the GPU's multiprocessors by output rows. The engine uses it up to
`kernel_choice.NF4_TRITON_MAX_TOKENS` tokens and bitsandbytes + cuBLAS above (`BaseLinear`).

Triton is imported at import time: only `kernel_choice` imports this module, on CUDA with Triton
installed. Under `TRITON_INTERPRET=1` the kernel runs on CPU tensors (the tests' oracle run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.server.engine.nf4_cpu import Nf4Weight

#: Tokens per program: one `tl.dot` tile (its minimum); decode steps have at most this many per tile.
BLOCK_M = 16
#: Output features per program: small, so that a decode step of a 4096-wide projection has 128 programs.
BLOCK_N = 32
#: Input features per loop iteration: two 64-weight quantization blocks per row.
BLOCK_K = 128


@triton.jit
def _dequantize_tile(packed_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, blocksize2,
                     rows, cols, in_features, mask, DTYPE: tl.constexpr):
    """dequant(W)[rows, cols] in DTYPE: rows [N], cols [K] -> [N, K] (see the module docstring)."""
    flat = rows.to(tl.int64)[:, None] * in_features + cols[None, :]  # [N, K] element index in the [out, in] weight
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    block = flat // 64  # 64 weights share an absmax (Nf4Weight holds blocksize-64 weights only)
    qabsmax = tl.load(qabsmax_ptr + block, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(code2_ptr + qabsmax) * tl.load(absmax2_ptr + block // blocksize2, mask=mask, other=0.0)
    absmax = absmax + offset
    return (tl.load(code_ptr + nibble) * absmax).to(DTYPE)


@triton.jit
def _nf4_matmul(x_ptr, packed_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, code_ptr, bias_ptr, y_ptr,
                offset, blocksize2, num_tokens, out_features, stride_x, stride_y, IN_FEATURES: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * dequant(W)[n, k] (+ bias[n]) for a BLOCK_M x BLOCK_N tile of (token, output)."""
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    tokens = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    in_out, in_tokens = outs < out_features, tokens < num_tokens
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, IN_FEATURES, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < IN_FEATURES
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_x + ks[None, :],
                    mask=in_tokens[:, None] & in_k[None, :], other=0.0)  # [M, K]
        w = _dequantize_tile(packed_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, blocksize2,
                             outs, ks, IN_FEATURES, in_out[:, None] & in_k[None, :], x_ptr.dtype.element_ty)  # [N, K]
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)  # [M, N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=in_out, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * stride_y + outs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=in_tokens[:, None] & in_out[None, :])


def nf4_linear(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out] = x @ dequant(W).T (+ bias), in x's dtype (any token count;
    meant for decode-sized ones)."""
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has {x.shape[1]} features, the NF4 weight {weight.in_features}")
    x = x.contiguous()
    num_tokens = x.shape[0]
    y = torch.empty(num_tokens, weight.out_features, dtype=x.dtype, device=x.device)  # [num_tokens, out]
    grid = (triton.cdiv(weight.out_features, BLOCK_N), triton.cdiv(num_tokens, BLOCK_M))
    _nf4_matmul[grid](
        x, weight.packed, weight.qabsmax, weight.absmax2, weight.code2, weight.code,
        bias if bias is not None else x, y,
        weight.offset, weight.blocksize2, num_tokens, weight.out_features, x.stride(0), y.stride(0),
        IN_FEATURES=weight.in_features, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        enable_fp_fusion=False,  # the absmax's product and sum rounded apart, as bitsandbytes computes them
    )
    return y
