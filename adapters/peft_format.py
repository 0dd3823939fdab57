"""Read a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`) into engine weights."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from loraplex.adapters.errors import (
    AdapterFormatError,
    CorruptAdapter,
    TensorShapeError,
    UnknownTargetModule,
    UnsupportedFeature,
)
from loraplex.server.engine.model import LoraWeights
from loraplex.server.engine.spec import PROJECTIONS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_LORA_ALPHA = 1e4
"""Largest |lora_alpha| (and alpha_pattern value) accepted; PEFT's usual values are r or 2r."""
MAX_SCALE = 1e3
"""Largest |scale| (alpha / r, or alpha / sqrt(r) with rsLoRA) of any module accepted."""
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


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
        return self._scaled(alpha, rank)

    def largest_scale(self) -> float:
        """The largest |scale| any module of rank r gets (over lora_alpha and the alpha_pattern values)."""
        return max(abs(self._scaled(alpha, self.rank)) for alpha in (self.alpha, *self.alpha_pattern.values()))

    def _scaled(self, alpha: float, rank: int) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; CorruptAdapter when it is not valid UTF-8 JSON holding an object."""
    return parse_json_object(path.read_bytes(), path)


def parse_json_object(data: bytes, path: Path) -> dict:
    """The JSON object in `data` (the bytes of `path`, named in messages); CorruptAdapter otherwise."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptAdapter(f"{path} is not valid JSON ({error}); rewrite it (PEFT's save_pretrained does)") from None
    if not isinstance(raw, dict):
        raise CorruptAdapter(f"{path} holds a JSON {type(raw).__name__}, not an object; rewrite it")
    return raw


def read_adapter_config(folder: Path) -> AdapterConfig:
    """The config of the adapter in `folder`; refuses the PEFT features the engine does not apply."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder} has no {CONFIG_FILE}: expected a PEFT LoRA adapter folder")
    return parse_adapter_config(path.read_bytes(), path)


def parse_adapter_config(data: bytes, path: Path) -> AdapterConfig:
    """The adapter config in `data` (the bytes of `path`); refuses the PEFT features the engine does not apply."""
    raw = parse_json_object(data, path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise UnsupportedFeature(f"peft_type {raw.get('peft_type')!r} is not supported; train a LoRA adapter")
    if raw.get("use_dora"):
        raise UnsupportedFeature("DoRA adapters are not supported; train with use_dora=False")
    if raw.get("bias", "none") != "none":
        raise UnsupportedFeature(f"bias={raw['bias']!r} is not supported; train with bias='none'")
    if raw.get("modules_to_save"):
        raise UnsupportedFeature("modules_to_save is not supported; train without fully fine-tuned modules")
    targets = raw.get("target_modules") or []
    try:
        config = AdapterConfig(
            rank=int(raw["r"]),
            alpha=float(raw.get("lora_alpha", raw["r"])),
            use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=tuple([targets] if isinstance(targets, str) else targets),
            alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            base_model=raw.get("base_model_name_or_path"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CorruptAdapter(f"{path}: r, lora_alpha or alpha_pattern is missing or not a number ({error!r}); "
                             "rewrite it with PEFT") from None
    for field, alpha in [("lora_alpha", config.alpha), *(("alpha_pattern", v) for v in config.alpha_pattern.values())]:
        if not (math.isfinite(alpha) and abs(alpha) <= MAX_LORA_ALPHA):
            raise CorruptAdapter(f"{path}: {field} {alpha} is not a finite number of magnitude at most "
                                 f"{MAX_LORA_ALPHA:g}; retrain with a usual lora_alpha (e.g. r or 2r)")
    if config.rank < 1:
        raise CorruptAdapter(f"{path}: r {config.rank} is not a positive rank; rewrite it with PEFT")
    return config


@contextmanager
def open_weights(folder: Path) -> Iterator:
    """safe_open of the folder's safetensors file; refuses a missing file (pickled `.bin` is never read)
    and turns a corrupt or truncated file into CorruptAdapter."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise UnsupportedFeature(f"{folder} has no {WEIGHTS_FILE} (adapter_model.bin is pickled and never "
                                     "loaded); save with safe_serialization=True")
        raise AdapterFormatError(f"{folder} has no {WEIGHTS_FILE}; save with safe_serialization=True")
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as error:
        raise CorruptAdapter(f"{path} is corrupt or truncated ({error}); copy or save the adapter again") from None
    with handle:
        yield handle


def lora_pairs(keys: Iterable[str]) -> dict[tuple[int, str], dict[str, str]]:
    """(layer, projection) -> {"A": tensor name, "B": tensor name} for the tensors of a PEFT LoRA file.

    Refuses any tensor that is not a LoRA A/B of a PROJECTIONS module, and any module missing a half.
    """
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in keys:
        match = _KEY.match(key)
        if match is None or match.group(2) not in PROJECTIONS:
            raise UnknownTargetModule(f"unexpected tensor {key!r}: only LoRA A/B of {PROJECTIONS} are served; "
                                      "train with target_modules among them")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = key
    for (layer, proj), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise TensorShapeError(f"layer {layer} {proj} has lora_{''.join(pair)} but not both A and B")
    return pairs


def parse_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `data` (the bytes of `path`); CorruptAdapter if malformed."""
    try:
        return safetensors.torch.load(data)
    except (SafetensorError, ValueError) as error:
        raise CorruptAdapter(f"{path} is corrupt or truncated ({error}); copy or save the adapter again") from None


def read_lora_weights(folder: Path, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """(layer, projection) -> (A [r, in], B [out, r], scale) for every module the adapter targets.

    Only safetensors are read; pickled `adapter_model.bin` is refused.
    """
    config = read_adapter_config(folder)
    with open_weights(folder) as handle:
        names = handle.keys()  # a safe_open handle is not iterable
        tensors = {name: handle.get_tensor(name) for name in names}
    return lora_weights(config, tensors, dtype)


def lora_weights(config: AdapterConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> LoraWeights:
    """The engine's (layer, projection) -> (A [r, in], B [out, r], scale) from a PEFT file's tensors."""
    weights: LoraWeights = {}
    for (layer, proj), pair in lora_pairs(tensors).items():
        lora_a, lora_b = (tensors[pair[half]].to(dtype) for half in ("A", "B"))
        block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        module_path = f"model.layers.{layer}.{block}.{proj}"
        weights[(layer, proj)] = (lora_a, lora_b, config.scale(module_path, lora_a.shape[0]))
    return weights
