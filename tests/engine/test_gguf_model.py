"""`--model FILE.gguf` (server/gguf_model.py, server/gguf_convert.py): a tiny random llama written as a GGUF
file by the test (the gguf package's writer, laid out as llama.cpp's converter lays it out) serves the same
greedy tokens as the same weights served from their Hugging Face folder; the conversion is cached by the
file's digest and reused (also through a folder holding the file); an architecture the engine does not serve
is refused naming the supported ones, before anything is converted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from loraplex.client.client import AsyncClient
from loraplex.server.app import start
from loraplex.server.default_model import loraplex_home
from loraplex.server.gguf_model import file_digest
from loraplex.server.model_files import UnsupportedModel
from loraplex.server.settings import load_settings
from serving_support import serving, write_tokenizer

PROMPTS = [[5, 17, 33, 2, 60], [40, 41, 7], [90, 1, 3, 3, 12, 80, 44]]
"""Token-id prompts: the tokens compared are the weights' alone, whatever each tokenizer would make of text."""
EOS = "<eos>"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty $LORAPLEX_HOME for the model cache, sharing the real home's compiled CPU kernels (building them
    again would take minutes)."""
    folder = tmp_path / "home"
    folder.mkdir()
    kernels = loraplex_home() / "torch_extensions"
    kernels.mkdir(parents=True, exist_ok=True)
    (folder / "torch_extensions").symlink_to(kernels, target_is_directory=True)
    monkeypatch.setenv("LORAPLEX_HOME", str(folder))
    return folder


def write_tiny_llama(folder: Path) -> Path:
    """A random 2-layer llama in bfloat16 with the test tokenizer: default rope, an rms_norm_eps that float32
    (GGUF's metadata type) holds exactly, and the tokenizer's <eos> as its end of sequence."""
    write_tokenizer(folder, vocab_size=96)
    eos = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"][EOS]
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.25, rms_norm_eps=2**-16, tie_word_embeddings=False,
                         eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def permuted(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q or k projection ([heads * head_dim, in]): each head's rotary halves
    interleaved (transformers' GGUF loader undoes it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_gguf(folder: Path, path: Path) -> Path:
    """The llama in `folder` as a GGUF file: its hyperparameters and BPE tokenizer as llama.cpp's metadata, its
    tensors in float32 under GGUF's names (bfloat16 values, so the conversion back is exact)."""
    config = json.loads((folder / "config.json").read_text())
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    writer.add_eos_token_id(vocab["vocab"][EOS])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, tensor in load_file(folder / "model.safetensors").items():
        weights = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weights = permuted(weights, heads)
        elif name.endswith("k_proj.weight"):
            weights = permuted(weights, kv_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def greedy_tokens(model: Path) -> tuple[str, list[list[int]]]:
    """(the served model's name, the greedy tokens of each of PROMPTS) from a server on `model`."""
    async with serving((model, {})) as (app, _url), AsyncClient(f"127.0.0.1:{app.port}") as client:
        answers = [await client.generate(prompt, max_new_tokens=12, temperature=0.0) for prompt in PROMPTS]
    return app.model_name, [list(answer.token_ids) for answer in answers]


async def test_a_gguf_file_serves_the_tokens_of_its_hf_folder_and_is_converted_once(tmp_path, home):
    folder = write_tiny_llama(tmp_path / "tiny-llama")
    path = write_gguf(folder, tmp_path / "tiny-llama.gguf")
    _, expected = await greedy_tokens(folder)
    name, served = await greedy_tokens(path)
    converted = home / "models" / "gguf" / file_digest(path) / "tiny-llama"
    first = (converted / "model.safetensors").stat()
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(path, holder / path.name)
    again = await greedy_tokens(holder)  # another path, the same content: the cached conversion
    assert served == expected and any(len(tokens) > 1 for tokens in served)
    assert name == "tiny-llama" and again == (name, expected)
    second = (converted / "model.safetensors").stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not converted again
    assert [p.name for p in (home / "models" / "gguf").iterdir()] == [file_digest(path)]


def write_phi3_gguf(path: Path) -> Path:
    """A GGUF file of an architecture the engine does not serve (phi3: fused qkv), with one tensor."""
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path, home):
    path = write_phi3_gguf(tmp_path / "phi.gguf")
    refusal = "GGUF architecture 'phi3' is not supported; loraplex serves llama, mistral, qwen2, qwen3"
    with pytest.raises(UnsupportedModel, match=refusal):
        await start(load_settings(model=path, host="127.0.0.1", port=0, http_port=None, reflection=False))
    cli = subprocess.run([str(Path(sys.executable).parent / "loraplex"), "serve", "--model", str(path), "--port", "0"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "LORAPLEX_HTTP_PORT": "0"})
    assert cli.returncode == 1 and refusal in cli.stderr
    assert not (home / "models").exists()  # refused before anything was converted


def test_a_folder_with_several_gguf_files_is_refused_at_start_up(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_phi3_gguf(tmp_path / name)
    with pytest.raises(ValidationError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\); pass the one to serve"):
        load_settings(model=tmp_path)


def test_serve_train_trains_on_a_gguf_base_the_server_recognizes_as_its_own(tmp_path, home):
    """serve-train --model x.gguf trains on the same converted weights the server serves: the stored card names
    the base digest a server started with --model x.gguf computes (what it checks before serving a version)."""
    from loraplex.adapters.train_config import parse_settings
    from loraplex.adapters.trainer import train
    from loraplex.adapters.validation import CARD_FILE
    from loraplex.server.gguf_model import served_folder
    from loraplex.server.model_files import base_digest

    path = write_gguf(write_tiny_llama(tmp_path / "tiny-llama"), tmp_path / "tiny-llama.gguf")
    pairs = [{"prompt": "hello world", "completion": " the quick brown fox"}, {"prompt": "the lazy dog",
                                                                                "completion": " jumps over"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs * 2))
    result = train(parse_settings(["--data", str(data), "--eval-data", str(data), "--name", "memo", "--model",
                                   str(path), "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"),
                                   "--epochs", "1", "--rank", "4", "--batch-size", "4", "--eval-batch-size", "4",
                                   "--eval-max-new-tokens", "4"]), log=lambda *_: None)
    card = json.loads((result.stored.path / CARD_FILE).read_text())
    assert card["base_model_digest"] == base_digest(served_folder(path))
