"""Serving under an S-LoRA-style load: throughput and latency over gRPC for N = 0, 8 and 100 adapters,
the OpenAI-style HTTP API vs gRPC, and the gRPC path vs the engine driven directly on the same requests.

One process, one engine. An in-process server (`loraplex.server.app.start`) on loopback holds 100
PEFT adapters (r=8 on q_proj and v_proj: the LoRA arithmetic is small, so the comparison measures
the scheduler and adapter management). One trace of NUM_REQUESTS requests (seeded) is replayed per N, each replay
with prompts of its own (same lengths: `FreshPrompts`, or the prefix cache would serve the repeats):
  - arrivals: a Poisson process of ARRIVAL_RATE requests/s;
  - prompt and output lengths: uniform over PROMPT_LENS and OUTPUT_LENS (output forced, ignore_eos);
  - adapters: Zipf(ZIPF_ALPHA) popularity over N adapters (N = 0: every request on the base model).
Each N runs three times on the same engine: (grpc) an asyncio client streams every request at its arrival
time; (http) the same through the HTTP API with the official openai SDK (streamed completions, one
server-sent event per token) -- both clients run in a second process, as remote users would, so their
own parsing does not hold the server's GIL; (direct) `Engine.step` driven on the engine thread, admitting the same
requests at the same times under the same caps (MAX_RUNNING sequences, MAX_STEP_TOKENS per step, decodes first), with no
transport and no scheduler thread. Reported per run: tokens/s and requests/s over the makespan
(first arrival to last token), time to first token and inter-token latency p50/p99.

Sizes: on 2 CPU cores SmolLM2-135M decodes about 120-150 tokens/s in batches of 32 and prefills
about 500 tokens/s, so 96 requests of mean 72 prompt + 56 output tokens take about a minute per run;
ARRIVAL_RATE 4/s (96 requests arrive within ~24 s) exceeds that capacity (~1.6 requests/s), so the
queue builds up and throughput measures the server's capacity (TTFT includes the queueing). Thirteen runs
plus set-up (writing 100 adapters, loading two servers, warm-up) take about 20 minutes.

    python benchmarks/serving.py          # SmolLM2-135M-Instruct, NF4 (the default model)
    python benchmarks/serving.py --tiny   # a random tiny llama, for a quick check

Writes benchmarks/results/serving.json: `ratios.n100_vs_n0` (gRPC tokens/s, N=100 over N=0; target
>= 0.85), `ratios.grpc_vs_direct` (the lowest over N of gRPC tokens/s over direct; target >= 0.9) and
`ratios.http_vs_grpc` (the lowest over N of HTTP tokens/s over gRPC; target >= 0.9; ITL p99 ratios too) and
`ratios.metrics_on_vs_off` (gRPC tokens/s on the N=8 trace with Prometheus metrics on over off, two
alternating runs each on two otherwise identical servers; target >= 0.97) and
`ratios.fused_vs_bitsandbytes_n8` (gRPC tokens/s on the N=8 trace with `engine.nf4_kernel` auto, i.e. the
fused kernel, over `bitsandbytes`, two alternating runs each on two otherwise identical servers;
target >= 1.8). `--only-kernels` runs just that comparison (about 8 minutes) and writes
benchmarks/results/serving_nf4_kernels.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import tempfile
import time
from collections import deque
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import torch
from engine_throughput import tiny_model, write_adapters

from loraplex.adapters.reference import AdapterReference
from loraplex.client.client import AsyncClient
from loraplex.server.app import App, start
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.engine_thread import EngineThread
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import Engine, EngineConfig, SamplingParams, SequenceState
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.settings import AdapterSettings, Settings, load_settings

RESULTS = Path(__file__).parent / "results" / "serving.json"
KERNELS_RESULTS = RESULTS.with_name("serving_nf4_kernels.json")
NUM_REQUESTS = 96
ARRIVAL_RATE = 4.0  # requests/s
PROMPT_LENS, OUTPUT_LENS = (16, 128), (16, 96)  # uniform, inclusive
ZIPF_ALPHA = 1.0
ADAPTER_COUNTS = (0, 8, 100)
RANK, TARGETS = 8, ("q_proj", "v_proj")
MAX_RUNNING, MAX_STEP_TOKENS = 32, 512
PATHS = ("grpc", "http", "direct")
METRICS_REPEATS = 2
KERNEL_REPEATS = 2


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt: list[int]
    output_len: int


def make_trace(vocab_size: int, num_requests: int, seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals, uniform prompt/output lengths, random prompt tokens (ids >= 100: no specials)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / ARRIVAL_RATE, num_requests))
    arrivals -= arrivals[0]
    prompt_lens = rng.integers(PROMPT_LENS[0], PROMPT_LENS[1] + 1, num_requests)
    output_lens = rng.integers(OUTPUT_LENS[0], OUTPUT_LENS[1] + 1, num_requests)
    return [TraceRequest(float(t), rng.integers(100, vocab_size, int(p)).tolist(), int(o))
            for t, p, o in zip(arrivals, prompt_lens, output_lens, strict=True)]


class FreshPrompts:
    """Each call: the trace with prompts no earlier call gave (same arrivals, lengths and outputs). The servers keep a
    prefix cache (engine.prefix_cache, on by default), so a second replay of the same prompts would measure its
    hits instead of the prefill: every replay and warm-up takes its prompts from here."""

    def __init__(self, vocab_size: int, seed: int = 1_000) -> None:
        self._vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)

    def __call__(self, trace: list[TraceRequest]) -> list[TraceRequest]:
        return [TraceRequest(r.arrival_s, self._rng.integers(100, self._vocab_size, len(r.prompt)).tolist(),
                             r.output_len) for r in trace]


def zipf_adapters(num_adapters: int, num_requests: int, seed: int = 1) -> list[int]:
    """Per request an adapter index in [0, num_adapters), P(i) ~ 1/(i+1)^ZIPF_ALPHA; -1 (the base) when 0."""
    if num_adapters == 0:
        return [NO_ADAPTER] * num_requests
    weights = 1.0 / np.arange(1, num_adapters + 1) ** ZIPF_ALPHA
    return np.random.default_rng(seed).choice(num_adapters, num_requests, p=weights / weights.sum()).tolist()


def summarize(trace: list[TraceRequest], starts: list[float], arrivals: list[list[float]]) -> dict:
    """Throughput over the makespan, TTFT and inter-token percentiles; times in seconds on one clock."""
    makespan = max(a[-1] for a in arrivals) - min(starts)
    ttft = [a[0] - s for s, a in zip(starts, arrivals, strict=True)]
    gaps = np.concatenate([np.diff(a) for a in arrivals])
    tokens = sum(len(a) for a in arrivals)
    assert tokens == sum(r.output_len for r in trace), "every request must produce its output_len tokens"
    return {
        "makespan_s": makespan, "tokens_per_s": tokens / makespan, "requests_per_s": len(trace) / makespan,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(gaps, 50)), "itl_p99_s": float(np.percentile(gaps, 99)),
    }


class StepTimer:
    """Replaces `engine.step` (both paths call it) to add up the time spent inside it, the steps and the
    sequences per step: what is left of the makespan is waiting for arrivals plus the path's overhead. A step
    run while another is paused between its layers counts as a step, its time once (inside the paused one's)."""

    def __init__(self, engine: Engine) -> None:
        self._step = engine.step
        engine.step = self
        self._depth = 0
        self.reset()

    def reset(self) -> None:
        self.busy_s, self.steps, self.sequences = 0.0, 0, 0

    def __call__(self, batch, between_layers=None):
        start = time.perf_counter()
        self._depth += 1
        try:
            events = self._step(batch, between_layers)
        finally:
            self._depth -= 1
        if self._depth == 0:
            self.busy_s += time.perf_counter() - start
        self.steps += 1
        self.sequences += len(batch)
        return events

    def measured(self, summary: dict) -> dict:
        """`summary` plus this run's step figures; resets for the next run."""
        figures = {"steps": self.steps, "mean_batch_sequences": self.sequences / self.steps,
                   "engine_busy_s": self.busy_s, "engine_busy_fraction": self.busy_s / summary["makespan_s"]}
        self.reset()
        return {**summary, **figures}


def replay(clients: ProcessPoolExecutor, path: str, address: str, trace: list[TraceRequest],
           adapters: list[str]) -> Awaitable[dict]:
    """Replay `trace` over `path` ("grpc" or "http") from the client process, as remote users would: the
    client's own CPU time and GIL hold (SDK parsing, socket polling) then do not stall the server's event
    loop, which they would in one process. Returns `summarize`'s figures, timed in the client."""
    return asyncio.get_running_loop().run_in_executor(clients, replay_here, path, address, trace, adapters)


def replay_here(path: str, address: str, trace: list[TraceRequest], adapters: list[str]) -> dict:
    """`replay` inside the client process, plus the CPU seconds the client itself used (`client_cpu_s`)."""
    began = time.process_time()
    summary = asyncio.run((run_grpc if path == "grpc" else run_http)(address, trace, adapters))
    return {**summary, "client_cpu_s": time.process_time() - began}


async def run_grpc(target: str, trace: list[TraceRequest], adapters: list[str]) -> dict:
    """Each request streamed at its arrival time; token arrival times taken in the client."""
    async with AsyncClient(target) as client:
        began = time.perf_counter()

        async def one(request: TraceRequest, adapter: str) -> tuple[float, list[float]]:
            await asyncio.sleep(max(0.0, began + request.arrival_s - time.perf_counter()))
            start, arrivals = time.perf_counter(), []
            async for _ in client.generate_stream(request.prompt, adapter, max_new_tokens=request.output_len,
                                                  ignore_eos=True):
                arrivals.append(time.perf_counter())
            return start, arrivals

        results = await asyncio.gather(*(one(r, a) for r, a in zip(trace, adapters, strict=True)))
    return summarize(trace, [s for s, _ in results], [a for _, a in results])


async def run_http(url: str, trace: list[TraceRequest], adapters: list[str]) -> dict:
    """The same requests through the OpenAI-style HTTP API (the official SDK, streamed completions with token-id
    prompts); one server-sent event per token, arrival times taken in the client."""
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as client:
        began = time.perf_counter()

        async def one(request: TraceRequest, adapter: str) -> tuple[float, list[float]]:
            await asyncio.sleep(max(0.0, began + request.arrival_s - time.perf_counter()))
            start, arrivals = time.perf_counter(), []
            stream = await client.completions.create(model=adapter, prompt=request.prompt, stream=True, temperature=0,
                                                     max_tokens=request.output_len, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices:
                    arrivals.append(time.perf_counter())
            return start, arrivals

        results = await asyncio.gather(*(one(r, a) for r, a in zip(trace, adapters, strict=True)))
    return summarize(trace, [s for s, _ in results], [a for _, a in results])


def run_direct(engine: Engine, trace: list[TraceRequest], slots: list[int]) -> dict:
    """The same requests at the same times straight into `Engine.step`: FCFS admission up to
    MAX_RUNNING, decodes first then prefill chunks within MAX_STEP_TOKENS (the server's caps)."""
    waiting = deque(range(len(trace)))
    running: list[tuple[int, SequenceState]] = []
    starts, arrivals = [0.0] * len(trace), [[] for _ in trace]
    began = time.perf_counter()
    while waiting or running:
        now = time.perf_counter()
        while waiting and len(running) < MAX_RUNNING and began + trace[waiting[0]].arrival_s <= now:
            i = waiting.popleft()
            starts[i] = began + trace[i].arrival_s
            sampling = SamplingParams(max_new_tokens=trace[i].output_len, ignore_eos=True)
            running.append((i, engine.add_sequence(trace[i].prompt, sampling, slots[i])))
        if not running:
            time.sleep(began + trace[waiting[0]].arrival_s - now)
            continue
        budget, batch = MAX_STEP_TOKENS, []
        for _, seq in sorted(running, key=lambda item: item[1].num_pending > 1):
            count = min(seq.num_pending, budget)
            if count == 0:
                break
            batch.append((seq, count))
            budget -= count
        events = engine.step(batch)
        stamp = time.perf_counter()
        by_seq = {seq.seq_id: i for i, seq in running}
        for event in events:
            arrivals[by_seq[event.seq_id]].append(stamp)
        running = [(i, seq) for i, seq in running if not seq.finished]  # finished ones freed their KV blocks
    return summarize(trace, starts, arrivals)


async def resident_slots(manager: AdapterManager, names: list[str]) -> dict[str, int]:
    """Name -> device slot of every start-up adapter, once all of them are resident (they load in the
    background), so the direct runs use the same slots as the server."""
    leases = {name: manager.acquire(AdapterReference(name)) for name in names}
    try:
        while any(manager.resident_slot(lease) is None for lease in leases.values()):
            await asyncio.sleep(0.05)
        return {name: manager.resident_slot(lease) for name, lease in leases.items()}
    finally:
        for lease in leases.values():
            manager.release(lease)


async def benchmark(base_folder: Path, adapters: dict[str, Path], device: str, num_requests: int,
                    store: Path, clients: ProcessPoolExecutor, only_kernels: bool) -> dict:
    def settings(metrics: bool, store: Path, nf4_kernel: str = "auto") -> Settings:
        return load_settings(model=base_folder, adapter=adapters, host="127.0.0.1", port=0, http_port=0,
                             reflection=False,
                             adapters=AdapterSettings(store=store), metrics={"enabled": metrics},
                             engine=EngineConfig(device=device, num_slots=len(adapters), max_rank=RANK,
                                                 kv_cache_bytes=2**30, nf4_kernel=nf4_kernel),
                             scheduler={"max_running": MAX_RUNNING, "max_step_tokens": MAX_STEP_TOKENS,
                                        "max_waiting": num_requests})

    app = await start(settings(True, store))
    side = {"bitsandbytes": settings(True, store.with_name(store.name + "-bitsandbytes"), nf4_kernel="bitsandbytes")}
    if not only_kernels:
        side["unmetered"] = settings(False, store.with_name(store.name + "-unmetered"))
    others = {label: await start(config) for label, config in side.items()}
    try:
        engine, target, names = app.scheduler.engine, f"127.0.0.1:{app.port}", list(adapters)
        trace, fresh = make_trace(engine.spec.vocab_size, num_requests), FreshPrompts(engine.spec.vocab_size)
        n8 = [names[i] if i != NO_ADAPTER else "" for i in zipf_adapters(8, num_requests)]
        result = {"lora_impl": engine.lora_impl, "dtype": str(engine.dtype)}
        if not only_kernels:
            result["runs"] = await adapter_counts(clients, app, names, trace, fresh)
            metrics = await alternating(clients, {"off": (f"127.0.0.1:{others['unmetered'].port}", others["unmetered"]),
                                                  "on": (target, app)}, trace, n8, names, METRICS_REPEATS, fresh)
            result["metrics"] = {"on_tokens_per_s": metrics["on"], "off_tokens_per_s": metrics["off"]}
            print(f"metrics on {metrics['on']}, off {metrics['off']} tokens/s", flush=True)
        bnb = (f"127.0.0.1:{others['bitsandbytes'].port}", others["bitsandbytes"])
        kernels = await alternating(clients, {"fused": (target, app), "bitsandbytes": bnb}, trace, n8, names,
                                    KERNEL_REPEATS, fresh)
        result["nf4_kernels_n8"] = {f"{label}_tokens_per_s": values for label, values in kernels.items()}
        print(f"N=8 nf4_kernel fused {kernels['fused']}, bitsandbytes {kernels['bitsandbytes']} tokens/s", flush=True)
        return result
    finally:
        await app.stop(0)
        for other in others.values():
            await other.stop(0)


async def adapter_counts(clients: ProcessPoolExecutor, app: App, names: list[str], trace: list[TraceRequest],
                         fresh: FreshPrompts) -> dict[str, dict]:
    """The trace for every N of ADAPTER_COUNTS over gRPC, HTTP and the engine driven directly (on the engine
    thread, where the server's steps run: core/engine_thread.py)."""
    engine, target = app.scheduler.engine, f"127.0.0.1:{app.port}"
    url = f"http://127.0.0.1:{app.http.port}/v1"
    slot_of = await resident_slots(app.scheduler.adapters, names)
    warm = [TraceRequest(0.0, r.prompt, 4) for r in trace[:16]]  # kernels, allocator, BLAS shapes
    for path, address in (("grpc", target), ("http", url)):
        await replay(clients, path, address, fresh(warm), [names[i % len(names)] for i in range(len(warm))])
    engine_thread = EngineThread.acquire()
    try:
        await engine_thread.run(run_direct, engine, fresh(warm), list(range(len(warm))))
        timer, runs = StepTimer(engine), {}
        for n in ADAPTER_COUNTS:
            indices = zipf_adapters(n, len(trace))
            adapters = [names[i] if i != NO_ADAPTER else "" for i in indices]
            slots = [slot_of[name] if name else NO_ADAPTER for name in adapters]
            grpc_run = timer.measured(await replay(clients, "grpc", target, fresh(trace), adapters))
            http_run = timer.measured(await replay(clients, "http", url, fresh(trace), adapters))
            direct_run = timer.measured(await engine_thread.run(run_direct, engine, fresh(trace), slots))
            runs[f"n{n}"] = {"distinct_adapters": len(set(slots) - {NO_ADAPTER}), "grpc": grpc_run,
                             "http": http_run, "direct": direct_run}
            print(f"N={n}: " + ", ".join(f"{path} {runs[f'n{n}'][path]['tokens_per_s']:.1f} tokens/s"
                                         for path in PATHS), flush=True)
    finally:
        engine_thread.release()
    return runs


async def alternating(clients: ProcessPoolExecutor, servers: dict[str, tuple[str, App]], trace: list[TraceRequest],
                      adapters: list[str], names: list[str], repeats: int, fresh: FreshPrompts
                      ) -> dict[str, list[float]]:
    """gRPC tokens/s of the trace on each server (label -> (address, app)), the servers taking turns
    `repeats` times, so slow drifts of the machine hit all of them alike. Each server is warmed first."""
    warm = [TraceRequest(0.0, r.prompt, 4) for r in trace[:16]]
    for address, app in servers.values():
        await resident_slots(app.scheduler.adapters, names)
        await replay(clients, "grpc", address, fresh(warm), adapters[:16])
    results: dict[str, list[float]] = {label: [] for label in servers}
    for _ in range(repeats):
        for label, (address, _) in servers.items():
            results[label].append((await replay(clients, "grpc", address, fresh(trace), adapters))["tokens_per_s"])
    return results


def adapter_ratios(runs: dict[str, dict], metrics: dict) -> dict[str, float]:
    """The ratios of the adapter-count runs and of the metrics comparison (see the module docstring)."""
    ratios = {
        "n100_vs_n0": runs["n100"]["grpc"]["tokens_per_s"] / runs["n0"]["grpc"]["tokens_per_s"],
        "n8_vs_n0": runs["n8"]["grpc"]["tokens_per_s"] / runs["n0"]["grpc"]["tokens_per_s"],
        **{f"grpc_vs_direct_{n}": r["grpc"]["tokens_per_s"] / r["direct"]["tokens_per_s"] for n, r in runs.items()},
        **{f"http_vs_grpc_{n}": r["http"]["tokens_per_s"] / r["grpc"]["tokens_per_s"] for n, r in runs.items()},
        **{f"http_vs_grpc_itl_p99_{n}": r["http"]["itl_p99_s"] / r["grpc"]["itl_p99_s"] for n, r in runs.items()},
    }
    ratios["grpc_vs_direct"] = min(ratios[f"grpc_vs_direct_{n}"] for n in runs)
    ratios["http_vs_grpc"] = min(ratios[f"http_vs_grpc_{n}"] for n in runs)
    ratios["metrics_on_vs_off"] = sum(metrics["on_tokens_per_s"]) / sum(metrics["off_tokens_per_s"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random tiny llama instead of SmolLM2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=NUM_REQUESTS, help="requests per run")
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS} ({KERNELS_RESULTS} with "
                        "--only-kernels)")
    parser.add_argument("--only-kernels", action="store_true",
                        help="only the N=8 fused vs bitsandbytes NF4 kernel comparison")
    args = parser.parse_args()
    output = args.output or (KERNELS_RESULTS if args.only_kernels else RESULTS)

    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-serving-bench-"))
    with ThreadPoolExecutor(1) as preparing:  # torch's thread team of this thread ends with it (engine_thread.py)
        base_folder = preparing.submit(tiny_model, workdir / "base") if args.tiny else preparing.submit(
            default_model_path)
        base_folder = base_folder.result()
        folders = preparing.submit(write_adapters, base_folder, workdir / "adapters", [RANK] * max(ADAPTER_COUNTS),
                                   TARGETS).result()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        result = asyncio.run(benchmark(base_folder, {f.name: f for f in folders}, args.device, args.requests,
                                       workdir / "store", clients, args.only_kernels))
    kernels = result["nf4_kernels_n8"]
    ratios = {"fused_vs_bitsandbytes_n8": sum(kernels["fused_tokens_per_s"])
              / sum(kernels["bitsandbytes_tokens_per_s"])}
    runs = result.get("runs", {})
    if runs:
        ratios |= adapter_ratios(runs, result["metrics"])

    print(f"\nmodel: {'tiny llama' if args.tiny else 'SmolLM2-135M-Instruct'}  device: {args.device}  "
          f"lora: {result['lora_impl']}  threads: {torch.get_num_threads()}")
    print(f"{args.requests} requests/run, Poisson {ARRIVAL_RATE}/s, prompt U{PROMPT_LENS}, output U{OUTPUT_LENS}, "
          f"Zipf({ZIPF_ALPHA}) over N r={RANK} {'+'.join(TARGETS)} adapters")
    print(f"{'run':<12}{'adapters':>9}{'tokens/s':>10}{'req/s':>7}{'TTFT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}"
          f"{'steps':>7}{'seqs/step':>10}{'in engine':>10}{'client CPU s':>13}")
    for name, run in runs.items():
        for path in PATHS:
            r = run[path]
            print(f"{name + ' ' + path:<12}{run['distinct_adapters']:>9}{r['tokens_per_s']:>10.1f}"
                  f"{r['requests_per_s']:>7.2f}{r['ttft_p50_s'] * 1e3:>9.0f}/{r['ttft_p99_s'] * 1e3:<8.0f}"
                  f"{r['itl_p50_s'] * 1e3:>8.1f}/{r['itl_p99_s'] * 1e3:<8.1f}{r['steps']:>7}"
                  f"{r['mean_batch_sequences']:>10.1f}{r['engine_busy_fraction']:>10.1%}"
                  f"{r.get('client_cpu_s', float('nan')):>13.1f}")
    for name, value in ratios.items():
        print(f"  {name:<22}{value:6.3f}")
    print(f"total {time.perf_counter() - began:.0f} s")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "device": args.device,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "trace": {"requests": args.requests, "arrival_rate_per_s": ARRIVAL_RATE, "prompt_lens": PROMPT_LENS,
                  "output_lens": OUTPUT_LENS, "zipf_alpha": ZIPF_ALPHA, "rank": RANK, "targets": TARGETS,
                  "max_running": MAX_RUNNING, "max_step_tokens": MAX_STEP_TOKENS},
        "ratios": ratios, **result,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
