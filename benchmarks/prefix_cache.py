"""Prefix caching on SmolLM2: shared system prompts prefilled once, and what the bookkeeping costs without them.

Two in-process servers (`loraplex.server.app.start`) on loopback, identical but for `engine.prefix_cache`
(on / off), hold 8 PEFT adapters (r=8 on q_proj and v_proj). Two traces are replayed over gRPC, each request
streamed at its arrival time (serving.py's `run_grpc`):
  - shared: each of the 8 adapters has its own SYSTEM_LEN-token system prompt; every request is its
    adapter's system prompt plus NEW_LENS new prompt tokens (uniform), OUTPUT_LEN tokens out, Poisson
    arrivals at SHARED_RATE/s (between the two servers' capacities: without the cache every request
    prefills ~640 tokens and the queue grows; with it, ~40). One run per server.
  - no_shared: random prompts of NO_SHARED_LENS tokens that share nothing, all arriving at once (the
    server's capacity: throughput measures the whole cost of keying, registering and looking up
    blocks that are never reused), NO_SHARED_REPEATS alternating runs per server.

    python benchmarks/prefix_cache.py          # SmolLM2-135M-Instruct, NF4 (the default model)
    python benchmarks/prefix_cache.py --tiny   # a random tiny llama (512 positions: 400-token system prompts)

Writes benchmarks/results/prefix_cache.json: `ratios.ttft_p50_cache_vs_none` (shared trace, TTFT p50 with the
cache over without; target <= 0.25), `ratios.throughput_cache_vs_none` (shared trace, tokens/s; target >= 1.5)
and `ratios.no_shared_cache_vs_none` (no_shared trace, summed tokens/s on over off; target >= 0.97).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from engine_throughput import tiny_model, write_adapters
from serving import TraceRequest, run_grpc

from loraplex.server.app import App, start
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import AdapterSettings, load_settings

RESULTS = Path(__file__).parent / "results" / "prefix_cache.json"
NUM_ADAPTERS, RANK, TARGETS = 8, 8, ("q_proj", "v_proj")
SYSTEM_LEN, TINY_SYSTEM_LEN, NEW_LENS, OUTPUT_LEN = 600, 400, (20, 60), 16
SHARED_REQUESTS, SHARED_RATE = 48, 1.5  # requests, requests/s
NO_SHARED_REQUESTS, NO_SHARED_LENS, NO_SHARED_REPEATS = 32, (64, 192), 2
MAX_RUNNING, MAX_STEP_TOKENS = 32, 512


def shared_trace(vocab_size: int, names: list[str], system_len: int, seed: int = 0
                 ) -> tuple[list[TraceRequest], list[str]]:
    """Requests on each adapter's own system prompt plus a few new tokens, round the adapters, Poisson arrivals."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(100, vocab_size, system_len).tolist() for _ in names]
    arrivals = np.cumsum(rng.exponential(1.0 / SHARED_RATE, SHARED_REQUESTS))
    trace, adapters = [], []
    for i, arrival in enumerate(arrivals - arrivals[0]):
        new = rng.integers(100, vocab_size, int(rng.integers(NEW_LENS[0], NEW_LENS[1] + 1))).tolist()
        trace.append(TraceRequest(float(arrival), systems[i % len(names)] + new, OUTPUT_LEN))
        adapters.append(names[i % len(names)])
    return trace, adapters


def no_shared_trace(vocab_size: int, names: list[str], seed: int = 1) -> tuple[list[TraceRequest], list[str]]:
    """Random prompts that share no block, all at once, round the adapters."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(NO_SHARED_LENS[0], NO_SHARED_LENS[1] + 1, NO_SHARED_REQUESTS)
    trace = [TraceRequest(0.0, rng.integers(100, vocab_size, int(n)).tolist(), OUTPUT_LEN) for n in lens]
    return trace, [names[i % len(names)] for i in range(NO_SHARED_REQUESTS)]


def hits(app: App) -> int:
    """Prompt tokens the server's prefix cache held so far (its metrics)."""
    return int(sum(sample.value for metric in app.metrics.prefix_cache_hits.collect() for sample in metric.samples
                   if sample.name.endswith("_total")))


