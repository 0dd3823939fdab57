"""The model serve-train trains: the server's base, loaded with transformers + bitsandbytes exactly as the
server quantizes it (NF4, double quantization, blocksize 64), with a PEFT LoRA on top."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraplex.adapters.bnb_compat import nf4_config, use_portable_nf4_path

ALL_LINEAR = "all-linear"
PEFT_DEPRECATED_READ = "`is_gradient_checkpointing` is deprecated"
"""The FutureWarning transformers gives when get_peft_model reads `is_gradient_checkpointing` (peft 0.21)."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | str
    """Projection names, or "all-linear" (every q/k/v/o/gate/up/down projection)."""


def load_base(folder: Path, quantize: bool, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The model in `folder` on `device`: NF4 as the server holds it (`quantize`), else dense in `dtype`."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=nf4_config(dtype) if quantize else None,
        device_map={"": device} if quantize else None,
    )
    if not quantize:
        model.to(device)
    use_portable_nf4_path(model)
    model.config.use_cache = False  # training and teacher-forced evaluation
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def add_lora(base: PreTrainedModel, lora: LoraSettings, gradient_checkpointing: bool) -> PeftModel:
    """`base` with a fresh LoRA (B = 0, so it starts as the base) whose weights alone are trainable."""
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                        else list(lora.target_modules), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads a property transformers deprecated: nothing for a user to do
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_READ, category=FutureWarning)
        return get_peft_model(base, config)
