"""Every Prometheus metric of the server, defined once here with its help text.

Recorded as things happen: requests (GenerationCore, when a request ends: outcome, tokens, time to first
token, inter-token gaps, end-to-end time), engine steps (the scheduler, after each step: sequences and
duration), prefix-cache lookups (the scheduler, when it first admits a request: prompt tokens queried and
found cached) and adapter-load phases (the adapter manager: read, validate, copy). Read at scrape time by
`ServerState`, so they cost nothing while serving: queue and KV gauges (cached prefix blocks among them),
vLLM-style LoRA info, adapter residency per tier, tier hit/miss/eviction counters, store read failures,
training runs recorded in the adapter store.

Adapter label cardinality is bounded: the first `max_adapter_labels` adapters to receive requests keep
their own `adapter` label value for the life of the process (a label value never moves, so counters stay
monotonic), later ones are counted under `_other`; the base model is `_base`. Only adapters that exist get
a label: a request refused before it runs is counted under `_unknown` (it named no adapter the server has)
or `_refused` (any other refusal: key, scope, bad field, overload), never under the name it sent. Adapter
names start with a letter or digit, so none of these can collide with one.

Tenants (core/quota_config.py) are labelled the same way, within `max_tenant_labels` (`_other` beyond):
requests the scheduler admitted or refused (by the limit that refused them), tokens served (prompt plus
generated) and the wait from submit to first admission (the GenerationCore, when a request is submitted and
when it ends).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.adapters.training_runs import OUTCOMES as TRAINING_OUTCOMES
from loraplex.adapters.training_runs import count_runs

if TYPE_CHECKING:
    from loraplex.server.core.adapter_runtime.manager import AdapterManager
    from loraplex.server.core.scheduler import Scheduler

BASE_LABEL, OTHER_LABEL, REFUSED_LABEL, UNKNOWN_LABEL = "_base", "_other", "_refused", "_unknown"
FIXED_LABELS = (REFUSED_LABEL, UNKNOWN_LABEL)
OUTCOMES = ("stop", "length", "cancelled", "refused", "error")
"""Request outcomes: finished (stop: EOS, a stop token or stop string; length), cancelled (the caller went
away), refused (a RequestError before the first token), error (the server failed it)."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
TIERS = ("device", "host", "store")


class AdapterLabels:
    """adapter (or tenant) name -> its label value, within `max_labels` distinct names besides `preset`
    (default: the base model's) (thread-safe). Only traffic assigns labels (`__call__`); residency uses the
    labels traffic assigned (`known`)."""

    def __init__(self, max_labels: int, preset: dict[str, str] | None = None) -> None:
        self._max_labels = max_labels
        self._labels: dict[str, str] = {"": BASE_LABEL} if preset is None else dict(preset)
        self._preset = len(self._labels)
        self._lock = threading.Lock()

    def __call__(self, adapter: str) -> str:
        label = self._labels.get(adapter)
        if label is not None:
            return label
        with self._lock:
            if adapter not in self._labels:
                has_room = len(self._labels) - self._preset < self._max_labels
                self._labels[adapter] = adapter if has_room else OTHER_LABEL
            return self._labels[adapter]

    def known(self, adapter: str) -> str:
        """The label `adapter` already has, or `_other`; assigns none (for state, which is not traffic)."""
        return self._labels.get(adapter, OTHER_LABEL)


