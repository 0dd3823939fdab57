"""Builders for serving tests: a tiny model with adapters and a tokenizer, engines, reference outputs;
helpers for tests against a running server."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.app import App, start
from loraplex.server.app import adapter_manager as build_adapter_manager
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.engine import Engine, EngineConfig, SamplingParams
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.model_files import iter_weights, model_spec
from loraplex.server.settings import AdapterSettings, load_settings
from support import MIXED_ADAPTERS, write_adapter, write_tiny_model

#: Small engine sizes for tests: many KV blocks of 4 positions, slots for every MIXED_ADAPTERS entry.
TEST_ENGINE = dict(num_slots=4, max_rank=64, block_size=4, kv_cache_bytes=2**20)
#: Sentences the test tokenizer is trained on (its vocabulary fits the tiny model's 96 ids).
TOKENIZER_CORPUS = ["hello world", "the quick brown fox jumps over the lazy dog", "caf\u00e9 na\u00efve \u00fcber",
                    "adapters share one base model", "\u65e5\u672c\u8a9e \U0001f600"]


def write_serving_fixture(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny llama with a byte-level BPE tokenizer, and the MIXED_ADAPTERS written next to it."""
    base = write_tiny_model("llama", root / "base")
    write_tokenizer(base, vocab_size=96)
    adapters = {s.name: write_adapter(base, s, root / s.name, seed=10 + i) for i, s in enumerate(MIXED_ADAPTERS)}
    return base, adapters


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on TOKENIZER_CORPUS, saved as a PreTrainedTokenizerFast (no download).

    Only bytes seen in the corpus are in the alphabet, so multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"])  # bytes seen in the corpus
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    fast.save_pretrained(folder)


def make_engine(base: Path, adapters: dict[str, Path] | None = None, **overrides) -> Engine:
    """An engine on `base` with TEST_ENGINE sizes; `adapters` go into slots 0.. in order."""
    engine = Engine(model_spec(base), iter_weights(base), EngineConfig(**{**TEST_ENGINE, **overrides}))
    for slot, folder in enumerate((adapters or {}).values()):
        engine.set_slot(slot, read_lora_weights(folder))
    return engine


def generate_alone(engine: Engine, adapters: dict[str, Path], prompt: list[int], adapter: str,
                   sampling: SamplingParams) -> list[int]:
    """`Engine.generate` on one prompt by itself (the oracle for every batched path)."""
    slot = NO_ADAPTER if adapter == "" else list(adapters).index(adapter)
    return engine.generate([prompt], sampling, slots=[slot])[0]


def adapter_manager(engine: Engine, adapters: dict[str, Path], store: Path, **settings) -> AdapterManager:
    """The server's adapter manager on `engine` (store in `store`), with `adapters` registered as at start-up."""
    values = load_settings(adapter=adapters, adapters=AdapterSettings(store=store, **settings))
    return build_adapter_manager(engine, values, base=None)


def active_requests(manager: AdapterManager, name: str) -> int:
    """Requests holding any version of `name` now."""
    return sum(version.active_requests for version in manager.status(name).versions)


def slow_steps(app: App, seconds: float) -> None:
    """Make every engine step take at least `seconds` (test instrumentation), so requests stay in flight."""
    step = app.scheduler.engine.step

    def slow_step(batch, between_layers=None):
        time.sleep(seconds)
        return step(batch, between_layers)

    app.scheduler.engine.step = slow_step


def fail_next_step(app: App) -> None:
    """Make the next engine step raise (a simulated device fault); later steps run as before."""
    step = app.scheduler.engine.step

    def failing_step(batch, between_layers=None):
        app.scheduler.engine.step = step
        raise RuntimeError("simulated device fault")

    app.scheduler.engine.step = failing_step


async def blocks_back(app: App, timeout: float = 10.0) -> bool:
    """Whether every KV block of the app's engine is free again within `timeout` s (released sequences)."""
    cache = app.scheduler.engine.cache
    deadline = time.monotonic() + timeout
    while cache.free_blocks != cache.num_blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return cache.free_blocks == cache.num_blocks


async def expect_status(code: grpc.StatusCode, awaitable) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await awaitable
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def drain(stream) -> None:
    """Iterate an async stream to its end (or its error)."""
    async for _ in stream:
        pass


@asynccontextmanager
async def serving(serving_model, **overrides):
    """An in-process server on the tiny model and its adapters (free gRPC and HTTP ports); yields
    (app, the HTTP shim's base URL ending in /v1)."""
    base, adapters = serving_model
    values = dict(model=base, adapter=adapters, host="127.0.0.1", port=0, http_port=0, reflection=False,
                  engine=EngineConfig(**TEST_ENGINE))
    app = await start(load_settings(**{**values, **overrides}))
    try:
        yield app, f"http://127.0.0.1:{app.http.port}/v1"
    finally:
        await app.stop(0)


def post(url: str, payload: dict, key: str | None = None) -> tuple[int, dict]:
    """POST JSON with urllib (optionally `authorization: Bearer key`): (status, JSON answer)."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, method="POST", headers=headers, data=json.dumps(payload).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, key: str | None = None) -> tuple[int, dict]:
    """GET a JSON answer with urllib (optionally `authorization: Bearer key`): (status, JSON answer)."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def status_of(url: str) -> int:
    """The HTTP status of GET url."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
"""A template whose text the test tokenizer can encode (only the contents, space-separated)."""


def with_chat_template(serving_model: tuple[Path, dict[str, Path]], base: Path) -> tuple[Path, dict[str, Path]]:
    """A copy of the serving model's base at `base` with CHAT_TEMPLATE (tokenizer files are not part of the
    base's identity, so its adapters still apply)."""
    shutil.copytree(serving_model[0], base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    return base, serving_model[1]


def start_translator(grpc_port: int) -> tuple[subprocess.Popen, str]:
    """`loraplex http-shim` on a free loopback port in front of 127.0.0.1:grpc_port; (process, base URL)."""
    command = [str(Path(sys.executable).parent / "loraplex"), "http-shim", "--grpc-target", f"127.0.0.1:{grpc_port}",
               "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r" on (127\.0\.0\.1:\d+) in front of ", line)
    assert match, f"the translator did not start: {line!r}"
    return process, f"http://{match.group(1)}/v1"
