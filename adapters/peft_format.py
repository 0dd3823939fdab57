"""Read a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`) into engine weights."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.server.engine.model import LoraWeights
from loraplex.server.engine.spec import PROJECTIONS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """The folder is not a LoRA adapter loraplex can serve; the message says what to change."""


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT `adapter_config.json` that decide how the weights are applied."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    alpha_pattern: dict[str, float]
    base_model: str | None

    def scale(self, module_path: str, rank: int) -> float:
        """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module_path):
                alpha = value
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder} has no {CONFIG_FILE}: expected a PEFT LoRA adapter folder")
    raw = json.loads(path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"peft_type {raw.get('peft_type')!r} is not supported; train a LoRA adapter")
    if raw.get("use_dora"):
        raise AdapterFormatError("DoRA adapters are not supported; train with use_dora=False")
    if raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={raw['bias']!r} is not supported; train with bias='none'")
    if raw.get("modules_to_save"):
        raise AdapterFormatError("modules_to_save is not supported; train without fully fine-tuned modules")
    targets = raw.get("target_modules") or []
    return AdapterConfig(
        rank=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", raw["r"])),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=tuple([targets] if isinstance(targets, str) else targets),
        alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        base_model=raw.get("base_model_name_or_path"),
    )


def read_lora_weights(folder: Path, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """(layer, projection) -> (A [r, in], B [out, r], scale) for every module the adapter targets.

    Only safetensors are read; pickled `adapter_model.bin` is refused.
    """
    config = read_adapter_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = " (adapter_model.bin is pickled and never loaded)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{folder} has no {WEIGHTS_FILE}{pickled}; save with safe_serialization=True")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _KEY.match(key)
            if match is None or match.group(2) not in PROJECTIONS:
                raise AdapterFormatError(f"unexpected tensor {key!r}: only LoRA A/B of {PROJECTIONS} are served")
            module = (int(match.group(1)), match.group(2))
            halves.setdefault(module, {})[match.group(3)] = handle.get_tensor(key).to(dtype)
    weights: LoraWeights = {}
    for (layer, proj), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"layer {layer} {proj} has lora_{''.join(pair)} but not both A and B")
        rank = pair["A"].shape[0]
        block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        module_path = f"model.layers.{layer}.{block}.{proj}"
        weights[(layer, proj)] = (pair["A"], pair["B"], config.scale(module_path, rank))
    return weights
