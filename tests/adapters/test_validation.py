"""`adapters.validation.validate`: the summary of a good adapter, and one refusal (class and message) per
kind of problem: base model, rank, targets, shapes, dtypes, size, unsupported features, corrupt files."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import (
    AdapterTooLarge,
    BaseModelMismatch,
    CorruptAdapter,
    NonFiniteWeights,
    RankTooHigh,
    TensorDtypeError,
    TensorShapeError,
    UnknownTargetModule,
    UnsupportedFeature,
)
from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.validation import CARD_FILE, AdapterSummary, Limits, validate
from loraplex.server.engine.spec import ModelSpec
from loraplex.server.model_files import model_spec
from support import AdapterSpec, copy_with_config, write_adapter, write_tiny_model

LIMITS = Limits(max_rank=16, max_bytes=1 << 20)
WEIGHTS = "adapter_model.safetensors"
Q1_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
Q1_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Path]:
    """The tiny llama's spec and an r=4 q_proj/v_proj adapter trained on it."""
    root = tmp_path_factory.mktemp("validation")
    base = write_tiny_model("llama", root / "base")
    return model_spec(base), write_adapter(base, AdapterSpec("qv", 4, ("q_proj", "v_proj")), root / "qv", seed=1)


def with_tensors(source: Path, target: Path, **changes: torch.Tensor | None) -> Path:
    """A copy of `source` whose safetensors has tensors replaced (or removed, for None) by short name."""
    folder = copy_with_config(source, target)
    tensors = load_file(source / WEIGHTS)
    for short, tensor in changes.items():
        key = {"q1_a": Q1_A, "q1_b": Q1_B}.get(short, short)
        if tensor is None:
            del tensors[key]
        else:
            tensors[key] = tensor
    save_file(tensors, folder / WEIGHTS)
    return folder


def test_good_adapter_summary(good) -> None:
    spec, folder = good
    size = (folder / "adapter_config.json").stat().st_size + (folder / WEIGHTS).stat().st_size
    assert validate(folder, spec, LIMITS) == AdapterSummary(adapter_digest(folder), 4, ("q_proj", "v_proj"), size,
                                                            "float32")


def test_half_precision_is_accepted(good, tmp_path: Path) -> None:
    spec, folder = good
    half = copy_with_config(folder, tmp_path / "half")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(folder / WEIGHTS).items()}, half / WEIGHTS)
    assert validate(half, spec, LIMITS).dtype == "bfloat16"


def test_base_model_with_other_shapes(good) -> None:
    spec, folder = good
    wider = dataclasses.replace(spec, hidden_size=128)
    with pytest.raises(BaseModelMismatch, match=r"layer \d q_proj: lora_A \[4, 64\] and lora_B \[64, 4\] need 128 "
                       r"inputs and 64 outputs on this llama base; the adapter was trained for another base model"):
        validate(folder, wider, LIMITS)


def test_base_model_with_fewer_layers(good) -> None:
    spec, folder = good
    with pytest.raises(BaseModelMismatch, match=r"weights for layer 1, but the llama base has 1 layers; train it "
                       r"on this base model"):
        validate(folder, dataclasses.replace(spec, num_layers=1), LIMITS)


def test_card_base_digest(good, tmp_path: Path) -> None:
    spec, folder = good
    carded = copy_with_config(folder, tmp_path / "carded")
    (carded / CARD_FILE).write_text(json.dumps({"base_model_digest": "ab" * 32}))
    assert validate(carded, spec, LIMITS, base_digest="ab" * 32).rank == 4
    assert validate(carded, spec, LIMITS).rank == 4  # nothing to compare with
    with pytest.raises(BaseModelMismatch, match=r"adapter_card.json says the adapter was trained on base abababababab,"
                       r" but the server's base is cdcdcdcdcdcd; train it on this base model"):
        validate(carded, spec, LIMITS, base_digest="cd" * 32)


