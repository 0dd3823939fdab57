import os

import pytest
import torch

# Without CUDA, Triton can only interpret: its kernels then run on CPU tensors (tests/engine/
# test_triton_kernels.py). Triton reads TRITON_INTERPRET when its own modules and each kernel are
# decorated, so it is set here, before anything imports Triton (bitsandbytes does), for the whole process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
