"""Read a local Hugging Face model folder (config.json + safetensors) into what the engine takes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraplex.server.engine.spec import ModelSpec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Rope types whose frequencies do not depend on the running sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(ValueError):
    """The folder holds a model loraplex cannot serve; the message says why and what is supported."""


def load_hf_config(folder: Path) -> PretrainedConfig:
    if not (folder / "config.json").is_file():
        raise UnsupportedModel(f"{folder} has no config.json: expected a Hugging Face model folder")
    return AutoConfig.from_pretrained(folder)


def base_digest(folder: Path) -> str:
    """sha256 (hex) over config.json, then each *.safetensors file in name order: the base model's
    identity, which an adapter's card names (base_model_digest) to say what it was trained on."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def model_spec(folder: Path) -> ModelSpec:
    """The engine's view of the model in `folder`; refuses unsupported architectures at start-up."""
    config = load_hf_config(folder)
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; loraplex serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rope = dict(config.rope_parameters or {"rope_type": "default"})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"rope_type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        theta = rope["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        attention_scaling = 1.0
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return ModelSpec(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_inv_freq=tuple(inv_freq.tolist()),
        rope_attention_scaling=float(attention_scaling),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_windows=_sliding_windows(config),
        max_position_embeddings=config.max_position_embeddings,
        eos_token_ids=_eos_token_ids(folder, config),
    )


def _sliding_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (window if config.model_type == "mistral" else None,) * config.num_hidden_layers


def _eos_token_ids(folder: Path, config: PretrainedConfig) -> tuple[int, ...]:
    eos = config.eos_token_id
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def iter_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the folder's safetensors files, one at a time.

    Pickled checkpoints (`*.bin`, `*.pt`) are never read.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{folder} has no *.safetensors weights (pickled checkpoints are not loaded)")
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)
