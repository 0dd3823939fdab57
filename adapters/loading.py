"""Reading one stored adapter version into host memory, checked again: the path from the store to a slot.

The store validated the version when it was put; its files are still re-checked on every load
(digest, layout, NaN/inf), so a file damaged or replaced on disk since is refused instead of served.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.errors import CorruptAdapter
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, lora_weights, parse_adapter_config, parse_weights
from loraplex.adapters.validation import DTYPE_CODES, Limits, check_finite, check_layout, check_targets
from loraplex.server.engine.model import LoraWeights
from loraplex.server.engine.spec import ModelSpec


@dataclass(frozen=True)
class LoadedAdapter:
    """One version's weights in host memory, in the engine's dtype, ready to copy into a slot."""

    digest: str
    weights: LoraWeights
    nbytes: int
    """Host bytes of `weights` (what the host cache budgets)."""
    read_s: float
    """Seconds reading the files and checking their digest."""
    validate_s: float
    """Seconds parsing the tensors and checking them against the base model and limits."""


def load_version(folder: Path, digest: str, spec: ModelSpec, limits: Limits, dtype: torch.dtype) -> LoadedAdapter:
    """The adapter stored in `folder` as version `digest`; CorruptAdapter if its bytes no longer match the
    digest, or another AdapterFormatError if it no longer passes validation."""
    start = time.perf_counter()
    config_bytes = (folder / CONFIG_FILE).read_bytes()
    weights_bytes = (folder / WEIGHTS_FILE).read_bytes()
    hasher = hashlib.sha256(config_bytes)
    hasher.update(weights_bytes)
    if hasher.hexdigest() != digest:
        raise CorruptAdapter(f"the stored files in {folder} no longer match version {digest[:12]} (changed on "
                             "disk since they were stored); load the adapter again from its source")
    read = time.perf_counter()
    config = parse_adapter_config(config_bytes, folder / CONFIG_FILE)
    check_targets(config, spec)
    tensors = parse_weights(weights_bytes, folder / WEIGHTS_FILE)  # [r, in] / [out, r] per module
    layout = {name: (DTYPE_CODES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape))
              for name, tensor in tensors.items()}
    check_layout(layout, spec, limits, folder / WEIGHTS_FILE, config)
    for name, tensor in tensors.items():
        check_finite(name, tensor)
    weights = lora_weights(config, tensors, dtype)
    nbytes = sum(a.nbytes + b.nbytes for a, b, _ in weights.values())
    return LoadedAdapter(digest, weights, nbytes, read - start, time.perf_counter() - read)
