"""The adapter administration verbs of the client (`Client`, `AsyncClient`) and of the CLI
(`loraplex adapters ...`) against a real server on loopback started without adapters: load, list,
describe, generate with it, validate, pin, prefetch, unload; refusals, scopes, and no retries of
mutations."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from loraplex.adapters.identity import adapter_digest
from loraplex.client.client import AsyncClient, Client, RetryPolicy
from loraplex.server.app import start
from loraplex.server.core.auth import ApiKey
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import AdapterSettings, load_settings
from serving_support import TEST_ENGINE, expect_status
from support import copy_with_config

LORAPLEX = str(Path(sys.executable).parent / "loraplex")  # the console script pyproject declares
ENV = {k: v for k, v in os.environ.items() if k not in ("LORAPLEX_SERVER", "LORAPLEX_API_KEY")} | {
    "OMP_NUM_THREADS": "1"}
KEYS = {"admin": "k-admin-0123456789", "inference": "k-inference-0123456789"}


@pytest.fixture
def sources(serving_model, tmp_path, tmp_path_factory) -> dict[str, Path]:
    """Adapter folders: "good" (a_r4_qv), "dora" (its copy with use_dora, under an allowed root) and
    "outside" (a good copy outside the allowed roots)."""
    adapters = serving_model[1]
    return {"good": adapters["a_r4_qv"],
            "dora": copy_with_config(adapters["a_r4_qv"], tmp_path / "sources" / "dora", use_dora=True),
            "outside": shutil.copytree(adapters["a_r4_qv"], tmp_path_factory.mktemp("outside") / "a_r4_qv")}


@asynccontextmanager
async def serving(serving_model, tmp_path: Path, interceptors=(), **overrides):
    """A server with no start-up adapters; allowed roots: the serving adapters' folder and tmp_path/sources.
    Yields "127.0.0.1:PORT"."""
    base, adapters = serving_model
    (tmp_path / "sources").mkdir(exist_ok=True)
    allowed = [next(iter(adapters.values())).parent, tmp_path / "sources"]
    values = dict(model=base, adapter={}, host="127.0.0.1", port=0, reflection=False,
                  engine=EngineConfig(**TEST_ENGINE),
                  adapters=AdapterSettings(store=tmp_path / "store", allowed_roots=allowed))
    app = await start(load_settings(**{**values, **overrides}), interceptors)
    try:
        yield f"127.0.0.1:{app.port}"
    finally:
        await app.stop(0)


async def loraplex(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess without blocking the event loop the in-process server runs on."""
    return await asyncio.to_thread(subprocess.run, [LORAPLEX, *args], capture_output=True, text=True, env=ENV,
                                   timeout=60)


def expect_rpc_error(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def test_sync_client_loads_lists_generates_pins_and_unloads(serving_model, tmp_path, sources):
    digest = adapter_digest(sources["good"])

    def session(target: str) -> None:
        with Client(target) as client:
            assert list(client.list_adapters().adapters) == []
            valid = client.validate_adapter(str(sources["good"]))
            assert (valid.valid, valid.problem, valid.summary.digest) == (True, "", digest)
            assert (valid.summary.rank, list(valid.summary.targets)) == (4, ["q_proj", "v_proj"])
            invalid = client.validate_adapter(str(sources["dora"]))
            assert not invalid.valid and "DoRA" in invalid.problem
            assert list(client.list_adapters().adapters) == []  # validation stores nothing

            loaded = client.load_adapter("support", str(sources["good"]))
            assert loaded.changed and loaded.adapter.current_version == digest
            assert not client.load_adapter("support", str(sources["good"])).changed  # same content
            (status,) = client.list_adapters().adapters
            (version,) = status.versions
            assert (status.name, status.current_version, status.pinned) == ("support", digest, False)
            assert (version.digest, version.rank, list(version.targets)) == (digest, 4, ["q_proj", "v_proj"])
            assert version.size_bytes > 0 and version.dtype

            result = client.generate([1, 2, 3], "support", max_new_tokens=3, ignore_eos=True)
            assert (result.completion.adapter, result.completion.adapter_version) == ("support", digest)
            assert len(result.token_ids) == 3
            assert client.describe_adapter("support").requests_total == 1

            assert client.pin_adapter("support").pinned
            assert client.describe_adapter("support").pinned
            assert not client.pin_adapter("support", pinned=False).pinned
            assert client.prefetch_adapter(f"support@{digest[:8]}").current_version == digest

            details = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_adapter, "other",
                                       str(sources["outside"]))
            assert details.startswith("source: ") and "outside the allowed adapter roots" in details, details
            details = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_adapter, "other",
                                       str(sources["dora"]))
            assert details.startswith("source: ") and "DoRA" in details, details

            unloaded = client.unload_adapter("support")
            assert (list(unloaded.removed_versions), unloaded.drained) == ([digest], True)
            assert list(client.list_adapters().adapters) == []
            expect_rpc_error(grpc.StatusCode.NOT_FOUND, client.generate, [1, 2, 3], "support")
            expect_rpc_error(grpc.StatusCode.NOT_FOUND, client.describe_adapter, "support")
            expect_rpc_error(grpc.StatusCode.NOT_FOUND, client.unload_adapter, "support")

    async with serving(serving_model, tmp_path) as target:
        await asyncio.to_thread(session, target)


