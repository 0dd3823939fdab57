"""Adapter lifecycle costs (issue: adapter lifecycle): a cold load, 1000 adapters vs 10, hot-swaps under load.

One process, one engine (NF4, max_rank 16), its adapter manager as `app.adapter_manager` wires it, and
its scheduler (no transport). Three parts; each compares its configurations side by side in the same
run, alternated (A B, B A, ...), and quotes ratios of medians:
  (1) cold load of one r=16 all-linear adapter from the store into a device slot, split into read
      (the files plus their digest check), validate (parse, layout and NaN checks) and copy
      (`Engine.set_slot`), each repetition next to a plain `read_bytes` of the same stored files
      (both from the page cache: dropping it needs root) and a sha256 of the bytes in memory;
  (2) serving throughput under a trace of Sizes.requests requests (Poisson arrivals and lengths as in
      benchmarks/serving.py), Zipf(ZIPF_ALPHA) popularity over 10 adapters vs over 1000 registered ones,
      with fewer device slots and a smaller host cache than the adapters the 1000-adapter trace touches,
      so that it loads from the store and evicts from both tiers. The adapters are r=8 on q_proj and
      v_proj: the LoRA arithmetic is small, so the ratio measures adapter management. The slots equal
      MAX_RUNNING, so a slot is free whenever a sequence is: a load, not the slot count, is what can hold
      a request back;
  (3) inter-token latency of Sizes.itl_clients closed-loop streams (each sends its requests one after
      another) on four adapters, one of them "hot", with no swaps vs with a thread that loads a new version
      of "hot" every --swap-interval seconds (cycling through more versions than the store keeps per name, so
      every swap validates, stores and registers a version no tier holds and prunes an old one; the next
      request on "hot" then loads and installs it). The 1000 adapters of (2) stay registered.

    python benchmarks/adapters.py           # SmolLM2-135M-Instruct, NF4 (the default model); ~10 minutes
    python benchmarks/adapters.py --quick   # smaller sizes, a smoke run (under 2 minutes)

Writes benchmarks/results/adapters.json: `ratios.throughput_1000_vs_10` (tokens/s with 1000 adapters over
10; target >= 0.9) and `ratios.itl_p99_swaps_vs_none` (inter-token latency p99 with continual swaps over
none; target <= 1.25).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from serving import (
    MAX_RUNNING,
    MAX_STEP_TOKENS,
    ZIPF_ALPHA,
    FreshPrompts,
    StepTimer,
    TraceRequest,
    make_trace,
    summarize,
    zipf_adapters,
)

from loraplex.adapters.loading import load_version
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.reference import AdapterReference
from loraplex.server.app import adapter_manager
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.requests import Request
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import Engine, EngineConfig, ModelSpec, SamplingParams
from loraplex.server.engine.spec import PROJECTIONS
from loraplex.server.model_files import base_digest, iter_weights, model_spec
from loraplex.server.settings import AdapterSettings, load_settings

RESULTS = Path(__file__).parent / "results" / "adapters.json"
COLD_RANK = 16  # (1): all linear projections
RANK, TARGETS = 8, ("q_proj", "v_proj")  # (2) and (3)
FEW, MANY = 10, 1000  # adapters in the two traces of (2)
ITL_ADAPTERS = ("hot", "a0001", "a0002", "a0003")  # (3): client i uses ITL_ADAPTERS[i % 4]
ITL_PROMPT_LENS, ITL_OUTPUT_LENS = (16, 64), (16, 48)  # uniform, inclusive: short requests, so "hot" clients
# send new ones (which run on the newest version) while the swaps go on
SWAP_INTERVAL_S = 1.0  # (3): a new version of "hot" every second, all run long (--swap-interval 0: back to back)
SWAP_VERSIONS = 12  # distinct "hot" versions cycled through: more than AdapterSettings.max_versions (8)


@dataclass(frozen=True)
class Sizes:
    cold_repeats: int
    """Repetitions of (1), alternating the loader with a plain read."""
    many: int
    """Adapters registered for (2)'s large trace."""
    requests: int
    """Requests per run of (2)."""
    throughput_rounds: int
    """Rounds of (2), each one run of both traces (A B, then B A, ...)."""
    itl_clients: int
    """Concurrent streams of (3)."""
    itl_requests: int
    """Requests each stream of (3) sends, one after another."""
    itl_rounds: int
    """Rounds of (3), each one run without and one with swaps (alternating which goes first)."""
    num_slots: int
    """Device slots of (2) and (3)."""
    host_cache_adapters: int
    """Host cache of (2) and (3), in r=8 q/v adapters."""


