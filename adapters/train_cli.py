"""`serve-train`: train a LoRA on the server's NF4 base, evaluate it, store it, and optionally serve it.

    serve-train --data train.jsonl --name NAME [--eval-data eval.jsonl] [--model PATH]
                [--server HOST:PORT] [--promote-if-better] [--rank 16 --epochs 3 ...]
    serve-train --config train.yaml [--epochs 2 ...]          (YAML or TOML; flags override it)
    torchrun --nproc_per_node=2 -m loraplex.adapters.train_cli --data ... --name ...   (DDP)

The stored version is promoted (unless --promote-if-better and it did not beat the base): loaded into
--server if one is named, else recorded in the store so that a server starting on it serves the version as
NAME. `serve-train --help` and docs/serve-train.md list every setting. Exit status: 0 done, 1 refused or
failed (the message says why; nothing was stored), 2 bad settings, 130 interrupted (a checkpoint was saved:
rerun with --resume).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from pydantic import ValidationError
from pydantic_settings import SettingsError

from loraplex.adapters.train_config import TrainSettings, parse_settings
from loraplex.adapters.trainer import Interrupted, TrainError, TrainResult, train
from loraplex.adapters.training_runs import record_run
from loraplex.server.default_model import loraplex_home


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except (ValidationError, SettingsError) as error:
        print(f"serve-train: invalid settings: {error}", file=sys.stderr)
        return 2
    try:
        result = train(settings)
    except TrainError as error:
        print(f"serve-train: {error}", file=sys.stderr)
        _record(settings, "failed")
        return 1
    except Interrupted as error:
        print(f"serve-train: {error}", file=sys.stderr)
        _record(settings, "interrupted")
        return 130
    if result.stored is None:  # not process 0 of a torchrun job: process 0 reports
        return 0
    print(summary(settings, result))
    status, outcome = promote(settings, result) if settings.server is not None else keep_in_store(settings, result)
    _record(settings, outcome, result.stored.digest)
    return status


def summary(settings: TrainSettings, result: TrainResult) -> str:
    """The readable end of a job: metrics before and after, and where the adapter went."""
    base, adapter = result.base, result.adapter
    return "\n".join([
        f"trained {settings.name}: {result.steps} steps in {result.wall_time_s / 60:.1f} min",
        f"{'held-out':<14}{'base':>10}{'adapter':>10}",
        f"{'loss':<14}{base.loss:>10.4f}{adapter.loss:>10.4f}",
        f"{'perplexity':<14}{base.perplexity:>10.2f}{adapter.perplexity:>10.2f}",
        f"{settings.scorer:<14}{base.score:>10.3f}{adapter.score:>10.3f}",
        f"stored as {settings.name}@{result.stored.digest[:12]} in {result.stored.path}",
    ])


def _record(settings: TrainSettings, outcome: str, version: str | None = None) -> None:
    """Add the run (and the version it stored) to the store's training record (process 0 of a torchrun job
    only)."""
    if os.environ.get("RANK", "0") == "0":
        record_run(_store(settings), settings.name, outcome, version)


def _store(settings: TrainSettings) -> Path:
    return settings.store or loraplex_home() / "adapters"


def _not_better(settings: TrainSettings, result: TrainResult) -> str | None:
    """Why the adapter is not promoted under --promote-if-better (None: promote it)."""
    if settings.promote_if_better and not result.adapter.score > result.base.score:
        return f"the adapter's {settings.scorer} {result.adapter.score:.3f} does not beat the base's " \
               f"{result.base.score:.3f}"
    return None


def keep_in_store(settings: TrainSettings, result: TrainResult) -> tuple[int, str]:
    """No --server: promote the stored version for the servers of the store (the training record says so), or
    not; (exit status, training-run outcome)."""
    reason = _not_better(settings, result)
    if reason is not None:
        print(f"not promoted: {reason}; servers on {_store(settings)} keep their current {settings.name}")
        return 0, "rejected"
    print(f"promoted: servers on {_store(settings)} serve it as {settings.name} (one started later at once, a "
          "running one at its next look at the store)")
    return 0, "succeeded"


def promote(settings: TrainSettings, result: TrainResult) -> tuple[int, str]:
    """Ask the server to load the stored adapter (unless --promote-if-better and it did not beat the base);
    (exit status, training-run outcome)."""
    from loraplex.client.client import Client

    reason = _not_better(settings, result)
    if reason is not None:
        print(f"not loaded into {settings.server}: {reason}")
        return 0, "rejected"
    try:
        with Client(settings.server, api_key=settings.api_key) as client:
            response = client.load_adapter(settings.name, str(result.stored.path))
    except grpc.RpcError as error:
        print(f"serve-train: the server at {settings.server} did not load the adapter: {error.code().name}: "
              f"{error.details()} (it stays in the store at {result.stored.path})", file=sys.stderr)
        return 1, "rejected"
    print(f"loaded into {settings.server} as {settings.name}@{response.adapter.current_version[:12]}")
    return 0, "succeeded"


if __name__ == "__main__":
    sys.exit(main())