async def test_cli_adapters_verbs(serving_model, tmp_path, sources):
    adapters = serving_model[1]
    folder, digest = adapters["b_r16_all"], adapter_digest(adapters["b_r16_all"])
    async with serving(serving_model, tmp_path) as target:
        server = ("--server", target)
        done = await loraplex("adapters", "list", *server)
        assert (done.returncode, done.stdout) == (0, ""), done.stderr
        assert "no adapters are registered" in done.stderr

        done = await loraplex("adapters", "validate", str(folder), *server)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"valid: version {digest}, rank 16, targets q_proj,k_proj,"), done.stdout
        done = await loraplex("adapters", "validate", str(sources["dora"]), *server)
        assert done.returncode == 1
        assert done.stdout.startswith("invalid: ") and "DoRA" in done.stdout, done.stdout

        done = await loraplex("adapters", "load", "b_r16_all", str(folder), "--warm", *server)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"loaded: b_r16_all@{digest[:12]}\n"), done.stdout
        done = await loraplex("adapters", "load", "b_r16_all", str(folder), *server)
        assert done.stdout.startswith("unchanged (already the current version)"), done.stdout

        done = await loraplex("adapters", "list", *server)
        assert done.returncode == 0, done.stderr
        header, row = done.stdout.splitlines()
        assert header.split() == ["NAME", "VERSION", "RANK", "TARGETS", "SIZE", "TIER", "PINNED", "ACTIVE",
                                  "REQUESTS"]
        name, version, rank, targets, size, unit, tier, pinned, active, requests = row.split()
        assert (name, version, rank, pinned, active, requests) == ("b_r16_all", digest[:12], "16", "no", "0", "0")
        assert targets.split(",") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert float(size) > 0 and unit in ("B", "KiB", "MiB") and tier in ("store", "host", "device")
        done = await loraplex("adapters", "list", "--json", *server)
        assert done.returncode == 0, done.stderr
        (listed,) = json.loads(done.stdout)["adapters"]
        assert (listed["name"], listed["currentVersion"], listed["versions"][0]["rank"]) == ("b_r16_all", digest, 16)

        done = await loraplex("generate", "--adapter", "b_r16_all", "--token-ids", "1", "2", "3",
                              "--max-new-tokens", "3", *server)
        assert done.returncode == 0, done.stderr
        assert f"b_r16_all@{digest[:12]}]" in done.stderr

        done = await loraplex("adapters", "pin", "b_r16_all", *server)
        assert done.returncode == 0 and done.stdout.splitlines()[1].split()[7] == "yes", done.stdout + done.stderr
        done = await loraplex("adapters", "describe", "b_r16_all", *server)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"b_r16_all: current version {digest[:12]}, pinned, requests: 1 in all, 0 active")
        assert done.stdout.splitlines()[2].split()[-1] == "current"
        done = await loraplex("adapters", "unpin", "b_r16_all", *server)
        assert done.returncode == 0 and done.stdout.splitlines()[1].split()[7] == "no", done.stdout + done.stderr
        done = await loraplex("adapters", "prefetch", f"b_r16_all@{digest[:8]}", *server)
        assert done.returncode == 0 and "b_r16_all" in done.stdout, done.stderr

        done = await loraplex("adapters", "load", "other", str(sources["outside"]), *server)
        assert done.returncode == 1
        assert done.stderr.startswith("loraplex adapters load: INVALID_ARGUMENT: source: "), done.stderr

        done = await loraplex("adapters", "unload", "b_r16_all", "--wait", *server)
        assert (done.returncode, done.stdout) == (0, f"unloaded b_r16_all: {digest[:12]}\n"), done.stderr
        done = await loraplex("adapters", "list", "--json", *server)
        assert json.loads(done.stdout) == {}
        done = await loraplex("generate", "--adapter", "b_r16_all", "--token-ids", "1", *server)
        assert done.returncode == 1
        assert "loraplex generate: NOT_FOUND: " in done.stderr
        done = await loraplex("adapters", "describe", "b_r16_all", *server)
        assert done.returncode == 1
        assert done.stderr.startswith("loraplex adapters describe: NOT_FOUND: "), done.stderr


