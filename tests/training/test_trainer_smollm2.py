"""serve-train on the real default model: a short QLoRA job on the example task, then train/serve parity (the
adapter just trained, served by loraplex's engine, gives the same greedy tokens as transformers + PEFT on the
same NF4 base for the held-out prompts). The full example run (<= 15 minutes, exact match >= 0.8) is
`benchmarks/example_task.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.adapters.train_config import parse_settings
from loraplex.adapters.train_data import read_examples
from loraplex.adapters.trainer import train
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import Engine, EngineConfig, SamplingParams
from loraplex.server.model_files import iter_weights, model_spec
from support import reference_generate

sys.path.insert(0, str(Path(__file__).parents[2] / "examples" / "order_extraction"))
import make_data

MAX_NEW_TOKENS = 40


@pytest.mark.slow
def test_a_model_trained_by_serve_train_serves_with_parity(tmp_path):
    train_file, eval_file = make_data.write(tmp_path / "data", train=64, evaluation=6, seed=1)
    settings = parse_settings(["--data", str(train_file), "--eval-data", str(eval_file), "--name", "orders",
                               "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"),
                               "--epochs", "1", "--learning-rate", "1e-3", "--eval-max-new-tokens",
                               str(MAX_NEW_TOKENS)])
    result = train(settings, log=lambda *_: None)
    assert result.steps == 8 and result.adapter.loss < result.base.loss
    folder = default_model_path()
    engine = Engine(model_spec(folder), iter_weights(folder), EngineConfig(num_slots=1, max_rank=16))
    engine.set_slot(0, read_lora_weights(result.stored.path))


    examples, _ = read_examples(eval_file, AutoTokenizer.from_pretrained(folder), 512)
    prompts = [e.prompt_ids for e in examples]
    served = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS),  # both stop at EOS
                             slots=[0] * len(prompts))
    reference = reference_generate(folder, {"orders": result.stored.path}, [(p, "orders") for p in prompts],
                                   MAX_NEW_TOKENS, quantized=True)
    assert served == [tokens for tokens, _ in reference]
    assert all(len(tokens) > 10 for tokens in served), "whole JSON answers, not a trivially short match"
