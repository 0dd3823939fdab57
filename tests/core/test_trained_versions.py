"""A server starting on an adapter store registers what serve-train promoted there (AdminOperations.
register_promoted): the version of each name's latest succeeded run, never a rejected one, never over a
start-up --adapter of the same name, never again once the admin replaced or removed it; a version that is no
longer stored, or that this server refuses (here: above its rank limit), is skipped without stopping the start.
A running server does the same when the store's training record changes (PromotionWatcher).

The store is filled as serve-train fills it: AdapterStore.put of the version, then record_run with its digest."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.training_runs import record_run
from loraplex.adapters.validation import Limits
from loraplex.server.engine import EngineConfig
from loraplex.server.model_files import base_digest, model_spec
from serving_support import TEST_ENGINE, serving


def trained(store: Path, base: Path, folder: Path, name: str, outcome: str) -> str:
    """Store `folder` as a version of `name` and record a serve-train run with `outcome`; its digest."""
    limits = Limits(max_rank=TEST_ENGINE["max_rank"], max_bytes=2**30)
    stored = AdapterStore(store, model_spec(base), limits, [folder.parent], base_digest(base)).put(folder, name)
    record_run(store, name, outcome, stored.digest)
    return stored.digest


def current_versions(app) -> dict[str, str]:
    return {status.name: status.current for status in app.core.adapters.statuses()}


async def test_a_server_on_the_store_registers_the_promoted_versions(serving_model, tmp_path, caplog):
    base, adapters = serving_model
    a, b, c, d = (adapters[name] for name in ("a_r4_qv", "b_r16_all", "c_r64_mlp_o_rslora", "d_r8_k_gate"))
    store = tmp_path / "store"
    kept = trained(store, base, a, "kept", "succeeded")
    trained(store, base, b, "refused", "rejected")
    trained(store, base, a, "replaced", "succeeded")
    newer = trained(store, base, b, "replaced", "succeeded")
    trained(store, base, c, "replaced", "rejected")  # a later run that did not beat the base changes nothing
    trained(store, base, c, "explicit", "succeeded")
    gone = trained(store, base, d, "gone", "succeeded")
    AdapterStore(store, model_spec(base), Limits(64, 2**30), base_digest=base_digest(base)).remove("gone", gone)
    settings = dict(adapter={"explicit": d}, adapters={"store": store, "allowed_roots": [a.parent]})
    with caplog.at_level(logging.INFO, logger="loraplex"):
        async with serving(serving_model, **settings) as (app, _):
            first = current_versions(app)
            app.core.adapters.load(str(c), "kept")  # the admin replaces one ...
            app.core.adapters.unload("replaced")  # ... and removes another (its stored files go too)
        async with serving(serving_model, **settings) as (app, _):  # the same command again
            restarted = current_versions(app)
    assert first == {"kept": kept, "replaced": newer, "explicit": adapter_digest(d)}
    assert restarted == {"kept": adapter_digest(c), "explicit": adapter_digest(d)}  # the admin's choices stand
    assert f"serving adapter 'kept' version {kept[:12]}, stored and promoted by serve-train" in caplog.text


async def test_a_version_this_server_refuses_is_logged_and_the_server_starts(serving_model, tmp_path, caplog):
    """Rank 16, above this server's max_rank 8."""
    base, adapters = serving_model
    store = tmp_path / "store"
    trained(store, base, adapters["b_r16_all"], "too_big", "succeeded")
    engine = EngineConfig(**{**TEST_ENGINE, "max_rank": 8})
    with caplog.at_level(logging.ERROR, logger="loraplex"):
        async with serving(serving_model, adapter={}, adapters={"store": store}, engine=engine) as (app, _):
            assert current_versions(app) == {}
    assert "adapter 'too_big' version" in caplog.text and "that serve-train stored is not served: " in caplog.text
    assert "rank 16" in caplog.text


async def test_a_running_server_serves_what_serve_train_promotes_meanwhile(serving_model, tmp_path):
    base, adapters = serving_model
    store = tmp_path / "store"
    async with serving(serving_model, adapter={}, adapters={"store": store, "watch_interval_s": 0.05}) as (app, _):
        assert current_versions(app) == {}
        trained(store, base, adapters["b_r16_all"], "late", "rejected")
        promoted = trained(store, base, adapters["a_r4_qv"], "late", "succeeded")
        for _ in range(200):
            if current_versions(app):
                break
            await asyncio.sleep(0.05)
        assert current_versions(app) == {"late": promoted}
    async with serving(serving_model, adapter={}, adapters={"store": store / "other", "watch_store": False}) as (
            app, _):
        assert app.promotions is None