FULL = Sizes(cold_repeats=15, many=MANY, requests=64, throughput_rounds=3, itl_clients=16, itl_requests=4,
             itl_rounds=3, num_slots=MAX_RUNNING, host_cache_adapters=32)
QUICK = Sizes(cold_repeats=3, many=50, requests=8, throughput_rounds=1, itl_clients=4, itl_requests=2,
              itl_rounds=1, num_slots=8, host_cache_adapters=8)  # few slots: a short trace still evicts


# -- adapters ----------------------------------------------------------------------------------------


def write_random_adapter(folder: Path, spec: ModelSpec, rank: int, targets: Sequence[str], seed: int) -> Path:
    """A PEFT LoRA folder (config + float32 safetensors, PEFT's key names) with random non-zero weights:
    written directly, without building the model, so that a thousand take seconds."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for proj in targets:
            in_features, out_features = spec.projection_shape(proj)
            block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    folder.mkdir(parents=True)
    safetensors.torch.save_file(tensors, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets), "bias": "none",
        "lora_dropout": 0.0, "base_model_name_or_path": spec.model_type}))
    return folder


def host_bytes(spec: ModelSpec, rank: int, targets: Sequence[str], dtype: torch.dtype) -> int:
    """Host-memory bytes of one loaded adapter (A [r, in] and B [out, r] per targeted projection)."""
    return spec.num_layers * sum(rank * sum(spec.projection_shape(proj)) for proj in targets) * dtype.itemsize


def make_manager(engine: Engine, base_folder: Path, store: Path, sources: Path, host_cache_bytes: int
                 ) -> AdapterManager:
    """The production wiring (`app.adapter_manager`) on a fresh store, reading sources under `sources`."""
    sources.mkdir(parents=True, exist_ok=True)
    settings = load_settings(adapters=AdapterSettings(store=store, allowed_roots=[sources.resolve()],
                                                      host_cache_bytes=host_cache_bytes))
    return adapter_manager(engine, settings, base_digest(base_folder))


def register_random(manager: AdapterManager, sources: Path, names: Sequence[str], seed: int) -> float:
    """Write and `load` one r=8 q/v adapter per name (the source is deleted once stored); seconds per adapter."""
    start = time.perf_counter()
    for i, name in enumerate(names):
        folder = write_random_adapter(sources / name, manager.engine.spec, RANK, TARGETS, seed + i)
        manager.load(str(folder), name)
        shutil.rmtree(folder)
    return (time.perf_counter() - start) / len(names)


class ManagerTimer:
    """Wraps the AdapterManager calls the scheduler makes to add up the seconds they take (waiting for the
    manager's lock included, and the copies into slots `slot_for` makes), on the scheduler's thread and on
    others (`acquire`, called by `submit` on the event loop); nested calls count once. Like StepTimer,
    `measured` adds this run's figures and resets."""

    CALLS = ("acquire", "release", "resident_slot", "can_place", "slot_for", "install_warm")

    def __init__(self, manager: AdapterManager) -> None:
        self._depth = threading.local()
        self._lock = threading.Lock()
        for name in self.CALLS:
            setattr(manager, name, self._timed(getattr(manager, name)))
        self.reset()

    def reset(self) -> None:
        self.scheduler_s, self.scheduler_max_s, self.other_s = 0.0, 0.0, 0.0

    def _timed(self, call):
        def timed(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            self._depth.value = depth + 1
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self._depth.value = depth
                if depth == 0:
                    self._add(time.perf_counter() - start)
        return timed

    def _add(self, seconds: float) -> None:
        with self._lock:
            if threading.current_thread().name == "loraplex-scheduler":
                self.scheduler_s += seconds
                self.scheduler_max_s = max(self.scheduler_max_s, seconds)
            else:
                self.other_s += seconds

    def measured(self, run: dict, wall_s: float) -> dict:
        figures = {"manager_calls_fraction": self.scheduler_s / wall_s, "manager_call_max_s": self.scheduler_max_s,
                   "acquire_s": self.other_s}
        self.reset()
        return {**run, **figures}


_BEGAN = time.perf_counter()


def elapsed() -> str:
    return f"{time.perf_counter() - _BEGAN:.0f} s"


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


# -- (1) cold load -----------------------------------------------------------------------------------


def cold_load(manager: AdapterManager, sources: Path, repeats: int) -> dict:
    """Store -> slot of one r=16 all-linear adapter: median read / validate / copy seconds, and the
    loader's read vs a plain read (and a sha256) of the same stored files, alternated per repetition.
    Runs before the scheduler starts (it writes slots 0 and 1 behind the manager, which only ever
    assigns a slot after copying a whole adapter into it)."""
    engine, spec = manager.engine, manager.engine.spec
    folder = write_random_adapter(sources / "cold", spec, COLD_RANK, PROJECTIONS, seed=0)
    _, summary, _ = manager.load(str(folder), "cold")
    stored = manager.store.path("cold", summary.digest)
    files = [stored / CONFIG_FILE, stored / WEIGHTS_FILE]
    times: dict[str, list[float]] = {key: [] for key in ("plain_read", "sha256", "read", "validate", "copy")}
    for i in range(repeats + 1):  # the first repetition warms up (allocator, page cache) and is discarded
        start = time.perf_counter()
        data = b"".join(file.read_bytes() for file in files)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hashed = time.perf_counter() - start
        del data
        loaded = load_version(stored, summary.digest, spec, manager.store.limits, engine.dtype)
        start = time.perf_counter()
        engine.set_slot(i % engine.num_slots, loaded.weights)
        sync(engine)
        copy = time.perf_counter() - start
        if i:
            for key, value in zip(times, (plain, hashed, loaded.read_s, loaded.validate_s, copy), strict=True):
                times[key].append(value)
    median = {key: statistics.median(values) for key, values in times.items()}
    nbytes = sum(file.stat().st_size for file in files)
    return {
        "rank": COLD_RANK, "targets": "all linear", "max_rank": engine.config.max_rank, "file_bytes": nbytes,
        "host_bytes": loaded.nbytes, "repeats": repeats, "dtype": str(engine.dtype),
        "median_s": median, "total_s": median["read"] + median["validate"] + median["copy"],
        "read_mb_per_s": nbytes / median["read"] / 1e6, "plain_read_mb_per_s": nbytes / median["plain_read"] / 1e6,
        "sha256_mb_per_s": nbytes / median["sha256"] / 1e6, "samples_s": times,
    }


# -- (2) throughput with 1000 adapters vs 10 --------------------------------------------------------


async def run_trace(scheduler: Scheduler, trace: list[TraceRequest], adapters: list[str]) -> dict:
    """Each request submitted at its arrival time; token arrival times taken where the stream is read."""
    began = time.perf_counter()

    async def one(request: TraceRequest, adapter: str) -> tuple[float, list[float]]:
        await asyncio.sleep(max(0.0, began + request.arrival_s - time.perf_counter()))
        start, arrivals = time.perf_counter(), []
        sampling = SamplingParams(max_new_tokens=request.output_len, ignore_eos=True)
        async for _ in scheduler.submit(Request(AdapterReference(adapter), request.prompt, sampling)):
            arrivals.append(time.perf_counter())
        return start, arrivals

    results = await asyncio.gather(*(one(r, a) for r, a in zip(trace, adapters, strict=True)))
    return summarize(trace, [s for s, _ in results], [a for _, a in results])


def counters(manager: AdapterManager) -> dict[str, float]:
    stats = manager.stats
    return {"loads": stats.loads, "load_failures": stats.load_failures, "installs": stats.installs,
            "slot_evictions": manager.slots.evictions, "host_evictions": manager.host.evictions,
            "load_read_s": stats.read_s, "load_validate_s": stats.validate_s}


def since(manager: AdapterManager, before: dict[str, float]) -> dict[str, float]:
    return {key: value - before[key] for key, value in counters(manager).items()}


async def throughput(scheduler: Scheduler, timer: StepTimer, calls: ManagerTimer, names: list[str],
                     sizes: Sizes) -> dict:
    """Runs of the FEW- and the MANY-adapter trace, alternated (A B, B A, ...): same arrivals, lengths and
    Zipf seed per round; the adapters differ only in how many there are."""
    manager, configs = scheduler.adapters, {"few": FEW, "many": sizes.many}
    trace = make_trace(scheduler.engine.spec.vocab_size, sizes.requests)
    fresh = FreshPrompts(scheduler.engine.spec.vocab_size)  # every run its own prompts: no prefix-cache hits
    warm = [TraceRequest(0.0, r.prompt, 4) for r in trace[:16]]  # kernels, allocator, BLAS shapes
    for n in configs.values():  # Zipf seed 0 here, 1, 2, ... in the rounds
        await run_trace(scheduler, fresh(warm), [names[i] for i in zipf_adapters(n, len(warm), seed=0)])
    timer.reset()
    calls.reset()
    runs: dict[str, list[dict]] = {key: [] for key in configs}
    for round_ in range(sizes.throughput_rounds):
        for key in (("few", "many") if round_ % 2 == 0 else ("many", "few")):
            picks = zipf_adapters(configs[key], sizes.requests, seed=1 + round_)
            before = counters(manager)
            run = timer.measured(await run_trace(scheduler, fresh(trace), [names[i] for i in picks]))
            run = calls.measured(run, run["makespan_s"])
            runs[key].append({**run, "distinct_adapters": len(set(picks)), **since(manager, before)})
            print(f"  (2) round {round_} {key:<4}: {run['tokens_per_s']:.1f} tokens/s, "
                  f"loads {runs[key][-1]['loads']} ({elapsed()})", flush=True)
    medians = {key: {field: statistics.median(r[field] for r in rs)
                     for field in ("tokens_per_s", "makespan_s", "itl_p50_s", "itl_p99_s", "ttft_p50_s",
                                   "engine_busy_fraction", "manager_calls_fraction", "manager_call_max_s",
                                   "mean_batch_sequences", "distinct_adapters")}
               for key, rs in runs.items()}
    totals = {key: {field: sum(r[field] for r in rs) for field in ("loads", "installs", "slot_evictions",
                                                                   "host_evictions", "load_failures")}
              for key, rs in runs.items()}
    return {"adapters": configs, "medians": medians, "totals": totals, "runs": runs}


# -- (3) inter-token latency with hot-swaps vs without -----------------------------------------------


class Swapper(threading.Thread):
    """Loads `folders` in turn as the new current version of `name`, one every `interval_s` (or back to back)."""

    def __init__(self, manager: AdapterManager, name: str, folders: list[Path], interval_s: float) -> None:
        super().__init__(name="bench-swapper", daemon=True)
        self.manager, self.adapter, self.folders, self.interval_s = manager, name, folders, interval_s
        self.durations: list[float] = []
        self.error: BaseException | None = None
        self._next = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                start = time.perf_counter()
                folder = str(self.folders[self._next % len(self.folders)])
                # as an AdapterAdmin.LoadAdapter call runs it: on the manager's low-priority admin threads
                self.manager.admin_executor.submit(self.manager.load, folder, self.adapter).result()
                self._next += 1
                self.durations.append(time.perf_counter() - start)
                self._stop_event.wait(max(0.0, self.interval_s - self.durations[-1]))
        except BaseException as error:  # re-raised by `stop` in the benchmark's thread
            self.error = error

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        if self.error is not None:
            raise self.error


def stream_work(vocab_size: int, clients: int, requests: int, seed: int = 2) -> list[list[TraceRequest]]:
    """Per client, its requests (arrival_s unused: each follows the previous one's last token)."""
    rng = np.random.default_rng(seed)
    return [[TraceRequest(0.0, rng.integers(100, vocab_size, int(rng.integers(*ITL_PROMPT_LENS) + 1)).tolist(),
                          int(rng.integers(ITL_OUTPUT_LENS[0], ITL_OUTPUT_LENS[1] + 1)))
             for _ in range(requests)] for _ in range(clients)]


async def run_streams(scheduler: Scheduler, work: list[list[TraceRequest]]) -> dict:
    """Closed-loop clients; inter-token gaps measured per request where its stream is read."""

    async def client(requests: list[TraceRequest], adapter: str) -> tuple[list[float], list[str]]:
        gaps, versions = [], []
        for request in requests:
            stream = scheduler.submit(Request(adapter, request.prompt,
                                              SamplingParams(max_new_tokens=request.output_len, ignore_eos=True)))
            versions.append(stream.lease.version)
            last = None
            async for _ in stream:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
        return gaps, versions

    start = time.perf_counter()
    results = await asyncio.gather(*(client(requests, ITL_ADAPTERS[i % len(ITL_ADAPTERS)])
                                     for i, requests in enumerate(work)))
    wall = time.perf_counter() - start
    gaps = np.concatenate([g for g, _ in results])
    hot_versions = {v for i, (_, vs) in enumerate(results) if ITL_ADAPTERS[i % len(ITL_ADAPTERS)] == "hot" for v in vs}
    tokens = sum(r.output_len for requests in work for r in requests)
    return {"elapsed_s": wall, "tokens_per_s": tokens / wall, "gaps": len(gaps),
            "itl_p50_s": float(np.percentile(gaps, 50)), "itl_p90_s": float(np.percentile(gaps, 90)),
            "itl_p99_s": float(np.percentile(gaps, 99)), "itl_max_s": float(gaps.max()),
            "hot_versions_served": len(hot_versions)}


async def itl(scheduler: Scheduler, timer: StepTimer, calls: ManagerTimer, swap_folders: list[Path],
              swap_interval_s: float, sizes: Sizes) -> dict:
    """Runs without and with continual swaps of "hot", alternated (none swaps, swaps none, ...)."""
    manager = scheduler.adapters
    work = stream_work(scheduler.engine.spec.vocab_size, sizes.itl_clients, sizes.itl_requests)
    await run_streams(scheduler, [[TraceRequest(0.0, r.prompt, 4) for r in rs] for rs in work])  # warm-up
    timer.reset()
    calls.reset()
    runs: dict[str, list[dict]] = {"none": [], "swaps": []}
    for round_ in range(sizes.itl_rounds):
        for key in (("none", "swaps") if round_ % 2 == 0 else ("swaps", "none")):
            before = counters(manager)
            swapper = Swapper(manager, "hot", swap_folders, swap_interval_s) if key == "swaps" else None
            if swapper is not None:
                swapper.start()
            try:
                run = await run_streams(scheduler, work)
            finally:
                if swapper is not None:
                    swapper.stop()
            busy = timer.busy_s
            timer.reset()
            swaps = swapper.durations if swapper is not None else []
            run = calls.measured(run, run["elapsed_s"])
            runs[key].append({**run, **since(manager, before), "swaps": len(swaps),
                              "swaps_per_s": len(swaps) / run["elapsed_s"],
                              "swap_median_s": statistics.median(swaps) if swaps else 0.0,
                              "engine_busy_fraction": busy / run["elapsed_s"]})
            print(f"  (3) round {round_} {key:<5}: ITL p99 {run['itl_p99_s'] * 1e3:.1f} ms, "
                  f"{len(swaps)} swaps ({elapsed()})", flush=True)
    medians = {key: {field: statistics.median(r[field] for r in rs)
                     for field in ("itl_p50_s", "itl_p90_s", "itl_p99_s", "itl_max_s", "tokens_per_s", "swaps_per_s",
                                   "swap_median_s", "engine_busy_fraction", "manager_calls_fraction",
                                   "manager_call_max_s", "hot_versions_served")}
               for key, rs in runs.items()}
    totals = {key: {field: sum(r[field] for r in rs) for field in ("swaps", "loads", "installs", "slot_evictions",
                                                                   "host_evictions", "load_failures")}
              for key, rs in runs.items()}
    return {"medians": medians, "totals": totals, "runs": runs}


async def benchmark(base_folder: Path, workdir: Path, device: str, swap_interval_s: float, sizes: Sizes) -> dict:
    """The three parts on one engine, adapter manager and scheduler, wired as the server wires them."""
    spec = model_spec(base_folder)
    engine = Engine(spec, iter_weights(base_folder), EngineConfig(device=device, num_slots=sizes.num_slots,
                                                                  max_rank=COLD_RANK))
    one_adapter = host_bytes(spec, RANK, TARGETS, engine.dtype)
    sources = workdir / "sources"
    manager = make_manager(engine, base_folder, workdir / "store", sources, sizes.host_cache_adapters * one_adapter)
    cold = cold_load(manager, sources, sizes.cold_repeats)
    m = cold["median_s"]
    print(f"(1) cold load: read {m['read'] * 1e3:.1f} ms, validate {m['validate'] * 1e3:.1f} ms, "
          f"copy {m['copy'] * 1e3:.1f} ms ({elapsed()})", flush=True)
    names = [f"a{i:04d}" for i in range(sizes.many)]
    register_s = register_random(manager, sources, [*names, "hot"], seed=1000)
    print(f"registered {len(names) + 1} adapters, {register_s * 1e3:.0f} ms each ({elapsed()})", flush=True)
    swap_folders = [write_random_adapter(sources / f"hot-v{i}", spec, RANK, TARGETS, seed=i)
                    for i in range(SWAP_VERSIONS)]
    scheduler = Scheduler(engine, manager, SchedulerConfig(max_running=MAX_RUNNING, max_step_tokens=MAX_STEP_TOKENS,
                                                           max_waiting=max(256, sizes.requests)))
    timer, calls = StepTimer(engine), ManagerTimer(manager)
    scheduler.start()
    try:
        many = await throughput(scheduler, timer, calls, names, sizes)
        swaps = await itl(scheduler, timer, calls, swap_folders, swap_interval_s, sizes)
    finally:
        scheduler.close()
        manager.close()
    return {"lora_impl": engine.lora_impl, "dtype": str(engine.dtype), "num_slots": engine.num_slots,
            "host_cache_bytes": manager.host.budget_bytes, "adapter_host_bytes": one_adapter,
            "register_s_per_adapter": register_s, "cold_load": cold, "throughput": many, "itl": swaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run, not a measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--swap-interval", type=float, default=SWAP_INTERVAL_S,
                        help="seconds between the starts of two swaps in (3); 0: back to back")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL

    workdir = Path(tempfile.mkdtemp(prefix="loraplex-adapters-bench-"))
    try:
        result = asyncio.run(benchmark(default_model_path(), workdir, args.device, args.swap_interval, sizes))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cold, many, swaps = result["cold_load"], result["throughput"], result["itl"]
    m = cold["median_s"]
    ratios = {
        "throughput_1000_vs_10": many["medians"]["many"]["tokens_per_s"] / many["medians"]["few"]["tokens_per_s"],
        "itl_p99_swaps_vs_none": swaps["medians"]["swaps"]["itl_p99_s"] / swaps["medians"]["none"]["itl_p99_s"],
        "itl_p50_swaps_vs_none": swaps["medians"]["swaps"]["itl_p50_s"] / swaps["medians"]["none"]["itl_p50_s"],
        "loader_read_vs_plain_read": cold["median_s"]["plain_read"] / cold["median_s"]["read"],
    }

    print(f"\nmodel: SmolLM2-135M-Instruct  device: {args.device}  lora: {result['lora_impl']}  "
          f"threads: {torch.get_num_threads()}{'  (--quick: smoke sizes)' if args.quick else ''}")
    print(f"(1) cold load, r={COLD_RANK} all-linear ({cold['file_bytes'] / 1e6:.1f} MB stored, max_rank "
          f"{cold['max_rank']}), median of {sizes.cold_repeats}: read {m['read'] * 1e3:.1f} ms + validate "
          f"{m['validate'] * 1e3:.1f} ms + copy {m['copy'] * 1e3:.1f} ms = {cold['total_s'] * 1e3:.1f} ms")
    print(f"    read {cold['read_mb_per_s']:.0f} MB/s vs plain read {cold['plain_read_mb_per_s']:.0f} MB/s "
          f"(sha256 alone {cold['sha256_mb_per_s']:.0f} MB/s): loader/plain speed "
          f"{ratios['loader_read_vs_plain_read']:.2f}")
    print(f"(2) {sizes.requests} requests/run, Zipf({ZIPF_ALPHA}), r={RANK} {'+'.join(TARGETS)}, {result['num_slots']} "
          f"slots, host cache {sizes.host_cache_adapters} adapters; medians of {sizes.throughput_rounds} runs each")
    print(f"{'adapters':>10}{'distinct':>9}{'tokens/s':>10}{'vs 10':>7}{'ITL p50/p99 ms':>17}{'in engine':>10}"
          f"{'in manager':>11}{'loads':>7}{'slot ev.':>9}{'host ev.':>9}")
    few_tps = many["medians"]["few"]["tokens_per_s"]
    for key, n in many["adapters"].items():
        r, t = many["medians"][key], many["totals"][key]
        print(f"{n:>10}{r['distinct_adapters']:>9.0f}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / few_tps:>7.3f}"
              f"{r['itl_p50_s'] * 1e3:>8.1f}/{r['itl_p99_s'] * 1e3:<8.1f}{r['engine_busy_fraction']:>10.1%}"
              f"{r['manager_calls_fraction']:>11.1%}{t['loads']:>7}{t['slot_evictions']:>9}{t['host_evictions']:>9}")
    print(f"(3) {sizes.itl_clients} closed-loop streams x {sizes.itl_requests} requests on {len(ITL_ADAPTERS)} "
          f"adapters; a new 'hot' version every {args.swap_interval * 1e3:.0f} ms; medians of {sizes.itl_rounds} runs")
    print(f"{'swaps':>10}{'swaps/s':>9}{'ITL p50 ms':>11}{'p90':>7}{'p99':>7}{'max':>7}{'p99 vs none':>12}"
          f"{'tokens/s':>10}{'in engine':>10}{'in manager':>11}{'longest ms':>11}{'installs':>9}")
    none_p99 = swaps["medians"]["none"]["itl_p99_s"]
    for key, r in swaps["medians"].items():
        print(f"{key:>10}{r['swaps_per_s']:>9.1f}{r['itl_p50_s'] * 1e3:>11.1f}{r['itl_p90_s'] * 1e3:>7.1f}"
              f"{r['itl_p99_s'] * 1e3:>7.1f}{r['itl_max_s'] * 1e3:>7.1f}{r['itl_p99_s'] / none_p99:>12.3f}"
              f"{r['tokens_per_s']:>10.1f}{r['engine_busy_fraction']:>10.1%}{r['manager_calls_fraction']:>11.1%}"
              f"{r['manager_call_max_s'] * 1e3:>11.1f}{swaps['totals'][key]['installs']:>9}")
    print("    in engine / in manager: share of the wall time the scheduler thread spends in Engine.step / in "
          "AdapterManager calls (waiting for its lock, copying into slots); longest: the longest such call")
    targets = {"throughput_1000_vs_10": ">= 0.9", "itl_p99_swaps_vs_none": "<= 1.25"}
    for name, value in ratios.items():
        print(f"  {name:<26}{value:6.3f}  {'target ' + targets[name] if name in targets else ''}")
    print(f"total {elapsed()}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct", "device": args.device, "quick": args.quick,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "config": {**asdict(sizes), "few": FEW, "zipf_alpha": ZIPF_ALPHA, "rank": RANK, "targets": TARGETS,
                   "cold_rank": COLD_RANK, "max_running": MAX_RUNNING, "max_step_tokens": MAX_STEP_TOKENS,
                   "num_slots": result["num_slots"],
                   "host_cache_bytes": result["host_cache_bytes"], "adapter_host_bytes": result["adapter_host_bytes"],
                   "itl_adapters": ITL_ADAPTERS, "itl_prompt_lens": ITL_PROMPT_LENS,
                   "itl_output_lens": ITL_OUTPUT_LENS, "swap_interval_s": args.swap_interval,
                   "swap_versions": SWAP_VERSIONS},
        "ratios": ratios, "lora_impl": result["lora_impl"], "dtype": result["dtype"],
        "register_s_per_adapter": result["register_s_per_adapter"],
        "cold_load": cold, "throughput": many, "itl": swaps,
    }, indent=2) + "\n")
    # what makes the comparisons meaningful, checked after the figures are written so they can be inspected
    assert all(many["totals"]["many"][key] > 0 for key in ("loads", "slot_evictions", "host_evictions")), \
        f"the {sizes.many}-adapter trace must load from the store and evict from both tiers: {many['totals']['many']}"
    assert swaps["totals"]["swaps"]["swaps"] > 0 and swaps["medians"]["swaps"]["hot_versions_served"] > 1, \
        "the swap runs must serve several versions of 'hot'"
    failures = sum(t["load_failures"] for part in (many, swaps) for t in part["totals"].values())
    assert failures == 0, f"{failures} adapter loads failed"


if __name__ == "__main__":
    main()
