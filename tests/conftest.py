import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def adapter_store(tmp_path_factory, monkeypatch) -> None:
    """Every test's servers (in process or spawned) get their own empty adapter store, not $LORAPLEX_HOME's,
    and an HTTP port of their own."""
    monkeypatch.setenv("LORAPLEX_ADAPTERS__STORE", str(tmp_path_factory.mktemp("adapter-store")))
    monkeypatch.setenv("LORAPLEX_HTTP_PORT", "0")  # a free port each, not 8000


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory):
    """(base folder, {adapter name: folder}): a tiny llama with a tokenizer, and the MIXED_ADAPTERS."""
    from serving_support import write_serving_fixture

    return write_serving_fixture(tmp_path_factory.mktemp("serving"))
