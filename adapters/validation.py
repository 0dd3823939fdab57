"""Dry-run validation of a PEFT LoRA folder against the base model and the server's limits.

`validate` reads the folder's config, optional card and safetensors header, then each tensor once
(for NaN/inf, one at a time) and every byte once for the digest; it touches no server. `check_layout`
and `check_finite` are the same checks on tensors already in memory (the loader's path). Each refusal
is an `AdapterFormatError` subclass from `adapters.errors` whose message says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.errors import (
    AdapterTooLarge,
    BaseModelMismatch,
    CorruptAdapter,
    NonFiniteWeights,
    RankTooHigh,
    TensorDtypeError,
    TensorShapeError,
    UnknownTargetModule,
)
from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.peft_format import (
    CONFIG_FILE,
    MAX_SCALE,
    WEIGHTS_FILE,
    AdapterConfig,
    lora_pairs,
    open_weights,
    read_adapter_config,
    read_json_object,
)
from loraplex.server.engine.spec import PROJECTIONS, ModelSpec

CARD_FILE = "adapter_card.json"
"""Optional metadata written next to the PEFT files (by the training sidecar); may name the base digest."""
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"""safetensors dtype codes the engine accepts, and their torch names."""
DTYPE_CODES = {getattr(torch, name): code for code, name in DTYPES.items()}
"""torch dtype -> safetensors dtype code, for tensors already in memory."""


@dataclass(frozen=True)
class Limits:
    """What the server accepts: LoRA rank up to `max_rank`, config + weights up to `max_bytes`."""

    max_rank: int
    max_bytes: int


@dataclass(frozen=True)
class AdapterSummary:
    """What validation found: enough to list an adapter and to budget its memory."""

    digest: str
    """sha256 of config + weights (`adapters.identity.adapter_digest`): the version."""
    rank: int
    """Largest LoRA rank over the adapter's modules."""
    targets: tuple[str, ...]
    """Projections with LoRA weights, in PROJECTIONS order."""
    size_bytes: int
    """Bytes of adapter_config.json + adapter_model.safetensors as stored."""
    dtype: str
    """torch name of the stored dtype: float32, float16 or bfloat16."""


Layout = dict[str, tuple[str, list[int]]]
"""A safetensors file's tensors: name -> (dtype code such as "F32", shape)."""


def validate(folder: Path, spec: ModelSpec, limits: Limits, base_digest: str | None = None) -> AdapterSummary:
    """Check that the adapter in `folder` can be served on the base `spec` within `limits`.

    `base_digest` is the served base model's digest; it is compared with the card's
    `base_model_digest` when both are present. Raises an AdapterFormatError subclass on the first
    problem found; holds at most one tensor in memory at a time.
    """
    config = read_adapter_config(folder)  # refuses DoRA, bias, modules_to_save, non-LoRA types
    check_targets(config, spec)
    _check_card(folder, base_digest)
    with open_weights(folder) as handle:  # refuses a missing, pickled-only, corrupt or truncated file
        size = (folder / CONFIG_FILE).stat().st_size + (folder / WEIGHTS_FILE).stat().st_size
        check_size(size, limits)
        names = handle.keys()  # a safe_open handle is not iterable
        layout = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape()) for name in names}
        rank, targets, dtype = check_layout(layout, spec, limits, folder / WEIGHTS_FILE, config)
        for name in names:
            check_finite(name, handle.get_tensor(name))
    return AdapterSummary(adapter_digest(folder), rank, targets, size, dtype)


def check_targets(config: AdapterConfig, spec: ModelSpec) -> None:
    """UnknownTargetModule if the config names modules that are not projections of the decoder."""
    unknown = sorted({name.rsplit(".", 1)[-1] for name in config.target_modules} - set(PROJECTIONS))
    if unknown and not _is_pattern(config.target_modules):
        raise UnknownTargetModule(f"target_modules {unknown} are not projections of a {spec.model_type} decoder; "
                                  f"train with target_modules among {PROJECTIONS}")


