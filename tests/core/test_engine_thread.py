"""The engine thread: one thread of a server runs torch's parallel work, every other thread torch on one thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from loraplex.server.core.engine_thread import EngineThread


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
    """The engine thread keeps its count; the caller and threads started later run torch on one thread, and close
    gives the caller its count back. (Whether torch then stays fast is a benchmark's question, not a test's.)"""
    before = torch.get_num_threads()
    engine_thread = EngineThread(threads=2)
    try:
        engine_thread.others_single_threaded()
        assert torch.get_num_threads() == 1
        assert engine_thread.submit(torch.get_num_threads).result() == 2
        with ThreadPoolExecutor(1) as helper:  # a thread started afterwards, as the adapter loaders are
            assert helper.submit(torch.get_num_threads).result() == 1
        assert engine_thread.submit(lambda: torch.ones(1 << 16).sum().item()).result() == 1 << 16
        assert engine_thread.submit(torch.get_num_threads).result() == 2
    finally:
        engine_thread.close()
    assert torch.get_num_threads() == before
