"""A normal start prints no dependency's warning: `loraplex serve` and `serve-train` as subprocesses, their stderr
read line by line; and the one bitsandbytes message loraplex filters (server/logs.py), dropped exactly.

bitsandbytes logs its kernel-hub warning only on CPUs with AVX512-BF16, so on other machines the subprocess
tests pass without it being emitted; the filter test below logs the message itself and runs everywhere."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from loraplex.server.logs import BNB_CPU_LOGGER, BNB_KERNEL_HUB_WARNING
from serving_support import TEST_ENGINE

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
OWN_LOG_LINE = re.compile(r"\S+ \S+ [A-Z]+ loraplex(\.[\w.]+)? \[")
"""A line logged by a loraplex logger (server/logs.py's text format)."""


def foreign_lines(stderr: str) -> list[str]:
    """stderr lines that are not loraplex's own log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not OWN_LOG_LINE.match(line)]


def test_loraplex_serve_starts_and_stops_printing_only_its_own_log_lines(serving_model, tmp_path):
    base, adapters = serving_model
    name, folder = next(iter(adapters.items()))
    args = [str(BIN / "loraplex"), "serve", "--model", str(base), "--adapter", f"{name}={folder}", "--port", "0",
            "--http_port", "0", "--adapters.store", str(tmp_path / "store"), "--log_level", "info"]
    args += [f"--engine.{key}={value}" for key, value in TEST_ENGINE.items()]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)
    try:
        started = process.stdout.readline()
        assert started.startswith("loraplex serving base"), (started, log.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "stopped" in text  # its own log lines are there ...
    assert foreign_lines(text) == []  # ... and nothing else


def test_serve_train_refusing_its_settings_prints_only_why(tmp_path):
    """serve-train imports the whole training stack (peft, transformers, bitsandbytes) before it parses."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    done = subprocess.run([str(BIN / "serve-train"), "--data", str(data), "--name", "x", "--rank", "0"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("serve-train: invalid settings: ") and "rank" in done.stderr, done.stderr
    assert BNB_KERNEL_HUB_WARNING not in done.stderr


def test_the_filter_drops_bitsandbytes_kernel_hub_warning_and_nothing_else(caplog):
    import loraplex.server  # noqa: F401  (installs the filter)

    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(f"{BNB_KERNEL_HUB_WARNING}: %s. Please make sure you already `pip install kernels`", "why")
        logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]


def test_the_filtered_message_is_the_one_the_installed_bitsandbytes_logs():
    """A bitsandbytes release that rewords it would bring the warning back: this says so."""
    source = Path(importlib.util.find_spec(BNB_CPU_LOGGER).origin).read_text()
    assert f'"{BNB_KERNEL_HUB_WARNING}: %s.' in source
