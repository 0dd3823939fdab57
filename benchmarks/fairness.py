"""Multi-tenant fairness: a flooding tenant next to a light one, token shares under weights, and what fairness costs.

In-process servers (`loraplex.server.app.start`, one at a time: server/core/engine_thread.py says why) on
loopback, identical but for `scheduler.fairness` (on / off), serve two tenants, API keys "a" and "b", each on its
own PEFT adapter (r=8 on q_proj and v_proj). Every request has a prompt of PROMPT_LENS tokens (uniform) and
generates OUTPUT_LEN tokens (ignore_eos). The clients run in a second process (as remote users would, so their
parsing does not hold the server's GIL) and stream over gRPC, timing every token (run lengths: FULL, or TINY with
--tiny):
  - alone: tenant b sends one request per second (open loop) for `alone_s` seconds, nothing else runs;
  - flood: tenant a runs FLOOD_CLIENTS clients back to back (closed loop) for `flood_s` seconds while b sends one
    request per second, weights 1:1; `flood_repeats` runs with fairness on and off, alternating, the first of
    each pair alternating too (every server started for a run is warmed by a WARMUP_S flood first);
  - share 1:1 and share 3:1: both tenants run SHARE_CLIENTS clients back to back for `share_s` seconds on the
    fairness-on server, with weights 1:1 and then a:b = 3:1 (put in force while the server runs), and at 3:1 on
    the fairness-off server for comparison (weights unused there: round-robin across the adapters). Both are
    backlogged throughout (2 x SHARE_CLIENTS > MAX_RUNNING), and tokens served (prompt tokens at the first
    token, then each generated token) are counted per tenant within the window SHARE_WINDOW of the run.

    python benchmarks/fairness.py          # SmolLM2-135M-Instruct, NF4 (the default model)
    python benchmarks/fairness.py --tiny   # a random tiny llama and short runs, for a quick check

Writes benchmarks/results/fairness.json: `ratios.ttft_p99_flood_vs_alone` (b's TTFT p99 under the flood, fairness
on, over alone; target <= 2), `ratios.share_vs_weight_1to1` and `ratios.share_vs_weight_3to1` (tenant b's share
of the tokens served over its share of the weights, 1.0 exact; target within [0.9, 1.1]) and
`ratios.throughput_fair_vs_off` (generated tokens/s of the flood runs from FLOOD_WINDOW of each to its end,
fairness on over off; target >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from engine_throughput import tiny_model, write_adapters

from loraplex.client.client import AsyncClient
from loraplex.server.app import App, start
from loraplex.server.core.auth import ApiKey
from loraplex.server.core.quota_config import QuotaSettings
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import AdapterSettings, load_settings

RESULTS = Path(__file__).parent / "results" / "fairness.json"
TENANTS = ("a", "b")
"""API key names (and secrets): each is a tenant of its own."""
RANK, TARGETS = 8, ("q_proj", "v_proj")
PROMPT_LENS, OUTPUT_LEN = (32, 96), 32
MAX_RUNNING, MAX_STEP_TOKENS = 32, 512
FLOOD_CLIENTS, SHARE_CLIENTS = 16, 48
B_RATE = 1.0  # requests/s
SHARE_WINDOW = (0.25, 0.9)
"""Fractions of a share run between which tokens are counted (after the queues fill, before clients stop)."""
FLOOD_WINDOW = 0.1
"""Throughput of a flood run counts tokens from this fraction of it to its end (the clients' last start)."""
WARMUP_S = 3.0
"""A short flood on each server before anything is measured."""
FULL = {"alone_s": 15.0, "flood_s": 30.0, "flood_repeats": 3, "share_s": 40.0}
TINY = {"alone_s": 5.0, "flood_s": 8.0, "flood_repeats": 1, "share_s": 8.0}


@dataclass(frozen=True)
class Load:
    """What one tenant sends in a run: `clients` back to back (closed loop), or one request every 1/rate s."""

    tenant: str
    adapter: str
    clients: int = 0
    rate: float = 0.0


def run_loads(target: str, loads: list[Load], duration_s: float, vocab_size: int, seed: int,
              drain: bool = True) -> list[dict]:
    """In the client process: run `loads` for `duration_s`, then let the requests in flight finish (`drain`) or
    cancel them; one record per request started: tenant, start, prompt_tokens, token arrival times (seconds
    from the run's start, this process's clock; those received before a cancel)."""
    return asyncio.run(_run_loads(target, loads, duration_s, vocab_size, seed, drain))


async def _run_loads(target: str, loads: list[Load], duration_s: float, vocab_size: int, seed: int,
                     drain: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    clients = {load.tenant: AsyncClient(target, api_key=load.tenant) for load in loads}
    began = time.perf_counter()

    async def one(load: Load) -> None:
        prompt = rng.integers(100, vocab_size, int(rng.integers(PROMPT_LENS[0], PROMPT_LENS[1] + 1))).tolist()
        record = {"tenant": load.tenant, "start": time.perf_counter() - began, "prompt_tokens": len(prompt),
                  "tokens": []}
        records.append(record)
        async for _ in clients[load.tenant].generate_stream(prompt, load.adapter, max_new_tokens=OUTPUT_LEN,
                                                           ignore_eos=True):
            record["tokens"].append(time.perf_counter() - began)

    async def closed_loop(load: Load) -> None:
        while time.perf_counter() - began < duration_s:
            await one(load)

    async def open_loop(load: Load) -> None:
        tasks, count = [], int(duration_s * load.rate)
        for i in range(count):
            await asyncio.sleep(max(0.0, began + i / load.rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(load)))
        await asyncio.gather(*tasks)

    work = asyncio.gather(*(closed_loop(load) for load in loads for _ in range(load.clients)),
                          *(open_loop(load) for load in loads if load.rate))
    try:
        if drain:
            await work
        else:
            await asyncio.wait([work], timeout=duration_s)
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    finally:
        for client in clients.values():
            await client.close()
    return [record for record in records if record["tokens"]]


def ttft_p99(records: list[dict], tenant: str) -> float:
    return float(np.percentile([r["tokens"][0] - r["start"] for r in records if r["tenant"] == tenant], 99))


def throughput(records: list[dict], low: float, high: float) -> float:
    """Generated tokens per second within [low, high] s (while the flood runs: no ramp, no tail)."""
    return sum(low <= t <= high for r in records for t in r["tokens"]) / (high - low)


def served_in(records: list[dict], low: float, high: float) -> dict[str, int]:
    """Tokens served per tenant within [low, high] s: prompt tokens at the first token, each generated token."""
    served = dict.fromkeys(TENANTS, 0)
    for r in records:
        served[r["tenant"]] += sum(low <= t <= high for t in r["tokens"])
        served[r["tenant"]] += r["prompt_tokens"] if low <= r["tokens"][0] <= high else 0
    return served


async def benchmark(base_folder: Path, adapters: dict[str, Path], device: str, workdir: Path,
                    clients: ProcessPoolExecutor, sizes: dict) -> dict:
    def settings(fairness: bool):
        return load_settings(model=base_folder, adapter=adapters, host="127.0.0.1", port=0, http_port=None,
                             reflection=False, adapters=AdapterSettings(store=workdir / f"store-{fairness}"),
                             api_keys=[ApiKey(name=name, sha256=hashlib.sha256(name.encode()).hexdigest())
                                       for name in TENANTS],
                             engine=EngineConfig(device=device, num_slots=len(adapters), max_rank=RANK,
                                                 kv_cache_bytes=2**30),
                             scheduler={"max_running": MAX_RUNNING, "max_step_tokens": MAX_STEP_TOKENS,
                                        "fairness": fairness})

    loop = asyncio.get_running_loop()
    seeds = itertools.count()
    flood = [Load("a", "adapter-a", clients=FLOOD_CLIENTS), Load("b", "adapter-b", rate=B_RATE)]

    async def run(app: App, loads: list[Load], duration_s: float, drain: bool = True) -> list[dict]:
        vocab = app.scheduler.engine.spec.vocab_size
        return await loop.run_in_executor(clients, run_loads, f"127.0.0.1:{app.port}", loads, duration_s, vocab,
                                          next(seeds), drain)

    @contextlib.asynccontextmanager
    async def server(fairness: bool):
        """One server at a time, warmed (kernels, allocator, batch shapes, both adapters into their slots): each
        holds torch's thread team while it lives (server/core/engine_thread.py), and two would slow both."""
        app = await start(settings(fairness))
        try:
            await run(app, flood, WARMUP_S)
            yield app
        finally:
            await app.stop(0)

    async with server(True) as app:
        alone = await run(app, [Load("b", "adapter-b", rate=B_RATE)], sizes["alone_s"])
    print(f"alone: b TTFT p99 {ttft_p99(alone, 'b') * 1e3:.0f} ms", flush=True)
    floods: dict[str, list[dict]] = {"on": [], "off": []}
    for repeat in range(sizes["flood_repeats"]):
        order = ["on", "off"]
        for label in order if repeat % 2 == 0 else reversed(order):  # neither always runs first
            async with server(label == "on") as app:
                records = await run(app, flood, sizes["flood_s"])
            rate = throughput(records, FLOOD_WINDOW * sizes["flood_s"], sizes["flood_s"])
            floods[label].append({"b_ttft_p99_s": ttft_p99(records, "b"), "tokens_per_s": rate,
                                  "a_requests": sum(r["tenant"] == "a" for r in records),
                                  "b_requests": sum(r["tenant"] == "b" for r in records)})
            print(f"flood fairness {label}: b TTFT p99 {floods[label][-1]['b_ttft_p99_s'] * 1e3:.0f} ms, "
                  f"{floods[label][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    shares = {}
    for fairness, runs in ((True, (("1to1", 1.0), ("3to1", 3.0))), (False, (("3to1_fairness_off", 3.0),))):
        async with server(fairness) as app:
            for label, weight_a in runs:
                app.scheduler.set_quotas(QuotaSettings.model_validate({"tenants": {"a": {"weight": weight_a}}}))
                records = await run(app, [Load("a", "adapter-a", clients=SHARE_CLIENTS),
                                          Load("b", "adapter-b", clients=SHARE_CLIENTS)], sizes["share_s"],
                                    drain=False)  # the window ends before: cancel what still runs
                window = [fraction * sizes["share_s"] for fraction in SHARE_WINDOW]
                served = served_in(records, *window)
                b_share = served["b"] / sum(served.values())
                shares[label] = {"weight_a": weight_a, "window_s": window, "served_tokens": served,
                                 "b_share": b_share, "b_share_vs_weight": b_share / (1.0 / (1.0 + weight_a)),
                                 "a_share_vs_weight": (1.0 - b_share) / (weight_a / (1.0 + weight_a))}
                print(f"share {label}: served {served}, b's share {b_share:.3f}", flush=True)
    return {"alone": {"b_ttft_p99_s": ttft_p99(alone, "b"), "b_requests": len(alone)}, "flood": floods,
            "share": shares}


def ratios_of(result: dict) -> dict[str, float]:
    floods = result["flood"]
    return {
        "ttft_p99_flood_vs_alone": max(run["b_ttft_p99_s"] for run in floods["on"]) / result["alone"]["b_ttft_p99_s"],
        "share_vs_weight_1to1": result["share"]["1to1"]["b_share_vs_weight"],
        "share_vs_weight_3to1": result["share"]["3to1"]["b_share_vs_weight"],
        "throughput_fair_vs_off": sum(run["tokens_per_s"] for run in floods["on"])
        / sum(run["tokens_per_s"] for run in floods["off"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random tiny llama and short runs instead of SmolLM2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-fairness-bench-"))
    with ThreadPoolExecutor(1) as preparing:  # torch's thread team of this thread ends with it (engine_thread.py)
        base_folder = preparing.submit(tiny_model, workdir / "base") if args.tiny else preparing.submit(
            default_model_path)
        base_folder = base_folder.result()
        folders = preparing.submit(write_adapters, base_folder, workdir / "adapters", [RANK] * len(TENANTS),
                                   TARGETS).result()
    adapters = {f"adapter-{tenant}": folder for tenant, folder in zip(TENANTS, folders, strict=True)}
    sizes = TINY if args.tiny else FULL
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        result = asyncio.run(benchmark(base_folder, adapters, args.device, workdir, clients, sizes))
    ratios = ratios_of(result)

    print(f"\nmodel: {'tiny llama' if args.tiny else 'SmolLM2-135M-Instruct'}  device: {args.device}  "
          f"threads: {torch.get_num_threads()}")
    print(f"prompts U{PROMPT_LENS}, {OUTPUT_LEN} tokens out; flood: {FLOOD_CLIENTS} clients of a back to back + b at "
          f"{B_RATE}/s for {sizes['flood_s']:.0f} s (x{sizes['flood_repeats']}); shares: {SHARE_CLIENTS} clients each "
          f"for {sizes['share_s']:.0f} s; max_running {MAX_RUNNING}")
    print(f"{'run':<22}{'b TTFT p99 ms':>15}{'tokens/s':>10}")
    print(f"{'alone':<22}{result['alone']['b_ttft_p99_s'] * 1e3:>15.0f}{'':>10}")
    for label, runs in result["flood"].items():
        for run in runs:
            print(f"{'flood fairness ' + label:<22}{run['b_ttft_p99_s'] * 1e3:>15.0f}{run['tokens_per_s']:>10.1f}")
    for label, share in result["share"].items():
        print(f"{'share ' + label:<24}b's share of the tokens served {share['b_share']:.3f}, of the weights "
              f"{1.0 / (1.0 + share['weight_a']):.3f}")
    for name, value in ratios.items():
        print(f"  {name:<26}{value:6.3f}")
    print(f"total {time.perf_counter() - began:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "device": args.device,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "trace": {"prompt_lens": PROMPT_LENS, "output_len": OUTPUT_LEN, "flood_clients": FLOOD_CLIENTS,
                  "share_clients": SHARE_CLIENTS, "b_rate_per_s": B_RATE, "max_running": MAX_RUNNING,
                  "max_step_tokens": MAX_STEP_TOKENS, "share_window": SHARE_WINDOW, "flood_window": FLOOD_WINDOW,
                  **sizes},
        "ratios": ratios, **result,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
