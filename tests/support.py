"""Builders for tests: tiny random Llama-family checkpoints and PEFT adapters, written to real folders."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from loraplex.adapters.bnb_compat import nf4_config, use_portable_nf4_path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# Every in_features a multiple of 64 (NF4's blocksize): bitsandbytes 0.50's AVX-512 CPU dequantize takes
# blocks per row and gets weights whose rows straddle blocks wrong (tests/engine/test_nf4_cpu.py), so the
# transformers references would be wrong on such CPUs; the kernel's own tests cover those shapes.
_COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25, eos_token_id=None,
    bos_token_id=None, pad_token_id=None,
)


def tiny_config(arch: str) -> PretrainedConfig:
    """A 2-layer, 64-dim config per family, each exercising that family's specifics."""
    if arch == "llama":  # untied embeddings, llama3 rope scaling
        return LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "mistral":  # a sliding window shorter than the prompts
        return MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=8, head_dim=16)
    if arch == "qwen2":  # qkv bias, tied embeddings
        return Qwen2Config(**_COMMON, tie_word_embeddings=True)
    if arch == "qwen3":  # q/k norm, explicit head_dim, linear rope scaling
        return Qwen3Config(**_COMMON, tie_word_embeddings=False, head_dim=32,
                           rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    raise ValueError(arch)


def write_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a random tiny model of `arch` (float32 safetensors, no tokenizer) into `folder`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    if arch == "qwen2":  # random non-zero biases, so that they matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    targets: tuple[str, ...]
    rslora: bool = False
    alpha: int = 16


#: Four adapters of different ranks and target sets, one with rsLoRA (the parity test's mix).
MIXED_ADAPTERS = (
    AdapterSpec("a_r4_qv", 4, ("q_proj", "v_proj")),
    AdapterSpec("b_r16_all", 16, ALL_LINEAR),
    AdapterSpec("c_r64_mlp_o_rslora", 64, ("o_proj", "up_proj", "down_proj"), rslora=True, alpha=32),
    AdapterSpec("d_r8_k_gate", 8, ("k_proj", "gate_proj")),
)


def write_adapter(base_folder: Path, spec: AdapterSpec, folder: Path, seed: int, b_scale: float = 0.5) -> Path:
    """A PEFT LoRA with random non-zero A and B (init_lora_weights=False, B scaled by `b_scale`)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        use_rslora=spec.rslora, init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    model.save_pretrained(folder)
    return folder


def copy_with_config(source: Path, target: Path, **changes: object) -> Path:
    """A copy of the adapter folder `source` at `target`, with `changes` applied to its adapter_config.json."""
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def reference_generate(base_folder: Path, adapters: dict[str, Path], rows: list[tuple[list[int], str | None]],
                       max_new_tokens: int, quantized: bool, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> list[tuple[list[int], torch.Tensor]]:
    """transformers + PEFT loaded in `dtype`, each row run alone with its adapter (None: adapters disabled).

    Returns per row (greedy tokens, raw logits [max_new_tokens, vocab] as float32)."""
    from peft import PeftModel

    kwargs = {"quantization_config": nf4_config(dtype)} if quantized else {}
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype, device_map=device, **kwargs)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    if quantized:
        use_portable_nf4_path(model)
    results = []
    for prompt, adapter in rows:
        inputs = torch.tensor([prompt], device=device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, attention_mask=torch.ones_like(inputs), pad_token_id=0)
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(input_ids=inputs, **kwargs)
            else:
                model.set_adapter(adapter)
                out = model.generate(input_ids=inputs, **kwargs)
        results.append((out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float().cpu()))
    return results
