"""GGUF checkpoints (llama.cpp's single-file format) turned into Hugging Face safetensors folders.

`convert_gguf` dequantizes every tensor through transformers' GGUF loader and writes a bfloat16
safetensors folder with the config, generation config and tokenizer the file describes. Only the
architectures the engine serves (model_files.SUPPORTED_MODEL_TYPES) are converted: `gguf_architecture`
reads the file's `general.architecture` from its header and refuses any other before anything is loaded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loraplex.server.model_files import SUPPORTED_MODEL_TYPES, UnsupportedModel

GGUF_SUFFIX = ".gguf"


def gguf_architecture(gguf_path: Path) -> str:
    """The file's `general.architecture`, if the engine serves it; UnsupportedModel (naming the supported
    ones) otherwise, and for a file that is not a readable GGUF."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf_path).fields.get("general.architecture")
    except (ValueError, OSError) as error:
        raise UnsupportedModel(f"{gguf_path} is not a readable GGUF file ({error})") from None
    architecture = field.contents() if field is not None else None
    if architecture not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"{gguf_path}: GGUF architecture {architecture!r} is not supported; loraplex "
                               f"serves {', '.join(SUPPORTED_MODEL_TYPES)}")
    return architecture


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint of a supported architecture into a bfloat16 safetensors folder with its
    tokenizer.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written model that later starts would trust.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_architecture(gguf_path)
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
