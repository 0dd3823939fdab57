"""`adapters.store.AdapterStore` on real folders: versions by digest, atomic puts (a failure or crash
mid-copy leaves no visible version), sources confined to the allowed roots (traversal, symlinks)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraplex.adapters import store as store_module
from loraplex.adapters.errors import CorruptAdapter, RankTooHigh
from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.reference import InvalidAdapterReference
from loraplex.adapters.store import AdapterStore, SourceChanged, SourceNotAllowed, VersionNotStored
from loraplex.adapters.validation import CARD_FILE, Limits
from loraplex.server.engine.spec import ModelSpec
from loraplex.server.model_files import model_spec
from support import AdapterSpec, copy_with_config, write_adapter, write_tiny_model

LIMITS = Limits(max_rank=16, max_bytes=1 << 20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Path]:
    root = tmp_path_factory.mktemp("trained")
    base = write_tiny_model("llama", root / "base")
    return model_spec(base), write_adapter(base, AdapterSpec("qv", 4, ("q_proj", "v_proj")), root / "qv", seed=1)


@pytest.fixture
def sources(trained, tmp_path: Path) -> Path:
    """An allowed root holding the adapter as `good/`, with a card and a README."""
    root = tmp_path / "sources"
    good = copy_with_config(trained[1], root / "good")
    (good / CARD_FILE).write_text(json.dumps({"base_model_digest": "ab" * 32}))
    (good / "README.md").write_text("not copied")
    return root


@pytest.fixture
def store(trained, sources: Path, tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", trained[0], LIMITS, allowed_roots=[sources])


def visible(store: AdapterStore) -> list[Path]:
    """Every path in the store outside its hidden temp folder."""
    return sorted(p for p in store.root.rglob("*") if ".tmp" not in p.relative_to(store.root).parts)


def test_put_stores_a_version_by_digest(store: AdapterStore, sources: Path) -> None:
    stored = store.put(sources / "good", "support")
    digest = adapter_digest(sources / "good")
    assert (stored.name, stored.digest, stored.path) == ("support", digest, store.root / "support" / digest)
    assert stored.summary.rank == 4
    assert sorted(p.name for p in stored.path.iterdir()) == [CARD_FILE, "adapter_config.json",
                                                              "adapter_model.safetensors"]
    assert adapter_digest(stored.path) == digest
    assert store.put(sources / "good", "support") == stored  # same bytes: the same version
    assert store.versions("support") == [digest]
    assert store.path("support", digest) == stored.path
    assert list((store.root / ".tmp").iterdir()) == []


def test_new_bytes_make_a_new_version_and_remove_deletes_one(store: AdapterStore, sources: Path) -> None:
    first = store.put(sources / "good", "support")
    copy_with_config(sources / "good", sources / "v2", lora_alpha=32)
    second = store.put(sources / "v2", "support")
    assert store.versions("support") == sorted([first.digest, second.digest])
    store.remove("support", first.digest)
    assert store.versions("support") == [second.digest]
    with pytest.raises(VersionNotStored, match=rf"the store has no version {first.digest[:12]} of adapter 'support'"):
        store.path("support", first.digest)


def test_invalid_adapter_is_not_stored(trained, sources: Path, tmp_path: Path) -> None:
    strict = AdapterStore(tmp_path / "strict", trained[0], Limits(max_rank=2, max_bytes=1 << 20), [sources])
    with pytest.raises(RankTooHigh):
        strict.put(sources / "good", "support")
    assert visible(strict) == []


def test_failure_mid_copy_leaves_no_version(store: AdapterStore, sources: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    copied: list[Path] = []
    real_copy = store_module._copy_durably

    def copy_then_fail(source: Path, target: Path) -> None:
        if copied:
            raise OSError(28, "No space left on device")
        real_copy(source, target)
        copied.append(target)

    monkeypatch.setattr(store_module, "_copy_durably", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        store.put(sources / "good", "support")
    assert copied and visible(store) == [] and list((store.root / ".tmp").iterdir()) == []


def test_source_changed_while_copying_is_discarded(store: AdapterStore, sources: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def copy_other_bytes(source: Path, target: Path) -> None:
        target.write_bytes(source.read_bytes() + b" ")

    monkeypatch.setattr(store_module, "_copy_durably", copy_other_bytes)
    with pytest.raises(SourceChanged, match=r"changed while it was copied into the store; retry"):
        store.put(sources / "good", "support")
    assert visible(store) == []


def test_crash_leftovers_are_invisible_and_removed_on_open(trained, store: AdapterStore, sources: Path) -> None:
    dead = store.root / ".tmp" / "999999999-crashed"  # above Linux's pid_max: no such process
    shutil.copytree(sources / "good", dead)
    alive = store.root / ".tmp" / f"{os.getpid()}-in-progress"
    alive.mkdir()
    here = socket.gethostname()
    dead_here = store.root / ".tmp" / f"{here}@999999999-crashed"
    alive_here = store.root / ".tmp" / f"{here}@{os.getpid()}-in-progress"
    other_host = store.root / ".tmp" / "other-node.example@999999999-in-progress"  # its pid means nothing here
    for folder in (dead_here, alive_here, other_host):
        folder.mkdir()
    assert visible(store) == [] and store.versions("good") == []
    AdapterStore(store.root, trained[0], LIMITS, [sources])
    assert not dead.exists() and alive.exists()
    assert not dead_here.exists() and alive_here.exists() and other_host.exists()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "x" * 65, "-dash"])
def test_bad_names_are_refused(store: AdapterStore, sources: Path, name: str) -> None:
    with pytest.raises(InvalidAdapterReference, match=r"is not allowed: use letters, digits, '\.', '_', '-'"):
        store.put(sources / "good", name)


def test_path_traversal_is_refused(store: AdapterStore, sources: Path, tmp_path: Path) -> None:
    outside = copy_with_config(sources / "good", tmp_path / "outside")
    with pytest.raises(SourceNotAllowed, match=rf"resolves to {outside}, outside the allowed adapter roots "
                       rf"\({sources}\); copy the adapter under one of them"):
        store.put(sources / ".." / "outside", "support")
    with pytest.raises(SourceNotAllowed, match=r"is a relative path; give an absolute path"):
        store.put(Path("sources/good"), "support")
    with pytest.raises(SourceNotAllowed, match=r"cannot be read \(No such file or directory\)"):
        store.put(sources / "missing", "support")
    assert visible(store) == []


def test_symlink_escapes_are_refused(store: AdapterStore, sources: Path, tmp_path: Path) -> None:
    outside = copy_with_config(sources / "good", tmp_path / "outside")
    (sources / "linked_folder").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SourceNotAllowed, match=r"outside the allowed adapter roots"):
        store.put(sources / "linked_folder", "support")

    linked_file = copy_with_config(sources / "good", sources / "linked_file")
    (linked_file / "adapter_model.safetensors").unlink()
    (linked_file / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(SourceNotAllowed, match=r"adapter_model.safetensors, outside the allowed adapter roots"):
        store.put(linked_file, "support")
    assert visible(store) == []


def test_symlinks_inside_the_roots_are_followed(store: AdapterStore, sources: Path) -> None:
    (sources / "alias").symlink_to(sources / "good", target_is_directory=True)
    stored = store.put(sources / "alias", "support")
    assert not any(path.is_symlink() for path in stored.path.iterdir())
    assert stored.digest == adapter_digest(sources / "good")


def test_a_corrupt_new_version_leaves_the_previous_one(store: AdapterStore, sources: Path) -> None:
    previous = store.put(sources / "good", "support")
    truncated = copy_with_config(sources / "good", sources / "truncated", lora_alpha=32)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptAdapter, match=r"is corrupt or truncated"):
        store.put(truncated, "support")
    assert store.versions("support") == [previous.digest]
    assert adapter_digest(store.path("support", previous.digest)) == previous.digest


def test_concurrent_puts_of_the_same_and_other_versions(store: AdapterStore, sources: Path) -> None:
    copy_with_config(sources / "good", sources / "v2", lora_alpha=32)
    folders = [sources / "good", sources / "v2"] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        stored = list(pool.map(lambda folder: store.put(folder, "support"), folders))
    digests = {adapter_digest(sources / "good"), adapter_digest(sources / "v2")}
    assert {s.digest for s in stored} == digests and set(store.versions("support")) == digests
    assert list((store.root / ".tmp").iterdir()) == []


def test_versions_are_digests_never_paths(store: AdapterStore, sources: Path) -> None:
    store.put(sources / "good", "support")
    escape = "../" * 21 + "x"  # 64 characters
    for digest in (escape, "0" * 63, "A" * 64):
        with pytest.raises(VersionNotStored, match=r"the store has no version"):
            store.remove("support", digest)
    assert len(store.versions("support")) == 1
