"""serve-train's data: prompt/completion and chat lines tokenized as the server tokenizes requests, loss only on
the answer, every bad line reported with its number, a seeded held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraplex.adapters.train_data import IGNORE_INDEX, DataError, collate, load_dataset, read_examples
from loraplex.server.default_model import default_model_path


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer (it has a chat template); no weights are loaded."""
    return AutoTokenizer.from_pretrained(default_model_path())


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_completion_examples_learn_only_the_completion_and_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Capital of France?", "completion": " Paris"}])
    (example,), _ = read_examples(path, tokenizer, max_length=64)
    prompt_ids = tokenizer("Capital of France?")["input_ids"]
    answer_ids = tokenizer(" Paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example.prompt_ids == prompt_ids and example.input_ids == prompt_ids + answer_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert example.reference == " Paris" and not example.chat


def test_chat_examples_learn_only_the_assistant_turns(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    (example,), _ = read_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tokenizer, 512)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    served = tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert example.input_ids == full and example.prompt_ids == served and example.chat
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert "Hello!" in learned and "Paris." in learned
    assert "Hi" not in learned and "Capital" not in learned


def test_every_bad_line_is_reported_with_its_number(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "completion": " fine"},
        "{not json",
        [1, 2],
        {"prompt": "", "completion": "x"},
        {"question": "?"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"prompt": "long " * 100, "completion": " x"},
    ])
    with pytest.raises(DataError) as error:
        read_examples(path, tokenizer, max_length=50)
    message = str(error.value)
    assert message.startswith(f"{path} has 7 bad line(s); fix them and run again:")
    for expected in ("line 2: not valid JSON", "line 3: expected a JSON object, got list",
                     'line 4: "prompt" must be a non-empty string',
                     'line 5: expected {"prompt", "completion"} or {"messages": [...]}',
                     "line 6: the last message must be the assistant's", "line 7: message 0 must be",
                     "line 8: 10", "above --max-length 50"):
        assert expected in message, expected
    assert "line 1" not in message


def test_empty_and_missing_files(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"holds no examples"):
        read_examples(write_jsonl(tmp_path / "empty.jsonl", []), tokenizer, 64)
    with pytest.raises(DataError, match=r"cannot read .*missing.jsonl"):
        read_examples(tmp_path / "missing.jsonl", tokenizer, 64)


def test_held_out_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)])
    first = load_dataset(path, None, tokenizer, 64, eval_fraction=0.2, seed=3)
    again = load_dataset(path, None, tokenizer, 64, eval_fraction=0.2, seed=3)
    other = load_dataset(path, None, tokenizer, 64, eval_fraction=0.2, seed=4)
    references = lambda examples: sorted(e.reference for e in examples)  # noqa: E731
    assert (len(first.train), len(first.eval)) == (16, 4)
    assert references(first.eval) == references(again.eval) != references(other.eval)
    assert not set(references(first.train)) & set(references(first.eval))
    assert first.digest == other.digest
    with pytest.raises(DataError, match=r"1 example\(s\) leave none to train on"):
        load_dataset(write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "completion": " a"}]), None, tokenizer,
                     64, eval_fraction=0.1, seed=0)


def test_collate_pads_right_without_loss_on_padding(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"},
                                              {"prompt": "a longer prompt", "completion": " and answer"}])
    examples, _ = read_examples(path, tokenizer, 64)
    batch = collate(examples, pad=0)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