async def benchmark(base_folder: Path, adapters: dict[str, Path], device: str, workdir: Path,
                    system_len: int) -> dict:
    def settings(prefix_cache: bool):
        return load_settings(model=base_folder, adapter=adapters, host="127.0.0.1", port=0, http_port=None,
                             reflection=False, adapters=AdapterSettings(store=workdir / f"store-{prefix_cache}"),
                             engine=EngineConfig(device=device, num_slots=len(adapters), max_rank=RANK,
                                                 kv_cache_bytes=2**30, prefix_cache=prefix_cache),
                             scheduler={"max_running": MAX_RUNNING, "max_step_tokens": MAX_STEP_TOKENS,
                                        "max_waiting": SHARED_REQUESTS})

    servers = {"cache": await start(settings(True)), "none": await start(settings(False))}
    try:
        names = list(adapters)
        vocab = servers["cache"].scheduler.engine.spec.vocab_size
        warm = [TraceRequest(0.0, list(range(100, 108)), 2)] * len(names)  # every adapter into its slot
        for app in servers.values():
            await run_grpc(f"127.0.0.1:{app.port}", warm, names)
        result: dict = {"shared": {}, "no_shared": {label: [] for label in servers}}
        trace, trace_adapters = shared_trace(vocab, names, system_len)
        for label, app in servers.items():
            before = hits(app)
            run = await run_grpc(f"127.0.0.1:{app.port}", trace, trace_adapters)
            result["shared"][label] = {**run, "cached_prompt_tokens": hits(app) - before}
            print(f"shared {label}: {run['tokens_per_s']:.1f} tokens/s, TTFT p50 {run['ttft_p50_s'] * 1e3:.0f} ms",
                  flush=True)
        for repeat in range(NO_SHARED_REPEATS):
            trace, trace_adapters = no_shared_trace(vocab, names, seed=1 + repeat)  # new prompts: nothing to reuse
            for label, app in servers.items():
                run = await run_grpc(f"127.0.0.1:{app.port}", trace, trace_adapters)
                result["no_shared"][label].append(run)
                print(f"no_shared {label}: {run['tokens_per_s']:.1f} tokens/s", flush=True)
        return result
    finally:
        for app in servers.values():
            await app.stop(0)


def ratios_of(result: dict) -> dict[str, float]:
    shared, no_shared = result["shared"], result["no_shared"]

    def total(label: str) -> float:
        return sum(run["tokens_per_s"] for run in no_shared[label])

    return {
        "ttft_p50_cache_vs_none": shared["cache"]["ttft_p50_s"] / shared["none"]["ttft_p50_s"],
        "throughput_cache_vs_none": shared["cache"]["tokens_per_s"] / shared["none"]["tokens_per_s"],
        "no_shared_cache_vs_none": total("cache") / total("none"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random tiny llama instead of SmolLM2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-prefix-bench-"))
    base_folder = tiny_model(workdir / "base") if args.tiny else default_model_path()
    folders = write_adapters(base_folder, workdir / "adapters", [RANK] * NUM_ADAPTERS, TARGETS)
    system_len = TINY_SYSTEM_LEN if args.tiny else SYSTEM_LEN
    result = asyncio.run(benchmark(base_folder, {f.name: f for f in folders}, args.device, workdir, system_len))
    ratios = ratios_of(result)

    print(f"\nmodel: {'tiny llama' if args.tiny else 'SmolLM2-135M-Instruct'}  device: {args.device}  "
          f"threads: {torch.get_num_threads()}")
    print(f"shared: {SHARED_REQUESTS} requests, Poisson {SHARED_RATE}/s, {NUM_ADAPTERS} adapters x {system_len}-token "
          f"system prompt + U{NEW_LENS} new tokens, {OUTPUT_LEN} out; no_shared: {NO_SHARED_REQUESTS} requests at "
          f"once, U{NO_SHARED_LENS} prompts, x{NO_SHARED_REPEATS}")
    print(f"{'run':<16}{'tokens/s':>10}{'TTFT p50/p99 ms':>20}{'ITL p50 ms':>12}{'cached tokens':>15}")
    for label, run in result["shared"].items():
        print(f"{'shared ' + label:<16}{run['tokens_per_s']:>10.1f}{run['ttft_p50_s'] * 1e3:>11.0f}/"
              f"{run['ttft_p99_s'] * 1e3:<8.0f}{run['itl_p50_s'] * 1e3:>12.1f}{run['cached_prompt_tokens']:>15}")
    for label, runs in result["no_shared"].items():
        rates = "/".join(f"{run['tokens_per_s']:.1f}" for run in runs)
        print(f"{'no_shared ' + label:<16}{rates:>10}")
    for name, value in ratios.items():
        print(f"  {name:<26}{value:6.3f}")
    print(f"total {time.perf_counter() - began:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "device": args.device,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "trace": {"adapters": NUM_ADAPTERS, "rank": RANK, "targets": TARGETS, "system_len": system_len,
                  "new_lens": NEW_LENS, "output_len": OUTPUT_LEN, "shared_requests": SHARED_REQUESTS,
                  "shared_rate_per_s": SHARED_RATE, "no_shared_requests": NO_SHARED_REQUESTS,
                  "no_shared_lens": NO_SHARED_LENS, "no_shared_repeats": NO_SHARED_REPEATS,
                  "max_running": MAX_RUNNING, "max_step_tokens": MAX_STEP_TOKENS},
        "ratios": ratios, **result,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
