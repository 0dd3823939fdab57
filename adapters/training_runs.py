"""The record of `serve-train` runs in an adapter store: one JSON line per run in `<store>/.training-runs.jsonl`.

serve-train appends a line when a run ends (process 0 of a torchrun job only), after the version it stored
(if any) is in place, with that version's digest. The server counts the lines for its
`loraplex_training_runs` metric, so runs of a sidecar sharing the store show up without another port, and
registers the newest promoted version of each name (`promoted_versions`), so a version trained without
--server is served by its name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUNS_FILE = ".training-runs.jsonl"
OUTCOMES = ("succeeded", "rejected", "failed", "interrupted")
"""succeeded: stored and promoted (loaded, when a server was named; else for a server on the store to
register); rejected: stored but not promoted (it did not beat the base under --promote-if-better, or the
server refused it); failed: nothing stored; interrupted: stopped with a checkpoint to resume from."""


def record_run(store: Path, name: str, outcome: str, version: str | None = None) -> None:
    """Append one run's outcome and the digest of the version it stored, if any (a single short write, so
    concurrent runs do not interleave lines)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown training outcome {outcome!r}")
    store.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "outcome": outcome, "time": time.time(), **({"version": version} if version else {})}
    line = json.dumps(record) + "\n"
    fd = os.open(store / RUNS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def count_runs(store: Path) -> dict[str, int]:
    """outcome -> runs recorded in `store`."""
    counts: dict[str, int] = {}
    for record in _records(store):
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    return counts


def promoted_versions(store: Path) -> dict[str, str]:
    """name -> digest of the version its latest succeeded run stored (names with one only)."""
    return {record["name"]: record["version"] for record in _records(store)
            if record["outcome"] == "succeeded" and isinstance(record.get("version"), str)}


def _records(store: Path) -> list[dict]:
    """The recorded runs in order, each with a known outcome and a name (unreadable lines are skipped)."""
    try:
        lines = (store / RUNS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("outcome") in OUTCOMES and isinstance(record.get("name"), str):
            records.append(record)
    return records
