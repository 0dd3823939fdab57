import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory):
    """(base folder, {adapter name: folder}): a tiny llama with a tokenizer, and the MIXED_ADAPTERS."""
    from serving_support import write_serving_fixture

    return write_serving_fixture(tmp_path_factory.mktemp("serving"))
