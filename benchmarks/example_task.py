"""The example task end to end on the default model: order extraction trained by serve-train on this machine.

    python benchmarks/example_task.py [--quick]

Writes the data with examples/order_extraction/make_data.py, runs the `serve-train` command (QLoRA on the
NF4 SmolLM2 base, the settings below) into a temporary store, and reads the adapter card: held-out exact
match of the base and of the adapter, loss, and the job's wall time (model loading, both evaluations and
training included). Targets: the whole job within 15 minutes on 2 CPU cores, adapter exact match >= 0.8.
Writes benchmarks/results/example_task.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "order_extraction"))
import make_data

RESULTS = Path(__file__).parent / "results" / "example_task.json"
TIME_LIMIT_S = 15 * 60
TARGET_EXACT_MATCH = 0.8
#: serve-train flags for the example (everything else: the defaults, r=16 alpha=32 all-linear dropout 0.05).
TRAIN_FLAGS = ["--epochs", "2", "--learning-rate", "1e-3", "--batch-size", "8", "--eval-max-new-tokens", "48",
               "--checkpoint-every", "1000"]
SIZES = {"full": (400, 60), "quick": (48, 8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few examples (not a measurement)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    train_size, eval_size = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="loraplex-example-") as temp:
        work = Path(temp)
        train_file, eval_file = make_data.write(work / "data", train_size, eval_size, seed=0)
        command = [str(Path(sys.executable).parent / "serve-train"), "--data", str(train_file), "--eval-data",
                   str(eval_file), "--name", "orders", "--store", str(work / "store"), "--work-dir",
                   str(work / "checkpoints"), *TRAIN_FLAGS]
        print(" ".join(["serve-train", *command[1:]]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=os.environ)
        wall = time.perf_counter() - started
        print(done.stdout)
        if done.returncode != 0:
            sys.exit(f"serve-train failed with status {done.returncode}")
        (card_file,) = (work / "store" / "orders").glob("*/adapter_card.json")
        card = json.loads(card_file.read_text())
    base, adapter = card["metrics"]["base"], card["metrics"]["adapter"]
    result = {
        "benchmark": "example_task",
        "task": "examples/order_extraction",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": card["training"]["device"]},
        "config": {"train_examples": train_size, "eval_examples": eval_size, "serve_train_flags": TRAIN_FLAGS,
                   "quick": args.quick},
        "results": {"wall_time_s": round(wall, 1), "steps": card["training"]["steps"],
                    "base": base, "adapter": adapter},
        "targets": {"wall_time_s_max": TIME_LIMIT_S, "adapter_exact_match_min": TARGET_EXACT_MATCH,
                    "met": wall <= TIME_LIMIT_S and adapter["score"] >= TARGET_EXACT_MATCH},
    }
    print(f"{'':<22}{'base':>10}{'adapter':>10}")
    print(f"{'held-out exact match':<22}{base['score']:>10.3f}{adapter['score']:>10.3f}"
          f"   target >= {TARGET_EXACT_MATCH}")
    print(f"{'held-out loss':<22}{base['loss']:>10.4f}{adapter['loss']:>10.4f}")
    print(f"whole job {wall / 60:.1f} min ({card['training']['steps']} steps)   target <= {TIME_LIMIT_S // 60} min")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
