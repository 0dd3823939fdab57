"""lm-evaluation-harness scores a local log-likelihood task against a real `loraplex serve` process through its
`local-completions` model (POST /v1/completions with echo, logprobs and token-id prompts): every item's
log-likelihood equals the one transformers computes on the same weights (within 1e-3), so the accuracy does.
The task is a JSONL written here and the tokenizer is SmolLM2's local folder: nothing is downloaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.server.default_model import default_model_path

pytestmark = pytest.mark.slow

ITEMS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " a banana"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " seven"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": [" green", " blue"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin", " of joy"], "answer": 0},
]
TASK = """task: loraplex_local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def transformers_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) with the model's own logits (lm-eval's split: the context
    and the continuation tokenized apart)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)  # [len, vocab]
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, torch.tensor(continuation_ids)].sum().item()


def test_lm_eval_local_completions_matches_transformers(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    base = default_model_path()
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "loraplex_local_ll.yaml").write_text(TASK.format(data=data))
    serve = [str(Path(sys.executable).parent / "loraplex"), "serve", "--model", str(base), "--port", "0",
             "--http_port", "0", "--no-reflection", "--adapters.store", str(tmp_path / "store")]
    env = {**os.environ, **OFFLINE, "LORAPLEX_ENGINE__QUANTIZE": "false"}  # the same weights as transformers
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = process.stdout.readline()
        port = re.search(r"HTTP on \S+:(\d+)\)", line)
        assert port, f"server did not start: {line!r} {(tmp_path / 'server.log').read_text()}"
        os.environ.update(OFFLINE)
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=["loraplex_local_ll"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            model_args=f"model={base.name},base_url=http://127.0.0.1:{port.group(1)}/v1/completions,"
                       f"tokenizer_backend=huggingface,tokenizer={base},tokenized_requests=True,"
                       f"num_concurrent=1,max_retries=1")
    finally:
        process.kill()
        process.wait()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    correct = 0
    for sample in results["samples"]["loraplex_local_ll"]:
        served = [response[0] for response in sample["filtered_resps"]]
        expected = [transformers_loglikelihood(model, tokenizer, *arguments) for arguments in sample["arguments"]]
        assert served == pytest.approx(expected, abs=1e-3), sample["doc"]
        correct += int(max(range(len(expected)), key=expected.__getitem__) == sample["doc"]["answer"])
    assert results["results"]["loraplex_local_ll"]["acc,none"] == pytest.approx(correct / len(ITEMS))
