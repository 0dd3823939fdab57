"""serve-train's `--config FILE` (YAML and TOML): every setting round-trips through a file, flags and
LORAPLEX_TRAIN_* variables override it, relative paths are the file's, unknown keys and bad files are refused
with a message (exit 2 from the console script); the reference table in docs/ is the generated one; every
example task's config parses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic_settings import SettingsError

from loraplex.adapters.train_config import TrainSettings, parse_settings
from loraplex.adapters.train_reference import reference_table

ROOT = Path(__file__).resolve().parents[2]
SERVE_TRAIN = str(Path(sys.executable).parent / "serve-train")


def every_setting(folder: Path) -> dict[str, object]:
    """A value other than its default for every setting (as a file holds it), the files it names created."""
    for file in ("train.jsonl", "eval.jsonl"):
        (folder / file).write_text('{"prompt": "a", "completion": "b"}\n')
    values = {
        "data": str(folder / "train.jsonl"), "name": "orders", "eval_data": str(folder / "eval.jsonl"),
        "model": str(folder / "model"), "store": str(folder / "store"), "work_dir": str(folder / "work"),
        "server": "127.0.0.1:50051", "api_key": "k-admin", "promote_if_better": True, "rank": 8, "alpha": 16.0,
        "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-3, "warmup_ratio": 0.1,
        "weight_decay": 0.01, "epochs": 2.5, "batch_size": 4, "grad_accum": 2, "max_length": 256,
        "gradient_checkpointing": True, "seed": 7, "eval_fraction": 0.2, "eval_batch_size": 8,
        "eval_max_new_tokens": 48, "scorer": "my_scores:score", "checkpoint_every": 10, "resume": True,
        "quantize": False, "device": "cpu"}
    assert values.keys() == TrainSettings.model_fields.keys(), "give every setting a value here"
    defaults = TrainSettings.model_construct()
    assert [key for key, value in values.items() if getattr(defaults, key, None) == value] == []
    return values


def toml_text(values: dict[str, object]) -> str:
    """`key = value` lines (JSON's strings, numbers, booleans and lists are TOML's too)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def as_file_values(settings: TrainSettings) -> dict[str, object]:
    return settings.model_dump(mode="json")


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml"])
def test_every_setting_round_trips_through_a_config_file(tmp_path, suffix):
    values = every_setting(tmp_path)
    config = tmp_path / f"train{suffix}"
    config.write_text(toml_text(values) if suffix == ".toml" else yaml.safe_dump(values))
    settings = parse_settings(["--config", str(config)])
    assert as_file_values(settings) == values
    written = tmp_path / f"again{suffix}"  # what was read, written back, reads the same
    dumped = as_file_values(settings)
    written.write_text(toml_text(dumped) if suffix == ".toml" else yaml.safe_dump(dumped))
    assert parse_settings([f"--config={written}"]) == settings


def test_flags_and_environment_override_the_file_and_relative_paths_are_the_files(tmp_path, monkeypatch):
    folder = tmp_path / "job"
    folder.mkdir()
    every_setting(folder)
    (folder / "train.yaml").write_text("data: train.jsonl\nname: orders\nrank: 8\nepochs: 2\nseed: 3\n")
    monkeypatch.chdir(tmp_path)  # not the file's folder
    monkeypatch.setenv("LORAPLEX_TRAIN_SEED", "5")
    settings = parse_settings(["--rank", "4", "--config", "job/train.yaml"])
    assert settings.data == folder / "train.jsonl"
    assert (settings.rank, settings.epochs, settings.seed, settings.name) == (4, 2.0, 5, "orders")


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("data: train.jsonl\nname: x\nrnak: 8\n", ".yaml", "unknown setting 'rnak' (did you mean 'rank'?)"),
    ('data = "train.jsonl"\nname = "x"\nlearning-rate = 0.1\n', ".toml",
     "unknown setting 'learning-rate' (did you mean 'learning_rate'?)"),
    ("data: [unclosed\n", ".yaml", "is not valid YAML"),
    ("data = \n", ".toml", "is not valid TOML"),
    ("- data\n- name\n", ".yaml", "expected a mapping of setting names to values, got list"),
    ("data: train.jsonl\n", ".json", "name it .yaml, .yml or .toml"),
])
def test_bad_config_files_are_refused_saying_what_is_wrong(tmp_path, text, suffix, message):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    config = tmp_path / f"train{suffix}"
    config.write_text(text)
    with pytest.raises(SettingsError) as error:
        parse_settings(["--config", str(config)])
    assert message in str(error.value) and str(config) in str(error.value), error.value


def test_serve_train_exits_2_naming_the_unknown_key_and_a_missing_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: train.jsonl\nname: x\nepoch: 2\n")
    done = subprocess.run([SERVE_TRAIN, "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"serve-train: invalid settings: config file {config}: unknown setting 'epoch' (did you mean " \
           "'epochs'?)" in done.stderr, done.stderr
    done = subprocess.run([SERVE_TRAIN, "--config", str(tmp_path / "none.toml")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and f"config file {tmp_path / 'none.toml'} cannot be read" in done.stderr


def test_the_reference_in_docs_is_the_one_generated_from_the_settings():
    committed = (ROOT / "docs" / "serve-train.md").read_text()
    assert committed == reference_table(), "run: python -m loraplex.adapters.train_reference docs/serve-train.md"
    for name in TrainSettings.model_fields:
        assert f"| `{name}` | `--{name.replace('_', '-')}` |" in committed


def test_every_example_task_has_a_config_that_parses(tmp_path):
    tasks = sorted(path.parent for path in (ROOT / "examples").glob("*/make_data.py"))
    assert tasks
    for task in tasks:
        copy = shutil.copytree(task, tmp_path / task.name, ignore=shutil.ignore_patterns("data"))
        subprocess.run([sys.executable, str(copy / "make_data.py"), "--out", str(copy / "data"), "--train", "4",
                        "--eval", "2"], check=True, capture_output=True, timeout=60)
        settings = parse_settings(["--config", str(copy / "train.yaml")])
        assert settings.data.is_file() and settings.name
        assert settings.eval_data is None or settings.eval_data.is_file()
