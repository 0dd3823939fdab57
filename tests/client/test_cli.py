"""A real `loraplex serve` process: the sync client, the CLI verbs, bad settings, and SIGTERM draining."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from loraplex.client import cli
from loraplex.client.client import Chunk, Client
from loraplex.client.records import FinishReason
from loraplex.server.engine import SamplingParams
from serving_support import TEST_ENGINE, generate_alone, make_engine, post, status_of

LORAPLEX = str(Path(sys.executable).parent / "loraplex")  # the console script pyproject declares
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def serve_args(serving_model, store: Path, **engine: object) -> list[str]:
    """`loraplex serve` on the tiny model with its adapters, free ports, the adapter store `store`, and
    TEST_ENGINE's sizes (`engine` overrides them)."""
    base, adapters = serving_model
    args = ["serve", "--model", str(base), "--port", "0", "--http_port", "0", "--no-reflection",
            "--adapters.store", str(store)]
    for name, folder in adapters.items():
        args += ["--adapter", f"{name}={folder}"]
    for name, value in {**TEST_ENGINE, **engine}.items():
        args += [f"--engine.{name}", str(value)]
    return args


@contextmanager
def server_process(args: list[str], log: Path):
    """Start `loraplex serve ...`; yields (process, gRPC "127.0.0.1:PORT", HTTP port or None) once it listens;
    kills it if still up."""
    with open(log, "w") as stderr:
        process = subprocess.Popen([LORAPLEX, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)
    try:
        line = process.stdout.readline()
        match = re.search(r" on (\S+:\d+)$", line.strip())
        assert match, f"server did not start: {line!r} {log.read_text()}"
        http_port = re.search(r"HTTP on \S+:(\d+)\)", line)
        yield process, match.group(1), int(http_port.group(1)) if http_port else None
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LORAPLEX, *args], capture_output=True, text=True, env=ENV, timeout=60)


@pytest.fixture(scope="module")
def server(serving_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    with server_process(serve_args(serving_model, folder / "store"), folder / "server.log") as (_, target, _):
        yield target


def test_sync_client_matches_generate_alone(serving_model, server):
    base, adapters = serving_model
    reference = make_engine(base, adapters)
    with Client(server) as client:
        for adapter in ["", "c_r64_mlp_o_rslora"]:
            result = client.generate([5, 6, 7, 8], adapter, max_new_tokens=8, ignore_eos=True)
            expected = generate_alone(reference, adapters, [5, 6, 7, 8], adapter,
                                      SamplingParams(max_new_tokens=8, ignore_eos=True))
            assert result.token_ids == expected
            assert result.completion.adapter == adapter
        with pytest.raises(grpc.RpcError) as error:
            client.generate([1], "nope")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_generate_streams_the_text(serving_model, server):
    with Client(server) as client:
        expected = client.generate("hello world", "a_r4_qv", max_new_tokens=12)
    done = run_cli("generate", "--server", server, "--adapter", "a_r4_qv", "--raw", "--max-new-tokens", "12",
                   "hello world")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert re.search(r"\[(stop|length): \d+ tokens, a_r4_qv@[0-9a-f]{12}\]", done.stderr)


def test_cli_generate_passes_a_constraint_through(server):
    done = run_cli("generate", "--server", server, "--raw", "--max-new-tokens", "12", "--temperature", "1",
                   "--regex", "(hello|world)( fox)?", "the quick")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"(hello|world)( fox)?(<eos>)?\n", done.stdout), done.stdout
    done = run_cli("generate", "--server", server, "--raw", "--regex", "a(b", "the quick")
    assert done.returncode == 1 and "INVALID_ARGUMENT: constraint: invalid regex" in done.stderr


