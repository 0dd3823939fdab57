"""The record of `serve-train` runs in an adapter store: one JSON line per run in `<store>/.training-runs.jsonl`.

serve-train appends a line when a run ends (process 0 of a torchrun job only); the server counts them for
its `loraplex_training_runs` metric, so runs of a sidecar sharing the store show up without another port.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUNS_FILE = ".training-runs.jsonl"
OUTCOMES = ("succeeded", "rejected", "failed", "interrupted")
"""succeeded: stored (and loaded, when a server was named); rejected: stored but not promoted (it did not
beat the base under --promote-if-better, or the server refused it); failed: nothing stored; interrupted:
stopped with a checkpoint to resume from."""


def record_run(store: Path, name: str, outcome: str) -> None:
    """Append one run's outcome (a single short write, so concurrent runs do not interleave lines)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown training outcome {outcome!r}")
    store.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"name": name, "outcome": outcome, "time": time.time()}) + "\n"
    fd = os.open(store / RUNS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def count_runs(store: Path) -> dict[str, int]:
    """outcome -> runs recorded in `store` (unreadable lines are skipped)."""
    counts: dict[str, int] = {}
    try:
        lines = (store / RUNS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        try:
            outcome = json.loads(line)["outcome"]
        except (ValueError, KeyError, TypeError):
            continue
        if outcome in OUTCOMES:
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts
