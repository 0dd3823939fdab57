"""serve-train on the tiny model: it learns, stores a validated adapter with its card, serves it with train/serve
parity, refuses bad inputs with a clear message and nothing stored, resumes after Ctrl-C to the same adapter, runs
under torchrun with 2 processes, hands its adapter to a running server, and (without one, from a config file)
leaves it for a server started on the store to serve by name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.peft_format import read_lora_weights
from loraplex.adapters.train_cli import main
from loraplex.adapters.train_config import parse_settings
from loraplex.adapters.trainer import train
from loraplex.adapters.training_runs import count_runs, promoted_versions
from loraplex.adapters.validation import CARD_FILE
from loraplex.client.client import AsyncClient
from loraplex.server.app import start
from loraplex.server.engine import EngineConfig, SamplingParams
from loraplex.server.logs import BNB_KERNEL_HUB_WARNING
from loraplex.server.model_files import base_digest
from loraplex.server.settings import AdapterSettings, load_settings
from serving_support import TEST_ENGINE, make_engine
from support import reference_generate

SERVE_TRAIN = str(Path(sys.executable).parent / "serve-train")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: Three prompt -> completion pairs in the tiny tokenizer's vocabulary, to memorize.
PAIRS = [("hello world", " the quick brown fox"), ("the lazy dog", " jumps over"),
         ("caf\u00e9", " na\u00efve \u00fcber")]
FAST = ["--rank", "8", "--learning-rate", "0.02", "--dropout", "0", "--batch-size", "4", "--eval-batch-size", "4",
        "--eval-max-new-tokens", "16", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train-data")
    lines = [json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS]
    (root / "train.jsonl").write_text("".join(lines * 4))
    (root / "eval.jsonl").write_text("".join(lines))
    return root / "train.jsonl", root / "eval.jsonl"


def job_args(serving_model, data, tmp_path: Path, *extra: str, epochs: int = 25) -> list[str]:
    return ["--data", str(data[0]), "--eval-data", str(data[1]), "--name", "memo", "--model", str(serving_model[0]),
            "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--epochs", str(epochs),
            *FAST, *extra]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SERVE_TRAIN, *args], capture_output=True, text=True, env=ENV, timeout=600)


def stored_versions(store: Path, name: str = "memo") -> list[Path]:
    folder = store / name
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_job_learns_and_stores_a_validated_adapter_with_its_card(serving_model, data, tmp_path):
    result = train(parse_settings(job_args(serving_model, data, tmp_path)), log=lambda *_: None)
    assert result.base.score < 1.0 and result.adapter.score == 1.0, (result.base, result.adapter)
    assert result.adapter.loss < result.base.loss / 10
    assert stored_versions(tmp_path / "store") == [result.stored.path]
    card = json.loads((result.stored.path / CARD_FILE).read_text())
    assert card["base_model_digest"] == base_digest(serving_model[0])
    assert card["metrics"]["base"]["score"] == result.base.score and card["metrics"]["adapter"]["score"] == 1.0
    assert card["hyperparameters"]["rank"] == 8 and card["hyperparameters"]["target_modules"] == ["all-linear"]
    assert card["examples"] == {"train": 12, "eval": 3} and card["training"]["steps"] == result.steps == 75
    assert set(card["versions"]) == {"torch", "transformers", "peft", "bitsandbytes", "loraplex"}
    assert len(card["data_digest"]) == 64 and card["training"]["wall_time_s"] > 0
    assert not (tmp_path / "work").exists(), "a finished job leaves no checkpoints behind"


def test_the_trained_adapter_serves_with_train_serve_parity(serving_model, data, tmp_path):
    """loraplex's engine (NF4) and transformers + PEFT on the same NF4 base give the same greedy tokens."""
    result = train(parse_settings(job_args(serving_model, data, tmp_path, epochs=10)), log=lambda *_: None)
    base, folder = serving_model[0], result.stored.path
    engine = make_engine(base)
    engine.set_slot(0, read_lora_weights(folder))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [tokenizer(p)["input_ids"] for p, _ in PAIRS] + [tokenizer("over the fox")["input_ids"]]
    served = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True), slots=[0] * len(prompts))
    reference = reference_generate(base, {"memo": folder}, [(p, "memo") for p in prompts], 8, quantized=True)
    assert served == [tokens for tokens, _ in reference]