class ServerMetrics:
    """The server's metrics in their own registry (`exposition()` is the /metrics body)."""

    def __init__(self, max_adapter_labels: int, max_tenant_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = AdapterLabels(max_adapter_labels)
        self.tenant_label = AdapterLabels(max_tenant_labels, preset={})
        registry = self.registry
        self.requests = Counter(
            "loraplex_requests", "Requests ended, by adapter and outcome (stop, length, cancelled, refused, error).",
            ["adapter", "outcome"], registry=registry)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of accepted requests, by adapter.",
                                     ["adapter"], registry=registry)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated, by adapter.",
                                         ["adapter"], registry=registry)
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "From the request's arrival to its first token, by adapter.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds", "Between consecutive tokens of one request, by adapter.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "loraplex_e2e_request_latency_seconds", "From a request's arrival to its last token, by adapter.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prefix_cache_queries = Counter(
            "loraplex_prefix_cache_queries", "Prompt tokens looked up in the prefix cache when a request was first "
            "admitted, by adapter (vLLM's vllm:prefix_cache_queries).", ["adapter"], registry=registry)
        self.prefix_cache_hits = Counter(
            "loraplex_prefix_cache_hits", "Prompt tokens found in the prefix cache (reused, not prefilled), by "
            "adapter (vLLM's vllm:prefix_cache_hits).", ["adapter"], registry=registry)
        self.batch_size = Histogram("loraplex_batch_size", "Sequences in one engine step.", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.step_duration = Histogram("loraplex_step_duration_seconds", "Duration of one engine step.",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.adapter_load = Histogram(
            "loraplex_adapter_load_seconds", "Adapter load time by phase: read (store to host memory, digest "
            "checked), validate (tensor checks), copy (host memory into a device slot).", ["phase"],
            buckets=LOAD_BUCKETS, registry=registry)
        self.tenant_admitted = Counter(
            "loraplex_tenant_requests_admitted", "Requests the scheduler accepted, by tenant.", ["tenant"],
            registry=registry)
        self.tenant_refused = Counter(
            "loraplex_tenant_requests_refused", "Requests the scheduler refused (RESOURCE_EXHAUSTED, HTTP 429), by "
            "tenant and the limit that refused them (max_concurrent, max_queued, tokens_per_minute, max_waiting).",
            ["tenant", "limit"], registry=registry)
        self.tenant_tokens = Counter(
            "loraplex_tenant_served_tokens", "Prompt plus generated tokens of ended requests, by tenant.", ["tenant"],
            registry=registry)
        self.tenant_queue_wait = Histogram(
            "loraplex_tenant_queue_wait_seconds", "From a request's submit to its first admission into the running "
            "batch, by tenant.", ["tenant"], buckets=LATENCY_BUCKETS, registry=registry)
        for outcome in OUTCOMES:
            self.requests.labels(BASE_LABEL, outcome)
        self.prefix_cache_queries.labels(BASE_LABEL)
        self.prefix_cache_hits.labels(BASE_LABEL)
        for phase in ("read", "validate", "copy"):
            self.adapter_load.labels(phase)

    def record_request(self, adapter: str, outcome: str, prompt_tokens: int, token_times: Sequence[float],
                       arrival: float) -> None:
        """One ended request: `adapter` the name of the adapter it ran on ("" for the base model), or one of
        FIXED_LABELS for a request refused before it ran; `token_times` are its tokens' perf_counter()
        times, `arrival` its start."""
        label = adapter if adapter in FIXED_LABELS else self.adapter_label(adapter)
        self.requests.labels(label, outcome).inc()
        if outcome == "refused":
            return
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        if not token_times:
            return
        self.generation_tokens.labels(label).inc(len(token_times))
        self.time_to_first_token.labels(label).observe(token_times[0] - arrival)
        self.e2e_latency.labels(label).observe(token_times[-1] - arrival)
        gaps = self.inter_token_latency.labels(label)
        for before, after in itertools.pairwise(token_times):
            gaps.observe(after - before)

    def record_submit(self, tenant: str, refused_by: str | None) -> None:
        """A request of `tenant` reached the scheduler: admitted (`refused_by` None), or refused by that limit."""
        label = self.tenant_label(tenant)
        if refused_by is None:
            self.tenant_admitted.labels(label).inc()
        else:
            self.tenant_refused.labels(label, refused_by).inc()

    def record_tenant_request(self, tenant: str, served_tokens: int, queue_wait_s: float | None) -> None:
        """An admitted request of `tenant` ended: its prompt plus generated tokens, and its wait for admission
        (None when it never was admitted)."""
        label = self.tenant_label(tenant)
        self.tenant_tokens.labels(label).inc(served_tokens)
        if queue_wait_s is not None:
            self.tenant_queue_wait.labels(label).observe(queue_wait_s)

    def observe_prefix(self, adapter: str, queried: int, cached: int) -> None:
        """A request on `adapter` ("" for the base model) looked up `queried` prompt tokens, `cached` of them
        found in the prefix cache."""
        label = self.adapter_label(adapter)
        self.prefix_cache_queries.labels(label).inc(queried)
        self.prefix_cache_hits.labels(label).inc(cached)

    def observe_step(self, sequences: int, seconds: float) -> None:
        self.batch_size.observe(sequences)
        self.step_duration.observe(seconds)

    def observe_load(self, phase: str, seconds: float) -> None:
        self.adapter_load.labels(phase).observe(seconds)

    def watch(self, scheduler: Scheduler, adapters: AdapterManager, store_root: Path) -> None:
        """Export `scheduler`'s state (queues, KV, adapters) and the training runs of `store_root` at scrape."""
        self.registry.register(ServerState(scheduler, adapters, store_root, self.adapter_label))

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ServerState(Collector):
    """The metrics that are state, read from the scheduler, engine and adapter manager at each scrape."""

    def __init__(self, scheduler: Scheduler, adapters: AdapterManager, store_root: Path,
                 adapter_label: AdapterLabels) -> None:
        self._scheduler, self._adapters = scheduler, adapters
        self._store_root, self._adapter_label = store_root, adapter_label

    def collect(self) -> Iterator[Metric]:
        scheduler = self._scheduler
        queues = scheduler.queues()
        used, total = scheduler.kv_blocks()
        yield _gauge("loraplex_num_requests_running", "Requests in the running batch.", len(queues.running))
        yield _gauge("loraplex_num_requests_waiting", "Requests waiting for admission.", len(queues.waiting))
        yield _gauge("loraplex_kv_cache_blocks_used", "KV-cache blocks held by sequences.", used)
        yield _gauge("loraplex_kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield _gauge("loraplex_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", used / total)
        yield _gauge("loraplex_prefix_cache_blocks", "KV-cache blocks holding a cached prefix (held by sequences, "
                     "or free and reusable until the pool needs them).", scheduler.prefix_cached_blocks())
        info = GaugeMetricFamily(
            "loraplex_lora_requests_info", "Adapters of running and waiting requests and the most adapters one "
            "step runs (vLLM's vllm:lora_requests_info shape); the value is the sample's unix time.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted(set(queues.running) - {""})), ",".join(sorted(set(queues.waiting) - {""})),
                         str(scheduler.max_step_adapters)], time.time())
        yield info
        residency = GaugeMetricFamily("loraplex_adapter_residency", "Versions of an adapter held in each tier "
                                      "(device slots, host memory, store).", labels=["adapter", "tier"])
        by_label: dict[tuple[str, str], int] = {}
        for name, tiers in self._adapters.residency().items():
            for tier in TIERS:
                key = (self._adapter_label.known(name), tier)
                by_label[key] = by_label.get(key, 0) + tiers.get(tier, 0)
        for (label, tier), count in sorted(by_label.items()):
            residency.add_metric([label, tier], count)
        yield residency
        stats = self._adapters.tier_counters()
        for name, help_text in (("evictions", "Adapter versions evicted from a tier to make room."),
                                ("cache_hits", "Adapter lookups a tier answered (device: already in a slot; "
                                 "host: in host memory, no store read)."),
                                ("cache_misses", "Adapter lookups a tier could not answer (device: copied into "
                                 "a slot; host: read from the store).")):
            family = CounterMetricFamily(f"loraplex_adapter_{name}", help_text, labels=["tier"])
            for tier in ("device", "host"):
                family.add_metric([tier], stats[f"{tier}_{name}"])
            yield family
        yield CounterMetricFamily("loraplex_adapter_load_failures", "Registered adapter versions that could not be "
                                  "read from the store into host memory (the requests holding them failed; the log "
                                  "says why).", value=stats["load_failures"])
        runs = CounterMetricFamily("loraplex_training_runs", "serve-train runs on this adapter store, by outcome "
                                   "(succeeded, rejected: stored but not promoted, failed, interrupted).",
                                   labels=["outcome"])
        counted = count_runs(self._store_root)
        for outcome in TRAINING_OUTCOMES:
            runs.add_metric([outcome], counted.get(outcome, 0))
        yield runs


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)
