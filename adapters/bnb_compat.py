"""transformers + bitsandbytes settings that reproduce the server's NF4 base exactly.

The training sidecar, the parity tests and the benchmarks load the base with transformers; these
two helpers make that model compute the same NF4 weights as `loraplex.server.engine.nf4`.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from loraplex.server.engine.nf4 import NF4_BLOCKSIZE, NF4_DOUBLE_QUANT


def nf4_config(compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """NF4, double quantization, blocksize 64, `compute_dtype`: the server's quantization."""
    assert NF4_BLOCKSIZE == 64, "transformers' 4-bit loader quantizes with bitsandbytes' default blocksize 64"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=NF4_DOUBLE_QUANT, bnb_4bit_compute_dtype=compute_dtype)


def use_portable_nf4_path(model: torch.nn.Module) -> None:
    """Keep bitsandbytes on its portable NF4 path (dequantize + matmul) on every CPU.

    On CPUs with AVX512-BF16, bnb's Linear4bit repacks weights for a CPU kernel and rounds the
    absmax statistics to bfloat16 on the way, which changes the numerics machine by machine (and
    fails for layers smaller than its tile). The server dequantizes with full-precision statistics
    everywhere, so a model meant to match it takes the path every machine has.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
