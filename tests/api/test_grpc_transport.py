"""The transport around the service: loopback-only binding without API keys, TLS, client retries on
UNAVAILABLE (and on nothing else, and never after a stream has yielded tokens)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
from collections import Counter
from pathlib import Path

import grpc
import pytest

from loraplex.client import cli
from loraplex.client.client import AsyncClient, Client, RetryPolicy
from loraplex.server.app import start
from loraplex.server.core.auth import ApiKey
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import load_settings
from serving_support import TEST_ENGINE, drain, expect_status, slow_steps

FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)


def settings(serving_model, **values):
    base, adapters = serving_model
    return load_settings(**{"model": base, "adapter": adapters, "port": 0, "engine": EngineConfig(**TEST_ENGINE),
                            "reflection": False, **values})


def outward_address() -> str | None:
    """This machine's address on its default route (connecting a UDP socket sends nothing), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


async def reachable(target: str) -> bool:
    """Whether a plaintext channel to `target` connects within a second."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 1.0)
        except TimeoutError:
            return False
    return True


@pytest.mark.parametrize(("values", "expected_host"), [
    ({}, "127.0.0.1"),
    ({"allow_unauthenticated_remote": True}, "0.0.0.0"),
    ({"api_keys": [ApiKey(name="k", sha256="ab" * 32)]}, "0.0.0.0"),
])
async def test_without_api_keys_the_server_listens_on_loopback_only(serving_model, caplog, values, expected_host):
    address = outward_address()
    with caplog.at_level(logging.WARNING, logger="loraplex"):
        app = await start(settings(serving_model, **values))  # host defaults to 0.0.0.0
    try:
        assert app.host == expected_host
        warned = "no api_keys are configured: listening on 127.0.0.1 instead of 0.0.0.0" in caplog.text
        assert warned == (expected_host == "127.0.0.1")
        assert await reachable(f"127.0.0.1:{app.port}")
        if address is not None:
            assert await reachable(f"{address}:{app.port}") == (expected_host == "0.0.0.0")
    finally:
        await app.stop(0)


def write_self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_clients_connect_and_plaintext_ones_fail(serving_model, tmp_path, capsys):
    cert_file, key_file = write_self_signed(tmp_path)
    app = await start(settings(serving_model, tls_cert_file=cert_file, tls_key_file=key_file))
    target = f"127.0.0.1:{app.port}"
    try:
        async with AsyncClient(target, root_certificates=cert_file.read_bytes()) as client:
            result = await client.generate([1, 2, 3], "a_r4_qv", max_new_tokens=3)
            assert len(result.token_ids) == 3
        async with AsyncClient(f"localhost:{app.port}", tls=True, root_certificates=cert_file.read_bytes()) as client:
            assert (await client.server_info()).base_model.vocab_size == 96
        async with AsyncClient(target, retry=RetryPolicy(max_attempts=1)) as plaintext:
            await expect_status(grpc.StatusCode.UNAVAILABLE, plaintext.generate([1, 2, 3], max_new_tokens=3, timeout=5))
        async with AsyncClient(target, tls=True, retry=RetryPolicy(max_attempts=1)) as untrusted:  # system roots
            await expect_status(grpc.StatusCode.UNAVAILABLE, untrusted.generate([1, 2, 3], max_new_tokens=3, timeout=5))
        code = await asyncio.to_thread(cli.main, ["info", "--server", target, "--tls-ca", str(cert_file)])
        assert code == 0 and '"vocabSize": 96' in capsys.readouterr().out
    finally:
        await app.stop(0)


class FlakyInterceptor(grpc.aio.ServerInterceptor):
    """Answers the first `failures` calls of each method with UNAVAILABLE; counts every call."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        if self.calls[method] > self.failures:
            return await continuation(handler_call_details)

        async def unavailable(request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

        if method == "GenerateStream":
            return grpc.unary_stream_rpc_method_handler(unavailable)
        return grpc.unary_unary_rpc_method_handler(unavailable)


async def test_client_retries_unavailable_with_backoff(serving_model):
    flaky = FlakyInterceptor(failures=2)
    app = await start(settings(serving_model), interceptors=[flaky])
    target = f"127.0.0.1:{app.port}"

    def sync_calls() -> tuple[int, int]:
        with Client(target, retry=FAST_RETRY) as client:
            generated = client.generate([1, 2, 3], "a_r4_qv", max_new_tokens=3)
            streamed = list(client.generate_stream([1, 2, 3], "a_r4_qv", max_new_tokens=3))
        return len(generated.token_ids), len(streamed)

    try:
        assert await asyncio.to_thread(sync_calls) == (3, 3)
        async with AsyncClient(target, retry=FAST_RETRY) as client:
            assert len((await client.server_info()).adapters) == 4
        assert flaky.calls == {"Generate": 3, "GenerateStream": 3, "ServerInfo": 3}
        async with AsyncClient(target, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)) as client:
            flaky.calls.clear()
            await expect_status(grpc.StatusCode.UNAVAILABLE, client.generate([1, 2, 3], max_new_tokens=3))
            assert flaky.calls == {"Generate": 2}  # gave up after max_attempts
    finally:
        await app.stop(0)


async def test_client_does_not_retry_other_codes_or_a_started_stream(serving_model):
    counter = FlakyInterceptor(failures=0)
    app = await start(settings(serving_model), interceptors=[counter])
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}", retry=FAST_RETRY) as client:
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.generate([], max_new_tokens=3))
            await expect_status(grpc.StatusCode.NOT_FOUND, client.generate([1], "missing"))
            assert counter.calls == {"Generate": 2}
            slow_steps(app, 0.01)
            stream = client.generate_stream([1, 2, 3], max_new_tokens=200, ignore_eos=True)
            await anext(stream)
            await asyncio.to_thread(app.scheduler.close)  # in-flight requests end with UNAVAILABLE
            details = await expect_status(grpc.StatusCode.UNAVAILABLE, drain(stream))
            assert "stopped before the request finished" in details
            assert counter.calls["GenerateStream"] == 1
    finally:
        await app.stop(0)


def test_retry_policy_retries_unavailable_only_within_grpc_bounds():
    config = json.loads(RetryPolicy(max_attempts=3, initial_backoff_s=0.25).service_config())
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "loraplex.v1.Generation"}]
    assert method["retryPolicy"] == {"maxAttempts": 3, "initialBackoff": "0.250000s", "maxBackoff": "2.000000s",
                                     "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert "retryPolicy" not in json.loads(RetryPolicy(max_attempts=1).service_config())["methodConfig"][0]
    for bad in (dict(max_attempts=6), dict(max_attempts=0), dict(initial_backoff_s=0.0),
                dict(initial_backoff_s=3.0), dict(multiplier=0.5)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