def check_layout(layout: Layout, spec: ModelSpec, limits: Limits, path: Path,
                 config: AdapterConfig) -> tuple[int, tuple[str, ...], str]:
    """(largest rank, targeted projections in PROJECTIONS order, torch dtype name) of the tensors in
    `layout` (those of the weights file `path`), after checking they fit `spec`, `limits` and `config`
    (every module's rank is its r; every module's scale is at most MAX_SCALE)."""
    pairs = lora_pairs(layout)
    if not pairs:
        raise UnknownTargetModule(f"{path} holds no LoRA tensors; train with target_modules among {PROJECTIONS}")
    codes = {layout[name][0] for pair in pairs.values() for name in pair.values()}
    ranks = [_check_module(spec, limits, layer, proj, layout[pair["A"]][1], layout[pair["B"]][1])
             for (layer, proj), pair in pairs.items()]
    if not codes <= set(DTYPES) or len(codes) > 1:
        found = sorted(DTYPES.get(code, code) for code in codes)
        raise TensorDtypeError(f"tensors are {found}; save every tensor in one of float32, float16, bfloat16")
    if set(ranks) != {config.rank}:
        raise TensorShapeError(f"r: {CONFIG_FILE} says r={config.rank}, but the tensors have rank(s) "
                               f"{sorted(set(ranks))}; save the config that was trained with the weights")
    if config.largest_scale() > MAX_SCALE:
        raise CorruptAdapter(f"lora_alpha: {config.alpha:g} with r={config.rank} scales an update by "
                             f"{config.largest_scale():g}, beyond the accepted {MAX_SCALE:g}; retrain with a usual "
                             "lora_alpha (e.g. r or 2r)")
    targets = tuple(proj for proj in PROJECTIONS if any(p == proj for _, p in pairs))
    return max(ranks), targets, DTYPES[codes.pop()]


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """NonFiniteWeights if `tensor` (the tensor `name`) holds NaN or infinity."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteWeights(f"tensor {name} holds NaN or infinite values; the training diverged: retrain "
                               "(lower the learning rate) or save the adapter again")


def check_size(size: int, limits: Limits) -> None:
    """AdapterTooLarge if `size` bytes of config + weights are above `limits.max_bytes`."""
    if size > limits.max_bytes:
        raise AdapterTooLarge(f"the adapter is {size} bytes, above the limit of {limits.max_bytes}; "
                              "use a lower rank or fewer target modules, or raise the size limit")


def _is_pattern(target_modules: tuple[str, ...]) -> bool:
    """PEFT keeps a single string target_modules as a regex (or "all-linear"); the tensors decide then."""
    return len(target_modules) == 1 and not target_modules[0].isidentifier()


def _check_card(folder: Path, base_digest: str | None) -> None:
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        return
    expected = read_json_object(card_path).get("base_model_digest")
    if expected is not None and base_digest is not None and expected != base_digest:
        raise BaseModelMismatch(f"{CARD_FILE} says the adapter was trained on base {str(expected)[:12]}, but the "
                                f"server's base is {base_digest[:12]}; train it on this base model")


def _check_module(spec: ModelSpec, limits: Limits, layer: int, proj: str, shape_a: list[int],
                  shape_b: list[int]) -> int:
    """The rank of one module's LoRA pair A [r, in], B [out, r], after checking it fits `spec` and `limits`."""
    where = f"layer {layer} {proj}"
    if layer >= spec.num_layers:
        raise BaseModelMismatch(f"the adapter has weights for layer {layer}, but the {spec.model_type} base has "
                                f"{spec.num_layers} layers; train it on this base model")
    if len(shape_a) != 2 or len(shape_b) != 2:
        raise TensorShapeError(f"{where}: lora_A {shape_a} and lora_B {shape_b} must both be matrices; "
                               "save the adapter with PEFT")
    rank = shape_a[0]
    if shape_b[1] != rank or rank == 0:
        raise TensorShapeError(f"{where}: lora_A {shape_a} has rank {rank} but lora_B {shape_b} has rank "
                               f"{shape_b[1]}; A must be [r, in] and B [out, r] with the same r >= 1")
    in_features, out_features = spec.projection_shape(proj)
    if (shape_a[1], shape_b[0]) != (in_features, out_features):
        raise BaseModelMismatch(f"{where}: lora_A {shape_a} and lora_B {shape_b} need {in_features} inputs and "
                                f"{out_features} outputs on this {spec.model_type} base; the adapter was trained "
                                "for another base model")
    if rank > limits.max_rank:
        raise RankTooHigh(f"{where}: rank {rank} is above the server's max_rank {limits.max_rank}; retrain with "
                          f"r <= {limits.max_rank} or raise engine.max_rank")
    return rank