def test_rank_above_maximum(good) -> None:
    spec, folder = good
    with pytest.raises(RankTooHigh, match=r"layer \d [qv]_proj: rank 4 is above the server's max_rank 2; retrain "
                       r"with r <= 2 or raise engine.max_rank"):
        validate(folder, spec, Limits(max_rank=2, max_bytes=1 << 20))


def test_unknown_target_module_in_config(good, tmp_path: Path) -> None:
    spec, folder = good
    renamed = copy_with_config(folder, tmp_path / "c_attn", target_modules=["q_proj", "c_attn", "lm_head"])
    with pytest.raises(UnknownTargetModule, match=r"target_modules \['c_attn', 'lm_head'\] are not projections of a "
                       r"llama decoder; train with target_modules among \('q_proj'"):
        validate(renamed, spec, LIMITS)


def test_regex_target_modules_are_checked_by_tensor(good, tmp_path: Path) -> None:
    spec, folder = good
    regex = copy_with_config(folder, tmp_path / "regex", target_modules=r".*\.(q_proj|v_proj)")
    assert validate(regex, spec, LIMITS).targets == ("q_proj", "v_proj")


def test_unknown_tensor_in_weights(good, tmp_path: Path) -> None:
    spec, folder = good
    head = with_tensors(folder, tmp_path / "head", **{"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(UnknownTargetModule, match=r"unexpected tensor 'base_model.model.lm_head.lora_A.weight': only "
                       r"LoRA A/B of .* are served; train with target_modules among them"):
        validate(head, spec, LIMITS)


def test_no_lora_tensors(good, tmp_path: Path) -> None:
    spec, folder = good
    empty = copy_with_config(folder, tmp_path / "empty")
    save_file({}, empty / WEIGHTS)
    with pytest.raises(UnknownTargetModule, match=r"holds no LoRA tensors; train with target_modules among"):
        validate(empty, spec, LIMITS)


@pytest.mark.parametrize(("changes", "message"), [
    ({"q1_b": torch.zeros(64, 3)}, r"layer 1 q_proj: lora_A \[4, 64\] has rank 4 but lora_B \[64, 3\] has rank 3; "
                                   r"A must be \[r, in\] and B \[out, r\] with the same r >= 1"),
    ({"q1_a": torch.zeros(256)}, r"layer 1 q_proj: lora_A \[256\] and lora_B \[64, 4\] must both be matrices"),
    ({"q1_b": None}, r"layer 1 q_proj has lora_A but not both A and B"),
])
def test_wrong_tensor_shapes(good, tmp_path: Path, changes: dict, message: str) -> None:
    spec, folder = good
    with pytest.raises(TensorShapeError, match=message):
        validate(with_tensors(folder, tmp_path / "shapes", **changes), spec, LIMITS)


@pytest.mark.parametrize(("tensor", "message"), [
    (torch.zeros(4, 64, dtype=torch.int8), r"tensors are \['I8', 'float32'\]; save every tensor in one of "
                                           r"float32, float16, bfloat16"),
    (torch.zeros(4, 64, dtype=torch.float16), r"tensors are \['float16', 'float32'\]"),
])
def test_wrong_tensor_dtypes(good, tmp_path: Path, tensor: torch.Tensor, message: str) -> None:
    spec, folder = good
    with pytest.raises(TensorDtypeError, match=message):
        validate(with_tensors(folder, tmp_path / "dtypes", q1_a=tensor), spec, LIMITS)


def test_size_above_limit(good) -> None:
    spec, folder = good
    with pytest.raises(AdapterTooLarge, match=r"the adapter is \d+ bytes, above the limit of 1000; use a lower rank "
                       r"or fewer target modules, or raise the size limit"):
        validate(folder, spec, Limits(max_rank=16, max_bytes=1000))


@pytest.mark.parametrize(("changes", "message"), [
    ({"use_dora": True}, r"DoRA adapters are not supported; train with use_dora=False"),
    ({"bias": "all"}, r"bias='all' is not supported; train with bias='none'"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save is not supported; train without fully fine-tuned modules"),
])
def test_unsupported_features(good, tmp_path: Path, changes: dict, message: str) -> None:
    spec, folder = good
    with pytest.raises(UnsupportedFeature, match=message):
        validate(copy_with_config(folder, tmp_path / "feature", **changes), spec, LIMITS)


def test_pickled_weights_only(good, tmp_path: Path) -> None:
    spec, folder = good
    pickled = copy_with_config(folder, tmp_path / "pickled")
    (pickled / WEIGHTS).unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"never": "loaded"}))
    with pytest.raises(UnsupportedFeature, match=r"\(adapter_model.bin is pickled and never loaded\); save with "
                       r"safe_serialization=True"):
        validate(pickled, spec, LIMITS)