def test_bad_inputs_end_with_a_message_and_nothing_stored(serving_model, data, tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "hello", "completion": " world"}\n{"prompt": 3}\n')
    done = run(*job_args(serving_model, (bad_data, data[1]), tmp_path))
    assert done.returncode == 1 and "has 1 bad line(s)" in done.stderr and "line 2:" in done.stderr, done.stderr
    other_model = tmp_path / "gpt2"
    other_model.mkdir()
    (other_model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    done = run(*job_args(serving_model, data, tmp_path), "--model", str(other_model))
    assert done.returncode == 1 and "model_type 'gpt2' is not supported" in done.stderr, done.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = run(*job_args(serving_model, data, tmp_path), "--store", str(a_file / "store"))
    assert done.returncode == 1 and f"cannot write the adapter store {a_file / 'store'}" in done.stderr, done.stderr
    done = run(*job_args(serving_model, data, tmp_path), "--rank", "0")
    assert done.returncode == 2 and "rank" in done.stderr
    assert stored_versions(tmp_path / "store") == []


def test_ctrl_c_leaves_a_checkpoint_and_resume_finishes_the_same_adapter(serving_model, data, tmp_path):
    args = job_args(serving_model, data, tmp_path, "--checkpoint-every", "1000", epochs=120)
    process = subprocess.Popen([SERVE_TRAIN, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV)
    seen = b""
    while b"loss=" not in seen:  # training has started (the progress bar shows a loss)
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"serve-train ended early: {seen.decode(errors='replace')}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)
    message = (seen + rest).decode(errors="replace")
    assert process.returncode == 130, message
    assert "interrupted at step" in message and "run the same command with --resume" in message
    assert stored_versions(tmp_path / "store") == [] and list((tmp_path / "work").glob("checkpoint-*"))
    resumed = run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    uninterrupted = run(*job_args(serving_model, data, tmp_path / "again", "--checkpoint-every", "1000", epochs=120))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert stored_versions(tmp_path / "store")[0].name == stored_versions(tmp_path / "again" / "store")[0].name, \
        "resuming reproduces the uninterrupted run exactly (same settings, same threads)"


def test_torchrun_trains_with_two_processes_and_the_same_effective_batch(serving_model, data, tmp_path):
    args = job_args(serving_model, data, tmp_path, epochs=10)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "loraplex.adapters.train_cli"]
    done = subprocess.run([*torchrun, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (version,) = stored_versions(tmp_path / "store")
    card = json.loads((version / CARD_FILE).read_text())
    single = train(parse_settings(job_args(serving_model, data, tmp_path / "single", epochs=10)), log=lambda *_: None)
    assert card["training"]["processes"] == 2 and card["training"]["steps"] == single.steps == 30
    two, one = read_lora_weights(version), read_lora_weights(single.stored.path)
    assert two.keys() == one.keys()
    assert max((two[k][1] - one[k][1]).abs().max().item() for k in two) > 0  # really trained apart
    assert abs(card["metrics"]["adapter"]["loss"] - single.adapter.loss) < 0.5 * single.base.loss


async def test_serve_train_hands_its_adapter_to_a_running_server(serving_model, data, tmp_path):
    store = tmp_path / "store"
    settings = load_settings(model=serving_model[0], adapter={"a_r4_qv": serving_model[1]["a_r4_qv"]},
                             host="127.0.0.1", port=0, reflection=False, engine=EngineConfig(**TEST_ENGINE),
                             adapters=AdapterSettings(store=store))
    app = await start(settings)
    other_results: list[int] = []
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            training = asyncio.create_task(asyncio.to_thread(
                run, *job_args(serving_model, data, tmp_path), "--server", f"127.0.0.1:{app.port}",
                "--promote-if-better"))
            while not training.done():  # other adapters keep serving while the job trains
                result = await client.generate("hello world", "a_r4_qv", max_new_tokens=4, ignore_eos=True)
                other_results.append(len(result.token_ids))
                await asyncio.sleep(0.05)
            done = await training
            assert done.returncode == 0, done.stderr[-3000:]
            assert "loaded into 127.0.0.1" in done.stdout
            listing = await client.list_adapters()
            # the tiny model's config names no EOS (real ones do): stop at the tokenizer's, as trained
            answer = await client.generate(PAIRS[0][0], "memo", max_new_tokens=16, stop_token_ids=[0])
    finally:
        await app.stop(0)
    assert [status.name for status in listing.adapters] == ["a_r4_qv", "memo"]
    (version,) = stored_versions(store)
    assert listing.adapters[1].current_version == version.name == adapter_digest(version)
    assert answer.text == PAIRS[0][1] and answer.completion.adapter_version == version.name
    assert len(other_results) > 3 and set(other_results) == {4}


async def test_a_version_trained_without_a_server_is_served_by_name_by_a_server_started_on_the_store(
        serving_model, data, tmp_path):
    """The job's settings in a YAML file, no --server; then `start` on the same store, and "memo" answers."""
    flags = job_args(serving_model, data, tmp_path, epochs=5)  # --flag value pairs; 15 steps memorize PAIRS
    settings = {flag.removeprefix("--").replace("-", "_"): yaml.safe_load(value)
                for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**settings, "promote_if_better": True}))
    done = run("--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"promoted: servers on {tmp_path / 'store'} serve it as memo" in done.stdout, done.stdout
    assert "Warning" not in done.stderr and BNB_KERNEL_HUB_WARNING not in done.stderr  # no dependency's warning
    (version,) = stored_versions(tmp_path / "store")
    app = await start(load_settings(model=serving_model[0], host="127.0.0.1", port=0, reflection=False,
                                    engine=EngineConfig(**TEST_ENGINE),
                                    adapters=AdapterSettings(store=tmp_path / "store")))
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            answer = await client.generate(PAIRS[0][0], "memo", max_new_tokens=16, stop_token_ids=[0])
    finally:
        await app.stop(0)
    assert answer.text == PAIRS[0][1] and answer.completion.adapter_version == version.name


def test_a_version_that_does_not_beat_the_base_is_stored_but_not_promoted(serving_model, data, tmp_path, capsys):
    """--promote-if-better without --server: the run is recorded as rejected, so no server on the store serves it."""
    args = job_args(serving_model, data, tmp_path, "--promote-if-better", "--learning-rate", "1e-6", epochs=1)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "not promoted: the adapter's exact_match 0.000 does not beat the base's 0.000; servers on " in out, out
    assert len(stored_versions(tmp_path / "store")) == 1
    assert count_runs(tmp_path / "store") == {"rejected": 1} and promoted_versions(tmp_path / "store") == {}


def test_a_wrong_base_is_refused_by_the_server_and_the_adapter_stays_stored(serving_model, data, tmp_path):
    """Trained on one base, handed to a server whose base differs: the card's base digest says so."""
    from serving_support import write_tokenizer
    from support import write_tiny_model

    other = write_tiny_model("llama", tmp_path / "other-base", seed=9)
    write_tokenizer(other, vocab_size=96)

    async def scenario() -> subprocess.CompletedProcess:
        app = await start(load_settings(model=other, host="127.0.0.1", port=0, reflection=False,
                                        engine=EngineConfig(**TEST_ENGINE),
                                        adapters=AdapterSettings(store=tmp_path / "server-store",
                                                                 allowed_roots=[tmp_path])))
        try:
            return await asyncio.to_thread(run, *job_args(serving_model, data, tmp_path, epochs=2), "--server",
                                           f"127.0.0.1:{app.port}")
        finally:
            await app.stop(0)

    done = asyncio.run(scenario())
    assert done.returncode == 1
    assert "did not load the adapter: INVALID_ARGUMENT" in done.stderr and "train it on this base model" in done.stderr
    assert len(stored_versions(tmp_path / "store")) == 1 and "it stays in the store" in done.stderr