def test_cli_generate_token_ids_and_info(server):
    done = run_cli("generate", "--server", server, "--token-ids", "1", "2", "3", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert "base model" in done.stderr
    info = run_cli("info", "--server", server)
    assert info.returncode == 0, info.stderr
    assert '"name": "b_r16_all"' in info.stdout and '"vocabSize": 96' in info.stdout
    assert '"loraplex": "0.1.0"' in info.stdout and '"torch": ' in info.stdout


def test_cli_errors_exit_nonzero_with_the_status(server):
    done = run_cli("generate", "--server", server, "--adapter", "nope", "--raw", "hello")
    assert done.returncode == 1
    assert "NOT_FOUND: no adapter named 'nope' is registered" in done.stderr
    done = run_cli("generate", "--server", server, "hello")  # chat template asked for, the tiny model has none
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: chat: " in done.stderr


def test_serve_refuses_bad_settings():
    done = run_cli("serve", "--port", "70000", "--engine.num_slots", "0")
    assert done.returncode == 2
    assert "port" in done.stderr and "engine.num_slots" in done.stderr


def test_serve_reads_the_config_file_named_by_the_flag(tmp_path, capsys):
    config = tmp_path / "loraplex.toml"
    config.write_text("port = 70000\n")
    assert cli.main(["serve", "--config", str(config)]) == 2
    assert "port" in capsys.readouterr().err
    assert cli.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_sighup_reloads_the_quotas_file_and_the_tenants_verbs_show_them(serving_model, tmp_path):
    quotas = tmp_path / "quotas.toml"
    quotas.write_text("[quotas.tenants.anonymous]\nmax_concurrent = 1\n")
    args = [*serve_args(serving_model, tmp_path / "store"), "--quotas_file", str(quotas)]
    with server_process(args, tmp_path / "server.log") as (process, target, _), Client(target) as client:
        listed = run_cli("tenants", "list", "--server", target)
        assert listed.returncode == 0, listed.stderr
        assert re.search(r"^tenant\s+anonymous\s+1\s+interactive\s+1\s+-\s+-\s+0\s+0\s+0\s+-$", listed.stdout, re.M)

        def anonymous() -> tuple[int, float]:
            tenant = client.list_tenants().tenants[0]
            return tenant.limits.max_concurrent, tenant.limits.weight

        quotas.write_text("[quotas.tenants.anonymous]\nmax_concurrent = 5\nweight = 2\n")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while anonymous() != (5, 2.0):
            assert time.monotonic() < deadline, "SIGHUP did not reload the quotas"
            time.sleep(0.05)
        quotas.write_text("[quotas.tenants.anonymous]\nmax_concurrent = 0\n")
        process.send_signal(signal.SIGHUP)
        reloaded = run_cli("tenants", "reload", "--server", target)
        assert reloaded.returncode == 1
        assert "loraplex tenants reload: FAILED_PRECONDITION: quotas not reloaded" in reloaded.stderr
        assert anonymous() == (5, 2.0)
        assert client.generate([1, 2], max_new_tokens=2).completion.generated_tokens == 2
    assert "SIGHUP: quotas not reloaded (the previous ones stay in force)" in (tmp_path / "server.log").read_text()


def test_sigterm_drains_in_flight_streams(serving_model, tmp_path):
    streams, new_tokens = 4, 200
    with server_process(serve_args(serving_model, tmp_path / "store"), tmp_path / "server.log") as (process, target, _):
        started = threading.Barrier(streams + 1)
        results: list[list[Chunk]] = [[] for _ in range(streams)]

        def stream(index: int) -> None:
            with Client(target) as client:
                for response in client.generate_stream([index + 1] * 10, "b_r16_all" if index % 2 else "",
                                                       max_new_tokens=new_tokens, ignore_eos=True):
                    results[index].append(response)
                    if len(results[index]) == 1:
                        started.wait()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        started.wait()
        process.send_signal(signal.SIGTERM)
        at_sigterm = [len(r) for r in results]
        for thread in threads:
            thread.join(timeout=60)
        assert process.wait(timeout=60) == 0
    assert min(at_sigterm) < new_tokens, "streams should still be running when SIGTERM arrives"
    for responses in results:
        assert len(responses) == new_tokens
        assert responses[-1].completion.finish_reason == FinishReason.LENGTH
    assert "draining" in (tmp_path / "server.log").read_text()


def long_context_copy(base: Path, folder: Path, positions: int) -> Path:
    """A copy of the tiny base whose config allows `positions` positions (so a generation can run for seconds)."""
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def sse_lines(port: int, body: dict, lines: list[tuple[float, str]]) -> None:
    """POST a streamed completion to 127.0.0.1:port; append (time, line) for each non-empty SSE line."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    try:
        for raw in response:
            if raw.strip():
                lines.append((time.monotonic(), raw.decode().strip()))
    except (http.client.IncompleteRead, ConnectionError):  # cut at the grace
        pass
    finally:
        connection.close()


def test_sigterm_refuses_new_work_at_once_and_exits_within_the_grace(serving_model, tmp_path):
    """An SSE stream and gRPC streams in flight, shutdown_grace_s 3, SIGTERM: from the signal on, new work
    is refused on both transports (gRPC UNAVAILABLE, HTTP 503, /ready 503) while /health still answers; the
    streams go on generating during the grace and are cut at it; the process exits 0 within grace + 5 s."""
    grace, new_tokens = 3.0, 4000
    base = long_context_copy(serving_model[0], tmp_path / "base", 8192)
    args = [*serve_args((base, {}), tmp_path / "store", kv_cache_bytes=2**24), "--shutdown_grace_s", str(grace)]
    with server_process(args, tmp_path / "server.log") as (process, target, http_port):
        url = f"http://127.0.0.1:{http_port}"
        sse: list[tuple[float, str]] = []
        ends: list[tuple[float, int, str]] = []  # gRPC streams: (end time, tokens, how it ended)

        def grpc_stream(first: int) -> None:
            tokens, how = 0, "finished"
            try:
                with Client(target) as client:
                    for _ in client.generate_stream([first] * 10, max_new_tokens=new_tokens, ignore_eos=True):
                        tokens += 1
            except grpc.RpcError as error:
                how = error.code().name
            ends.append((time.monotonic(), tokens, how))

        body = {"prompt": [7] * 10, "max_tokens": new_tokens, "ignore_eos": True, "stream": True}
        threads = [threading.Thread(target=sse_lines, args=(http_port, body, sse)),
                   *(threading.Thread(target=grpc_stream, args=(first,)) for first in (3, 4))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(sse) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # every stream has its first tokens
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        with Client(target) as client, pytest.raises(grpc.RpcError) as refused:
            list(client.generate_stream([5] * 4, max_new_tokens=4))
        http_refused = post(f"{url}/v1/completions", {"prompt": [5] * 4, "max_tokens": 4})
        ready, health = status_of(f"{url}/ready"), status_of(f"{url}/health")
        sse_at_checks = len(sse)
        for thread in threads:
            thread.join(timeout=30)
        code = process.wait(timeout=30)
        exited = time.monotonic()
    assert code == 0
    assert exited - signalled < grace + 5
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert http_refused[0] == 503 and http_refused[1]["error"]["type"] == "service_unavailable"
    assert (ready, health) == (503, 200)
    assert sse_at_checks < len(sse), "the SSE stream goes on generating during the grace"
    sse_end, last = sse[-1]
    assert last != "data: [DONE]" and json.loads(last.removeprefix("data: "))["error"]["type"] == "service_unavailable"
    assert grace - 0.5 < sse_end - signalled < grace + 2, "the SSE stream is cut at the grace"
    assert len(ends) == 2
    for end, tokens, how in ends:
        assert 0 < tokens < new_tokens and how in ("UNAVAILABLE", "CANCELLED")
        assert grace - 0.5 < end - signalled < grace + 2, "gRPC streams are cut at the grace"


@pytest.mark.slow
def test_default_model_answers_paris(tmp_path):
    """`loraplex serve` on SmolLM2-135M-Instruct, then `loraplex generate` through its chat template."""
    with server_process(["serve", "--port", "0", "--http_port", "0", "--adapters.store", str(tmp_path / "store")],
                        tmp_path / "server.log") as (process, target, _):
        done = run_cli("generate", "--server", target, "--max-new-tokens", "24", "What is the capital of France?")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
