"""An adapter version is its content digest: what a request actually ran with, whatever its name."""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE


def adapter_digest(folder: Path) -> str:
    """sha256 (hex) over adapter_config.json then adapter_model.safetensors, the bytes as stored."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(folder / name, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