async def test_cli_adapters_load_without_a_source_takes_the_version_stored_last(serving_model, tmp_path):
    """Versions written into the store as serve-train writes them (<store>/<NAME>/<digest>/, the later one with
    the later modification time), then `loraplex adapters load NAME` alone."""
    adapters = serving_model[1]
    older, newer = adapters["a_r4_qv"], adapters["d_r8_k_gate"]
    async with serving(serving_model, tmp_path) as target:
        server = ("--server", target)
        done = await loraplex("adapters", "load", "orders", *server)
        assert done.returncode == 1
        assert "NOT_FOUND: the store holds no version of adapter 'orders'; give a source" in done.stderr, done.stderr
        for when, folder in enumerate((newer, older)):  # copied in the other order: the times decide
            stored = shutil.copytree(folder, tmp_path / "store" / "orders" / adapter_digest(folder))
            os.utime(stored, (1_000_000 * (2 - when), 1_000_000 * (2 - when)))
        done = await loraplex("adapters", "load", "orders", *server)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"loaded: orders@{adapter_digest(newer)[:12]}\n"), done.stdout
        done = await loraplex("generate", "--adapter", "orders", "--token-ids", "1", "2", "--max-new-tokens", "2",
                              *server)
        assert done.returncode == 0, done.stderr
        assert f"orders@{adapter_digest(newer)[:12]}]" in done.stderr


async def test_admin_needs_the_admin_scope(serving_model, tmp_path, sources):
    keys = [ApiKey(name=name, sha256=hashlib.sha256(key.encode()).hexdigest(), scopes=frozenset({name}))
            for name, key in KEYS.items()]
    async with serving(serving_model, tmp_path, api_keys=keys) as target:
        async with AsyncClient(target, api_key=KEYS["inference"]) as inference, \
                AsyncClient(target, api_key=KEYS["admin"]) as admin:
            for call in (inference.list_adapters(), inference.load_adapter("support", str(sources["good"])),
                         inference.validate_adapter(str(sources["good"]))):
                details = await expect_status(grpc.StatusCode.PERMISSION_DENIED, call)
                assert "lacks the 'admin' scope" in details
            assert (await admin.load_adapter("support", str(sources["good"]))).changed
            assert len((await inference.generate([1, 2], "support", max_new_tokens=2)).token_ids) == 2
        done = await loraplex("adapters", "list", "--server", target, "--api-key", KEYS["inference"])
        assert done.returncode == 1
        assert done.stderr.startswith("loraplex adapters list: PERMISSION_DENIED: "), done.stderr
        done = await loraplex("adapters", "unload", "support", "--server", target, "--api-key", KEYS["admin"])
        assert done.returncode == 0, done.stderr


class FailFirstCall(grpc.aio.ServerInterceptor):
    """Answers the first call of each method with UNAVAILABLE; counts every call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        if self.calls[method] > 1:
            return await continuation(handler_call_details)

        async def unavailable(request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

        return grpc.unary_unary_rpc_method_handler(unavailable)


async def test_admin_calls_are_not_retried(serving_model, tmp_path, sources):
    """The retry policy covers the Generation service only: a mutation whose answer was lost is not resent."""
    flaky = FailFirstCall()
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    async with serving(serving_model, tmp_path, interceptors=[flaky]) as target, \
            AsyncClient(target, retry=retry) as client:
        await expect_status(grpc.StatusCode.UNAVAILABLE, client.load_adapter("support", str(sources["good"])))
        await expect_status(grpc.StatusCode.UNAVAILABLE, client.list_adapters())
        assert flaky.calls == {"LoadAdapter": 1, "ListAdapters": 1}
        assert list((await client.list_adapters()).adapters) == []  # the refused load changed nothing
        assert len((await client.generate([1, 2], max_new_tokens=2)).token_ids) == 2  # Generate is retried
        assert flaky.calls["Generate"] == 2
