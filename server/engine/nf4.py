"""Base-model linear projections: bitsandbytes NF4 weights (or dense ones, for debugging)."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from loraplex.server.engine import nf4_cpu
from loraplex.server.engine.kernel_choice import BITSANDBYTES, Nf4Plan
from loraplex.server.engine.lora import LoraBatch, SlotSet

#: NF4 quantization settings; the training sidecar and the parity tests' references use the same.
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = True


class BaseLinear(torch.nn.Module):
    """`y = x @ W.T + b` with W stored as bitsandbytes NF4 (double-quantized, blocksize 64).

    With `quantize=False` W stays dense in the compute dtype (a debugging aid). The bias, when the
    architecture has one, stays in the compute dtype either way. `plan` (kernel_choice) says which
    kernel multiplies at each token count: `nf4_cpu`'s or `nf4_triton`'s (same dequantized values,
    no dense copy of W) or bitsandbytes' `matmul_4bit`.
    """

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, quantize: bool,
                 bias: torch.Tensor | None = None, plan: Nf4Plan = BITSANDBYTES) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.plan = plan
        self.kernel = plan.kernel_module()
        """The plan's kernel module (looked up per call: benchmarks wrap its `nf4_linear`); None: bitsandbytes."""
        self.kernel_weight: nf4_cpu.Nf4Weight | None = None
        if quantize:
            packed, state = bnbf.quantize_4bit(
                weight, blocksize=NF4_BLOCKSIZE, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4",
            )
            self.packed_weight: torch.Tensor | None = packed  # [in * out / 2, 1] uint8
            self.quant_state: bnbf.QuantState | None = state
            self.quant_state.dtype = compute_dtype  # dequantize straight into the compute dtype
            self.dense_weight: torch.Tensor | None = None
            if self.kernel is not None:  # views of the same packed data and state: no copy
                self.kernel_weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
        else:
            self.packed_weight = None
            self.quant_state = None
            self.dense_weight = weight.to(compute_dtype)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, in] -> [num_tokens, out]."""
        if self.dense_weight is not None:
            return torch.nn.functional.linear(x, self.dense_weight, self.bias)
        if self.kernel_weight is not None and x.shape[0] <= self.plan.max_tokens:  # plan.kernel_for, inlined
            return self.kernel.nf4_linear(x, self.kernel_weight, self.bias)
        return bnb.matmul_4bit(x, self.packed_weight.t(), quant_state=self.quant_state, bias=self.bias)

    def resident_bytes(self) -> int:
        """Bytes this projection's weight keeps in memory (packed data plus quantization state)."""
        if self.dense_weight is not None:
            return self.dense_weight.numel() * self.dense_weight.element_size()
        state = self.quant_state
        total = self.packed_weight.numel() * self.packed_weight.element_size()
        total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
        if state.nested:
            nested = state.state2
            total += nested.absmax.numel() * nested.absmax.element_size()
            total += nested.code.numel() * nested.code.element_size()
        return total


class BaseGroup:
    """Base projections that read the same x (a layer's q, k and v; gate and up): `forward` gives each one's
    `BaseLinear.forward(x)`, the same bits, from one call of the fused CPU kernel (`nf4_cpu.Nf4Group`, the weights
    described to it once, here) where every one of them runs it at that token count, else one call each."""

    def __init__(self, bases: list[BaseLinear], lora: SlotSet | None = None) -> None:
        """`lora`: the bases' LoRA slot buffers, in their order, for `forward_with_lora`."""
        self.bases = bases
        fused = all(base.kernel is nf4_cpu and base.kernel_weight is not None for base in bases)
        self.kernel_group = nf4_cpu.Nf4Group([base.kernel_weight for base in bases],
                                             [base.bias for base in bases], lora) if fused else None
        self.max_tokens = min(base.plan.max_tokens for base in bases)
        """Token counts up to which every base's plan runs the fused kernel."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [num_tokens, in] -> [num_tokens, out_i] for each base."""
        if self.kernel_group is not None and x.shape[0] <= self.max_tokens:
            return self.kernel_group(x)
        return [base.forward(x) for base in self.bases]

    def forward_with_lora(self, x: torch.Tensor, batch: LoraBatch) -> list[torch.Tensor] | None:
        """x: [num_tokens, in] -> [num_tokens, out_i] for each base, its adapters' terms added (the bits of `forward`
        then `lora_cpu.lora_cpu_group`), in one call of the fused kernel; None where that kernel does not serve x."""
        if self.kernel_group is not None and x.shape[0] <= self.max_tokens:
            return self.kernel_group.with_lora(x, batch)
        return None
