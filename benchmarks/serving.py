"""Serving overhead and latency: the gRPC server under concurrent streams vs the engine alone.

One process: an in-process server (`loraplex.server.app.start`) on loopback with NUM_ADAPTERS
adapters, loaded by asyncio clients that stream NUM_REQUESTS requests spread over the adapters and
the base model. Measured side by side on the same engine:
  (a) engine alone     `Engine.generate` of all requests at once (no transport, no scheduler thread)
  (b) server, all in   every request in flight at once: tokens/s, time to first token, inter-token gaps
  (c) server, limited  at most LIMITED_CONCURRENCY requests in flight (a latency-bound load)
`serving_vs_engine` = (b) tokens/s / (a) tokens/s is what transport + scheduling cost.

    python benchmarks/serving.py          # SmolLM2-135M-Instruct, NF4 (the default model)
    python benchmarks/serving.py --tiny   # a random tiny llama, for a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from engine_throughput import tiny_model, write_adapters

from loraplex.client.client import AsyncClient
from loraplex.server.app import start
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import EngineConfig, SamplingParams
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.settings import load_settings

RESULTS = Path(__file__).parent / "results" / "serving.json"
NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 64
NUM_ADAPTERS = 8
LIMITED_CONCURRENCY = 4


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def run_load(target: str, requests: list[tuple[list[int], str]], concurrency: int) -> dict:
    """Stream every request with at most `concurrency` in flight; latency figures from the client side."""
    gate = asyncio.Semaphore(concurrency)
    async with AsyncClient(target) as client:

        async def one(prompt: list[int], adapter: str) -> tuple[float, list[float]]:
            async with gate:
                start, arrivals = time.perf_counter(), []
                async for _ in client.generate_stream(prompt, adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                    arrivals.append(time.perf_counter())
                return start, arrivals

        began = time.perf_counter()
        results = await asyncio.gather(*(one(p, a) for p, a in requests))
        wall = time.perf_counter() - began
    ttft = [arrivals[0] - start for start, arrivals in results]
    gaps = [b - a for _, arrivals in results for a, b in itertools.pairwise(arrivals)]
    return {
        "concurrency": concurrency, "wall_s": wall,
        "tokens_per_s": sum(len(arrivals) for _, arrivals in results) / wall,
        "ttft_p50_s": quantile(ttft, 0.5), "ttft_p95_s": quantile(ttft, 0.95),
        "inter_token_p50_s": quantile(gaps, 0.5), "inter_token_p95_s": quantile(gaps, 0.95),
    }


async def benchmark(base_folder: Path, adapters: dict[str, Path], device: str) -> dict:
    settings = load_settings(model=base_folder, adapter=adapters, port=0, reflection=False,
                             engine=EngineConfig(device=device, num_slots=NUM_ADAPTERS, max_rank=16,
                                                 kv_cache_bytes=2**30),
                             scheduler={"max_running": NUM_REQUESTS, "max_step_tokens": 2048})
    app = await start(settings)
    try:
        engine, target = app.scheduler.engine, f"127.0.0.1:{app.port}"
        names = ["", *adapters]
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(100, engine.spec.vocab_size, (NUM_REQUESTS, PROMPT_LEN), generator=generator).tolist()
        requests = [(prompt, names[i % len(names)]) for i, prompt in enumerate(prompts)]
        await run_load(target, requests[:len(names)], len(names))  # warm-up: every adapter, every shape once
        # (a) runs while the scheduler thread is idle, so the engine has one user at a time
        slots = [NO_ADAPTER if a == "" else names.index(a) - 1 for _, a in requests]
        began = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), slots,
                        max_step_tokens=settings.scheduler.max_step_tokens)
        alone = {"wall_s": time.perf_counter() - began}
        alone["tokens_per_s"] = NUM_REQUESTS * NEW_TOKENS / alone["wall_s"]
        modes = {"a_engine_alone": alone, "b_server_all_in": await run_load(target, requests, NUM_REQUESTS),
                 "c_server_limited": await run_load(target, requests, LIMITED_CONCURRENCY)}
        return {"lora_impl": engine.lora_impl, "dtype": str(engine.dtype), "modes": modes,
                "serving_vs_engine": modes["b_server_all_in"]["tokens_per_s"] / alone["tokens_per_s"]}
    finally:
        await app.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random tiny llama instead of SmolLM2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="loraplex-serving-bench-"))
    base_folder = tiny_model(workdir / "base") if args.tiny else default_model_path()
    folders = write_adapters(base_folder, workdir / "adapters", [16] * NUM_ADAPTERS)
    result = asyncio.run(benchmark(base_folder, {f.name: f for f in folders}, args.device))

    print(f"\nmodel: {'tiny llama' if args.tiny else 'SmolLM2-135M-Instruct'}  device: {args.device}  "
          f"lora: {result['lora_impl']}  threads: {torch.get_num_threads()}")
    print(f"{NUM_REQUESTS} requests x {PROMPT_LEN} prompt + {NEW_TOKENS} new tokens over the base and "
          f"{NUM_ADAPTERS} r=16 adapters")
    print(f"{'mode':<18}{'tokens/s':>10}{'TTFT p50/p95 ms':>18}{'gap p50/p95 ms':>17}")
    for mode, r in result["modes"].items():
        ttft = f"{r['ttft_p50_s'] * 1e3:.0f}/{r['ttft_p95_s'] * 1e3:.0f}" if "ttft_p50_s" in r else "-"
        gap = f"{r['inter_token_p50_s'] * 1e3:.1f}/{r['inter_token_p95_s'] * 1e3:.1f}" if "ttft_p50_s" in r else "-"
        print(f"{mode:<18}{r['tokens_per_s']:>10.1f}{ttft:>18}{gap:>17}")
    print(f"serving_vs_engine {result['serving_vs_engine']:.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "device": args.device,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "requests": NUM_REQUESTS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "adapters": NUM_ADAPTERS,
        **result,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
