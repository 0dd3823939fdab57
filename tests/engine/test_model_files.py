"""Model and adapter folders: what `model_spec` reads for each supported family, what it refuses
(other architectures, dynamic rope, folders without safetensors; pickles are never loaded), the
PEFT adapter checks of `peft_format`, and the resident size of NF4 base projections."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config

from loraplex.adapters.peft_format import AdapterFormatError, read_adapter_config, read_lora_weights
from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.model_files import UnsupportedModel, iter_weights, model_spec
from support import (
    ARCHITECTURES,
    MIXED_ADAPTERS,
    AdapterSpec,
    copy_with_config,
    tiny_config,
    write_adapter,
    write_tiny_model,
)


class _CreatesMarkerWhenUnpickled:
    """Pickles to a call of os.mkdir(marker): unpickling the file would leave the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def write_pickle_trap(path: Path, marker: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump(_CreatesMarkerWhenUnpickled(marker), handle)


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make any torch.load call fail loudly and record it."""
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# -- model folders -----------------------------------------------------------------------------------


def test_unsupported_model_type_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModel) as error:
        model_spec(tmp_path / "gpt2")
    message = str(error.value)
    assert "'gpt2' is not supported" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message
    assert isinstance(error.value, ValueError)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(UnsupportedModel, match=r"has no config\.json"):
        model_spec(tmp_path / "empty")


def test_folder_without_safetensors_is_refused_and_pickles_are_not_loaded(tmp_path: Path,
                                                                          no_torch_load) -> None:
    source = write_tiny_model("llama", tmp_path / "source")
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    marker = tmp_path / "unpickled"
    write_pickle_trap(folder / "pytorch_model.bin", marker)
    write_pickle_trap(folder / "model.pt", marker)

    spec = model_spec(folder)  # the config alone is fine
    message = r"no \*\.safetensors weights \(pickled checkpoints are not loaded\)"
    with pytest.raises(UnsupportedModel, match=message):
        list(iter_weights(folder))
    with pytest.raises(UnsupportedModel, match=message):
        Engine(spec, iter_weights(folder), EngineConfig(kv_cache_bytes=2**20))
    assert not marker.exists()
    assert no_torch_load == []


def test_dynamic_rope_is_refused(tmp_path: Path) -> None:
    config = tiny_config("llama").to_dict()
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    folder = write_config(tmp_path / "dynamic", config)
    with pytest.raises(UnsupportedModel, match=r"rope_type 'dynamic' is not supported; use one of .*'yarn'"):
        model_spec(folder)


EXPECTED_SPECS = {
    #          head_dim, tied, qkv_bias, qk_norm, windows
    "llama": (16, False, False, False, (None, None)),
    "mistral": (16, False, False, False, (8, 8)),
    "qwen2": (16, True, True, False, (None, None)),
    "qwen3": (32, False, False, True, (None, None)),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_spec_of_each_tiny_architecture(tmp_path: Path, arch: str) -> None:
    folder = write_tiny_model(arch, tmp_path / arch)
    spec = model_spec(folder)
    head_dim, tied, qkv_bias, qk_norm, windows = EXPECTED_SPECS[arch]
    assert spec.model_type == arch
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers) == (96, 64, 128, 2)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, head_dim), "grouped-query attention"
    assert spec.tie_word_embeddings is tied
    assert spec.qkv_bias is qkv_bias
    assert spec.qk_norm is qk_norm
    assert spec.sliding_windows == windows
    assert spec.max_position_embeddings == 256
    assert spec.eos_token_ids == ()
    assert spec.projection_shape("q_proj") == (64, 4 * head_dim)
    assert spec.projection_shape("k_proj") == spec.projection_shape("v_proj") == (64, 2 * head_dim)
    assert spec.projection_shape("o_proj") == (4 * head_dim, 64)
    assert spec.projection_shape("down_proj") == (128, 64)
    # rotary frequencies (scaling included) as transformers computes them for the same folder
    rotary = AutoModelForCausalLM.from_pretrained(folder).model.rotary_emb
    assert len(spec.rope_inv_freq) == head_dim // 2
    torch.testing.assert_close(torch.tensor(spec.rope_inv_freq), rotary.inv_freq.float(), rtol=1e-6, atol=0)
    assert spec.rope_attention_scaling == pytest.approx(rotary.attention_scaling)


def test_yarn_rope_frequencies_and_attention_scaling(tmp_path: Path) -> None:
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 64}
    config.save_pretrained(tmp_path / "yarn")
    spec = model_spec(tmp_path / "yarn")
    rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb
    torch.testing.assert_close(torch.tensor(spec.rope_inv_freq), rotary.inv_freq.float(), rtol=1e-6, atol=0)
    assert spec.rope_attention_scaling == pytest.approx(rotary.attention_scaling)
    assert spec.rope_attention_scaling > 1.0


def test_eos_ids_come_from_generation_config(tmp_path: Path) -> None:
    config = tiny_config("qwen2").to_dict()
    config["eos_token_id"] = 3
    folder = write_config(tmp_path / "eos", config)
    assert model_spec(folder).eos_token_ids == (3,)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert model_spec(folder).eos_token_ids == (5, 7)


def test_nf4_base_projections_are_under_30_percent_of_bf16(tmp_path: Path) -> None:
    config = tiny_config("llama")  # the tiny llama, widened so that fixed quantization metadata is amortized
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "wide")
    folder = tmp_path / "wide"
    spec = model_spec(folder)
    nf4 = Engine(spec, iter_weights(folder), EngineConfig(quantize=True, kv_cache_bytes=2**20))
    params = 0
    for _, name, projection in nf4.model.projections():
        in_features, out_features = spec.projection_shape(name)
        assert projection.base.dense_weight is None, "no dense copy stays resident"
        packed = projection.base.packed_weight
        assert packed.numel() * packed.element_size() == in_features * out_features // 2  # 4 bits a weight
        params += in_features * out_features
    assert params == 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)  # q, o; k, v (GQA); mlp
    ratio = nf4.model.base_linear_bytes() / (2 * params)
    assert 0.25 < ratio < 0.30, f"NF4 / bf16 = {ratio:.3f}"

    dense = Engine(spec, iter_weights(folder), EngineConfig(quantize=False, kv_cache_bytes=2**20))
    assert dense.model.base_linear_bytes() == 4 * params  # float32 on CPU


# -- adapter folders ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = write_tiny_model("llama", root / "base")
    plain = write_adapter(base, AdapterSpec("qv", 4, ("q_proj", "v_proj")), root / "qv", seed=1)
    rslora = write_adapter(base, MIXED_ADAPTERS[2], root / "rslora", seed=2)
    return base, plain, rslora


def test_reads_peft_weights_and_scales(adapter_folders) -> None:
    base, plain, rslora = adapter_folders
    spec = model_spec(base)
    weights = read_lora_weights(plain)
    assert set(weights) == {(layer, proj) for layer in range(2) for proj in ("q_proj", "v_proj")}
    raw = load_file(plain / "adapter_model.safetensors")
    for (layer, proj), (lora_a, lora_b, scale) in weights.items():
        in_features, out_features = spec.projection_shape(proj)
        assert lora_a.shape == (4, in_features) and lora_b.shape == (out_features, 4)
        assert scale == 16 / 4  # lora_alpha / r
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
        assert torch.equal(lora_a, raw[f"{prefix}.lora_A.weight"])
        assert torch.equal(lora_b, raw[f"{prefix}.lora_B.weight"])
    rs = read_lora_weights(rslora)
    assert {proj for _, proj in rs} == {"o_proj", "up_proj", "down_proj"}
    assert {scale for _, _, scale in rs.values()} == {32 / 64**0.5}  # rsLoRA: alpha / sqrt(r)


def test_alpha_pattern_overrides_one_module(adapter_folders, tmp_path: Path) -> None:
    _, plain, _ = adapter_folders
    folder = copy_with_config(plain, tmp_path / "pattern", alpha_pattern={"v_proj": 8})
    scales = {key: scale for key, (_, _, scale) in read_lora_weights(folder).items()}
    assert scales == {(0, "q_proj"): 4.0, (1, "q_proj"): 4.0, (0, "v_proj"): 2.0, (1, "v_proj"): 2.0}


@pytest.mark.parametrize(("changes", "message"), [
    ({"use_dora": True}, r"DoRA adapters are not supported; train with use_dora=False"),
    ({"bias": "all"}, r"bias='all' is not supported; train with bias='none'"),
    ({"bias": "lora_only"}, r"bias='lora_only' is not supported"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save is not supported"),
    ({"peft_type": "LOHA"}, r"peft_type 'LOHA' is not supported; train a LoRA adapter"),
])
def test_unsupported_adapter_configs_are_refused(adapter_folders, tmp_path: Path, changes: dict,
                                                 message: str) -> None:
    _, plain, _ = adapter_folders
    folder = copy_with_config(plain, tmp_path / "bad", **changes)
    with pytest.raises(AdapterFormatError, match=message):
        read_adapter_config(folder)
    with pytest.raises(AdapterFormatError, match=message):
        read_lora_weights(folder)


def test_adapter_without_safetensors_is_refused_and_bin_never_loaded(adapter_folders, tmp_path: Path,
                                                                     no_torch_load) -> None:
    _, plain, _ = adapter_folders
    folder = copy_with_config(plain, tmp_path / "pickled")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    write_pickle_trap(folder / "adapter_model.bin", marker)
    message = (r"has no adapter_model\.safetensors \(adapter_model\.bin is pickled and never loaded\); "
               r"save with safe_serialization=True")
    with pytest.raises(AdapterFormatError, match=message):
        read_lora_weights(folder)
    assert not marker.exists()
    assert no_torch_load == []
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(AdapterFormatError, match=r"has no adapter_model\.safetensors; save with"):
        read_lora_weights(folder)


def test_adapter_folder_without_config_is_refused(adapter_folders, tmp_path: Path) -> None:
    _, plain, _ = adapter_folders
    folder = copy_with_config(plain, tmp_path / "noconfig")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match=r"has no adapter_config\.json"):
        read_lora_weights(folder)


def test_adapter_tensors_must_be_lora_pairs(adapter_folders, tmp_path: Path) -> None:
    _, plain, _ = adapter_folders
    tensors = load_file(plain / "adapter_model.safetensors")

    extra = copy_with_config(plain, tmp_path / "extra")
    lm_head = {"base_model.model.lm_head.weight": torch.zeros(96, 64)}
    save_file({**tensors, **lm_head}, extra / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"unexpected tensor 'base_model.model.lm_head.weight'"):
        read_lora_weights(extra)

    half = copy_with_config(plain, tmp_path / "half")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, half / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"layer 1 v_proj has lora_A but not both A and B"):
        read_lora_weights(half)
