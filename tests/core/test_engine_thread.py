"""The engine thread: one thread of a server runs torch's parallel work, every other thread torch on one thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from loraplex.client.client import AsyncClient
from loraplex.server.core.engine_thread import EngineThread
from loraplex.server.engine import nf4_cpu
from loraplex.server.engine.cpu_threads import single_threaded
from serving_support import serving


def test_it_runs_what_is_submitted_in_order_on_one_thread_and_passes_failures_to_the_submitter():
    engine_thread = EngineThread(threads=2)
    try:
        names = [engine_thread.submit(lambda: threading.current_thread().name) for _ in range(3)]
        assert len({future.result() for future in names}) == 1
        order: list[int] = []
        futures = [engine_thread.submit(order.append, i) for i in range(5)]
        for future in futures:
            future.result()
        assert order == list(range(5))
        failed = engine_thread.submit(lambda: 1 / 0)
        assert isinstance(failed.exception(), ZeroDivisionError)
        assert engine_thread.submit(lambda: "still serving").result() == "still serving"
    finally:
        engine_thread.close()


def test_after_others_single_threaded_only_the_engine_thread_runs_torch_on_several_threads():
    """The engine thread keeps its count, also once our own kernels (a library of their own, which reads torch's
    default count when a thread first runs one of its parallel ops) have run there; the caller and the helper
    threads run torch on one thread; close gives the caller its count back."""
    before = torch.get_num_threads()
    engine_thread = EngineThread(threads=2)
    try:
        engine_thread.others_single_threaded()
        assert torch.get_num_threads() == 1
        assert engine_thread.submit(torch.get_num_threads).result() == 2
        with ThreadPoolExecutor(1, initializer=single_threaded) as helper:  # as the adapter loaders are
            assert helper.submit(torch.get_num_threads).result() == 1
        assert engine_thread.submit(lambda: torch.ones(1 << 16).sum().item()).result() == 1 << 16
        if nf4_cpu.available():
            x, weight = torch.randn(8, 64), torch.randn(4096, 64)
            assert engine_thread.submit(nf4_cpu.dense_linear, x, weight).result().shape == (8, 4096)
        assert engine_thread.submit(torch.get_num_threads).result() == 2
    finally:
        engine_thread.close()
    assert torch.get_num_threads() == before


async def test_a_server_steps_its_engine_on_the_engine_thread_while_its_caller_runs_torch_on_one(serving_model):
    """A real server: its steps run on the engine thread with the caller's former count, the caller (the event
    loop's thread) runs torch on one thread while it serves, and gets its count back when it stops."""
    before, seen = torch.get_num_threads(), set()
    async with serving(serving_model) as (app, _):
        step = app.scheduler.engine.step

        def recording_step(batch, between_layers=None):
            seen.add((threading.current_thread().name, torch.get_num_threads()))
            return step(batch, between_layers)

        app.scheduler.engine.step = recording_step
        assert torch.get_num_threads() == 1
        client = AsyncClient(f"127.0.0.1:{app.port}")
        try:
            tokens = [token async for token in client.generate_stream([5, 6, 7], "", max_new_tokens=3,
                                                                       ignore_eos=True)]
        finally:
            await client.close()
    assert len(tokens) == 3
    assert seen == {("loraplex-engine", before)}
    assert torch.get_num_threads() == before