@pytest.mark.parametrize("cut", [-4, 40, 5, 0])
def test_truncated_safetensors(good, tmp_path: Path, cut: int) -> None:
    spec, folder = good
    truncated = copy_with_config(folder, tmp_path / "truncated")
    data = (folder / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(data[:cut])
    with pytest.raises(CorruptAdapter, match=r"adapter_model.safetensors is corrupt or truncated \(.*\); copy or "
                       r"save the adapter again"):
        validate(truncated, spec, LIMITS)


def test_corrupt_safetensors_header(good, tmp_path: Path) -> None:
    spec, folder = good
    corrupt = copy_with_config(folder, tmp_path / "corrupt")
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:20] = b"\xff" * 12  # inside the JSON header
    (corrupt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter, match=r"is corrupt or truncated"):
        validate(corrupt, spec, LIMITS)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("adapter_config.json", '{"r": 4,', r"adapter_config.json is not valid JSON \(.*\); rewrite it"),
    ("adapter_config.json", "[4]", r"adapter_config.json holds a JSON list, not an object; rewrite it"),
    ("adapter_config.json", '{"r": "four"}', r"adapter_config.json: r, lora_alpha or alpha_pattern is missing or "
                                             r"not a number"),
    (CARD_FILE, "\x00\x01", r"adapter_card.json is not valid JSON"),
])
def test_corrupt_json(good, tmp_path: Path, name: str, text: str, message: str) -> None:
    spec, folder = good
    broken = copy_with_config(folder, tmp_path / "json")
    (broken / name).write_text(text)
    with pytest.raises(CorruptAdapter, match=message):
        validate(broken, spec, LIMITS)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(good, tmp_path: Path, value: float) -> None:
    spec, folder = good
    tensor = load_file(folder / WEIGHTS)[Q1_B].clone()
    tensor[3, 1] = value
    with pytest.raises(NonFiniteWeights, match=rf"tensor {Q1_B} holds NaN or infinite values; the training diverged"):
        validate(with_tensors(folder, tmp_path / "diverged", q1_b=tensor), spec, LIMITS)


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"lora_alpha": float("nan")}, CorruptAdapter, r"lora_alpha nan is not a finite number"),
    ({"lora_alpha": float("inf")}, CorruptAdapter, r"lora_alpha inf is not a finite number"),
    ({"lora_alpha": 1e30}, CorruptAdapter, r"lora_alpha 1e\+30 is not a finite number of magnitude at most 10000"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, CorruptAdapter, r"alpha_pattern nan is not a finite number"),
    ({"lora_alpha": 8000}, CorruptAdapter, r"lora_alpha: 8000 with r=4 scales an update by 2000, beyond the "
                                           r"accepted 1000"),
    ({"r": 8}, TensorShapeError, r"r: adapter_config.json says r=8, but the tensors have rank\(s\) \[4\]"),
    ({"r": 0}, CorruptAdapter, r"r 0 is not a positive rank"),
])
def test_alpha_scale_and_rank_are_checked(good, tmp_path: Path, changes: dict, error: type, message: str) -> None:
    spec, folder = good
    with pytest.raises(error, match=message):
        validate(copy_with_config(folder, tmp_path / "numbers", **changes), spec, LIMITS)
