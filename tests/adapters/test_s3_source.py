"""`adapters.s3_source.put_from_s3` against a moto S3 server on 127.0.0.1 (no other network), and a real
server loading from it through the admin API."""

from __future__ import annotations

import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from loraplex.adapters import s3_source
from loraplex.adapters.errors import AdapterTooLarge, CorruptAdapter
from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.s3_source import S3SourceError, put_from_s3
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validation import CARD_FILE, Limits
from loraplex.client.client import AsyncClient
from loraplex.server.app import start
from loraplex.server.engine import EngineConfig, SamplingParams
from loraplex.server.model_files import model_spec
from loraplex.server.settings import AdapterSettings, load_settings
from serving_support import TEST_ENGINE, generate_alone, make_engine
from support import AdapterSpec, write_adapter, write_tiny_model

LIMITS = Limits(max_rank=16, max_bytes=1 << 20)
BUCKET = "adapters"


@pytest.fixture(scope="module")
def s3(monkeypatch_module: pytest.MonkeyPatch) -> Iterator:
    """A boto3 S3 client on a fresh moto server bound to 127.0.0.1 (ephemeral port), with one bucket."""
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch_module.delenv(variable, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("trained")
    base = write_tiny_model("llama", root / "base")
    return model_spec(base), write_adapter(base, AdapterSpec("qv", 4, ("q_proj", "v_proj")), root / "qv", seed=1)


@pytest.fixture
def store(trained, tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", trained[0], LIMITS)


def upload(client, folder: Path, prefix: str, files: tuple[str, ...] = ("adapter_config.json",
                                                                        "adapter_model.safetensors")) -> None:
    for file in files:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}{file}", Body=(folder / file).read_bytes())


def test_fetches_and_stores_only_the_adapter_files(s3, trained, store: AdapterStore) -> None:
    folder = trained[1]
    upload(s3, folder, "teams/support/")
    s3.put_object(Bucket=BUCKET, Key=f"teams/support/{CARD_FILE}", Body=b'{"base_model_digest": null}')
    s3.put_object(Bucket=BUCKET, Key="teams/support/adapter_model.bin", Body=pickle.dumps({"never": "fetched"}))
    for uri in ("s3://adapters/teams/support", "s3://adapters/teams/support/"):
        stored = put_from_s3(store, s3, uri, "support")
        assert stored.digest == adapter_digest(folder)
        assert sorted(p.name for p in stored.path.iterdir()) == [CARD_FILE, "adapter_config.json",
                                                                  "adapter_model.safetensors"]
    assert store.versions("support") == [adapter_digest(folder)]
    assert list((store.root / ".tmp").iterdir()) == []


def test_adapter_at_the_bucket_root(s3, trained, store: AdapterStore) -> None:
    s3.create_bucket(Bucket="root-adapter")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        s3.put_object(Bucket="root-adapter", Key=file, Body=(trained[1] / file).read_bytes())
    assert put_from_s3(store, s3, "s3://root-adapter", "rooted").digest == adapter_digest(trained[1])


def test_missing_weights(s3, trained, store: AdapterStore) -> None:
    upload(s3, trained[1], "config-only/", ("adapter_config.json",))
    with pytest.raises(S3SourceError, match=r"s3://adapters/config-only/ has no adapter_model.safetensors; check "
                       r"the bucket name, and upload the PEFT folder's adapter_config.json and "
                       r"adapter_model.safetensors under that prefix"):
        put_from_s3(store, s3, "s3://adapters/config-only", "support")
    with pytest.raises(S3SourceError, match=r"s3://no-such-bucket/x/ has no adapter_config.json; check the bucket"):
        put_from_s3(store, s3, "s3://no-such-bucket/x", "support")


def test_too_large_is_refused_before_downloading(s3, trained, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    upload(s3, trained[1], "big/")
    small = AdapterStore(tmp_path / "small", trained[0], Limits(max_rank=16, max_bytes=1000))

    def no_download(*args: object) -> None:
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(s3_source, "_download", no_download)
    with pytest.raises(AdapterTooLarge, match=r"above the limit of 1000"):
        put_from_s3(small, s3, "s3://adapters/big", "support")


def test_corrupt_weights_are_refused_and_nothing_is_stored(s3, trained, store: AdapterStore) -> None:
    upload(s3, trained[1], "corrupt/", ("adapter_config.json",))
    truncated = (trained[1] / "adapter_model.safetensors").read_bytes()[:-10]
    s3.put_object(Bucket=BUCKET, Key="corrupt/adapter_model.safetensors", Body=truncated)
    with pytest.raises(CorruptAdapter, match=r"is corrupt or truncated"):
        put_from_s3(store, s3, "s3://adapters/corrupt", "support")
    assert store.versions("support") == [] and list((store.root / ".tmp").iterdir()) == []


@pytest.mark.parametrize(("uri", "message"), [
    ("https://adapters/x", r"'https://adapters/x' is not s3://BUCKET/PREFIX"),
    ("s3://", r"is not s3://BUCKET/PREFIX"),
    ("s3://Bad_Bucket/x", r"is not s3://BUCKET/PREFIX"),
])
def test_malformed_uris(s3, store: AdapterStore, uri: str, message: str) -> None:
    with pytest.raises(S3SourceError, match=message):
        put_from_s3(store, s3, uri, "support")


def test_unreachable_endpoint(store: AdapterStore) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(S3SourceError, match=r"cannot read s3://adapters/x/adapter_config.json: .*; check the "
                       r"bucket, the prefix and the server's S3 credentials"):
        put_from_s3(store, client, "s3://adapters/x", "support")


async def test_a_server_loads_validates_and_serves_an_adapter_from_s3(s3, serving_model, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: LoadAdapter("s3://...") on a real server configured with the moto endpoint."""
    base, adapters = serving_model
    for variable, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(variable, value)
    upload(s3, adapters["b_r16_all"], "served/b/")
    settings = load_settings(model=base, host="127.0.0.1", port=0, reflection=False, engine=EngineConfig(**TEST_ENGINE),
                             adapters=AdapterSettings(store=tmp_path / "store", s3_endpoint_url=s3.meta.endpoint_url,
                                                      s3_region="us-east-1"))
    app = await start(settings)
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            checked = await client.validate_adapter("s3://adapters/served/b")
            missing = await client.validate_adapter("s3://adapters/nothing-here")
            loaded = await client.load_adapter("support", "s3://adapters/served/b/")
            result = await client.generate([4, 5, 6], "support", max_new_tokens=5, ignore_eos=True)
    finally:
        await app.stop(0)
    digest = adapter_digest(adapters["b_r16_all"])
    assert checked.valid and checked.summary.digest == digest and checked.summary.rank == 16
    assert not missing.valid and "has no adapter_config.json" in missing.problem
    assert loaded.changed and loaded.adapter.current_version == digest
    assert result.completion.adapter_version == digest
    engine = make_engine(base, {"b_r16_all": adapters["b_r16_all"]})
    assert result.token_ids == generate_alone(engine, {"b_r16_all": adapters["b_r16_all"]}, [4, 5, 6], "b_r16_all",
                                              SamplingParams(max_new_tokens=5, ignore_eos=True))
