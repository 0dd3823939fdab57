"""The scheduler: single owner of the engine; continuous batching on the process's engine thread.

Transports call `submit(Request)` on the asyncio event loop and iterate the returned
`RequestStream`; the engine runs on the engine thread (core/engine_thread.py: the one thread that runs torch's
parallel work, one plan and step per task), so no handler ever waits on torch.
Events cross back with one `loop.call_soon_threadsafe` per step.

Policy, each step (`_plan`):
  1. Running sequences are scheduled first: decodes (one token each), then unfinished prefills in
     chunks, in admission order, all within `max_step_tokens`.
     With fairness on, a request owed service first never waits on another tenant's step:
     - submitted while a step runs, a request of a tenant with none waiting and no further over its share than
       any other tenant of that step's sequences (`_owed_before`) pauses the step at its next decoder layer; it
       is admitted and its prompt prefilled whole in a step of its own, its first token sent, and the paused
       step resumes (`Engine.step`'s `between_layers`; results bit-identical to an uninterrupted step);
     - in a step that prefills the prompt of a request furthest below its share (the least-served tenant's,
       interactive ones' while batch ones run; see `_share_order`), the requests above it are held back:
       their prompt tokens are at most what those prefills and admissions (3.), taken first, leave of
       `over_share_prefill_tokens`, so its first token waits behind a short step at most.
     A prompt is charged to its tenant's share as its tokens are computed (`_charge_prompt`), so a request's
     own prompt does not count against it while it is prefilled; within one plan, each admission counts its
     prompt at once (`_admit`), so admissions take turns. With one tenant active nothing is held back or
     paused.
  2. When the KV pool cannot hold a running sequence's next tokens, running sequences are preempted
     (blocks let go, recomputed later from what the prefix cache still holds; the oldest always progress):
     batch ones before interactive ones, then those of the tenant most over its fair share, then the most
     recently admitted; each goes back to the front of its queue.
  3. Remaining budget admits waiting requests while `max_running` and free KV blocks allow, in the order
     of core/fairness.py: interactive before batch, tenants by weighted fair queuing over the tokens they
     are served (virtual token counters), each tenant's adapters round-robin (FIFO within one adapter), so
     neither a flooding tenant nor one busy adapter can starve the others.
     An admitted request first takes the longest chain of cached blocks of its prompt under its adapter
     version (`Engine.reuse_prefix`) and prefills only the rest; blocks are counted as the pool counts
     them, so a block several sequences hold takes room once, and one they stop holding returns once.
     Admitting a request places its adapter version in a device slot (`AdapterManager.slot_for`): a
     version still loading from the store is skipped this step (its requests keep their turn; the
     loader wakes the loop when it is done), so a cold adapter never holds up the others.
     Running sequences use at most `max_step_adapters` distinct adapter slots (the base model uses
     none), so no step exceeds it; a request whose adapter would exceed it, or that needs a slot when
     every slot is running or pinned, keeps its turn and admission pauses until a running adapter's
     sequences leave (later adapters do not overtake it).
`submit` takes requests the core has checked (core/validation.py: one that could never fit the KV pool
alone never comes) and refuses with Overloaded once `max_waiting` requests wait, or when the request's
tenant or adapter is over a quota (core/quotas.py), before it takes a KV sequence or an adapter lease. The
request's adapter version is fixed at submit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from loraplex.server.core.adapter_runtime.leases import AdapterLease
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.calls import EngineFacts
from loraplex.server.core.engine_thread import EngineThread
from loraplex.server.core.errors import FailedPrecondition, InvalidRequest, Overloaded, ShuttingDown
from loraplex.server.core.fairness import AdmissionQueue, QueueKey
from loraplex.server.core.quota_config import QuotaSettings
from loraplex.server.core.quotas import QuotaBook, QuotaStatus
from loraplex.server.core.requests import Queues, Request, RequestStream
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.engine import Engine, FinishReason, SequenceState, TokenEvent
from loraplex.server.engine.lora import NO_ADAPTER

log = logging.getLogger(__name__)
NO_QUOTAS = QuotaSettings()
"""Every tenant of weight 1, no limits."""


@dataclass(eq=False)
class _Entry:
    seq: SequenceState
    lease: AdapterLease
    stream: RequestStream
    tenant: str
    key: QueueKey
    submitted_at: float
    cancelled: bool = False
    waiting: bool = True
    """In the admission queue (not running): at submit, and again after a preemption."""
    cached_tokens: int | None = None
    """Prompt tokens its first admission found in the prefix cache (None until admitted)."""
    computed_prompt: int = 0
    """Prompt tokens it has held (computed, or taken from the prefix cache) so far (`Scheduler._served_order`)."""
    admitted_at: float | None = None
    """time.monotonic() of its first admission (None until then)."""


@dataclass(eq=False)
class _StepPlan:
    """One step being planned: what it runs and what it has left."""

    budget: int
    """Tokens left of max_step_tokens."""
    over_share_budget: int
    """Prompt tokens left for requests held back (`Scheduler._held_back`): over_share_prefill_tokens less every
    prefill planned so far."""
    busy: set[int]
    """Adapter slots the step's sequences use."""
    batch: list[tuple[_Entry, int]] = field(default_factory=list)
    planned: set[_Entry] = field(default_factory=set)
    reserved: int = 0
    """KV blocks the planned sequences take in the step (the pool's free count does not know yet)."""
    skipped: set[str] = field(default_factory=set)
    """Adapters still loading: their requests keep their turn."""
    admission_closed: bool = False
    """A request could not be admitted (slots, KV): later ones do not overtake it this step."""
    provisional: list[tuple[str, int]] = field(default_factory=list)
    """(tenant, prompt tokens) of the plan's first admissions, counted in the tenants' shares while it admits
    (`Scheduler._admit`), taken back when it ends (`Scheduler._settle`): the steps charge what they compute."""


@dataclass(frozen=True)
class _PauseCeiling:
    """What a request submitted during a step must be below to pause it (`Scheduler._owed_before`)."""

    share_orders: dict[str, tuple[bool, float]]
    """Each tenant of the step's sequences: the smallest share order (`Scheduler._share_order`) of its sequences
    there as it will be once the step has served them (its counter plus the step's tokens of that tenant)."""


@dataclass
class SchedulerStats:
    """Counters since start (read without the lock: approximate while running)."""

    preempted: int = 0
    """Running sequences whose KV blocks were taken back (they recompute later)."""
    cancelled: int = 0
    """Requests ended by `RequestStream.cancel` before they finished."""


class Scheduler:
    """Owns `engine` and routes its events to request streams; see the module docstring for the policy."""

    def __init__(self, engine: Engine, adapters: AdapterManager, config: SchedulerConfig,
                 on_step: Callable[[int, float], None] | None = None,
                 on_prefix: Callable[[str, int, int], None] | None = None,
                 quotas: QuotaSettings = NO_QUOTAS) -> None:
        """Called on the scheduler thread (metrics): `on_step(sequences, seconds)` after each engine step,
        `on_prefix(adapter name, prompt tokens, cached tokens)` when a request is first admitted and the
        prefix cache was looked up. `quotas`: the tenants' and adapters' limits at start (`set_quotas`).
        The loop runs on the process's engine thread (core/engine_thread.py), where the engine is built too."""
        self.engine = engine
        self.adapters = adapters
        self.config = config
        self._on_step = on_step
        self._on_prefix = on_prefix
        self.stats = SchedulerStats()
        self.max_step_adapters = min(config.max_step_adapters or engine.num_slots, engine.num_slots)
        self._lock = threading.RLock()
        self._idle = False
        """Nothing runs and the last plan admitted nothing: sleep until `wake` (a submit, a cancel, a load)."""
        adapters.on_ready(self.wake)
        self._quotas = QuotaBook(quotas)
        self._waiting: AdmissionQueue[_Entry] = AdmissionQueue(
            config.fairness, lambda tenant: self._quotas.settings.limits_of(tenant).weight,
            lambda adapter: self._quotas.settings.adapter_weight(adapter))
        self._running: list[_Entry] = []
        self._pause_below: _PauseCeiling | None = None
        """The step in progress's pause ceiling (`_pause_ceiling`); None between steps."""
        self._owed = False
        """A request below the pause ceiling was submitted: the step pauses at its next layer."""
        self._accepting = True
        self._stopping = False
        self._thread = EngineThread.acquire()
        self._started = False
        self._iteration_queued = False
        """An iteration (`_iterate`) is queued on the engine thread, or runs."""
        self._stopped = threading.Event()
        """The loop has seen `close`: no iteration runs or will."""

    # -- event-loop side -------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; call on the asyncio loop that will iterate the returned stream.

        Raises AdapterNotFound, InvalidRequest (an ambiguous adapter version), Overloaded, ShuttingDown.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if self.num_waiting >= self.config.max_waiting:
                raise Overloaded(f"{self.num_waiting} requests are waiting (max_waiting={self.config.max_waiting})")
            tenant, adapter = request.tenant, request.adapter.name
            self._quotas.accept(tenant, adapter, len(request.prompt_ids))
            try:
                lease = self.adapters.acquire(request.adapter)
            except BaseException:
                self._quotas.ended(tenant, adapter, waiting=True)
                raise
            seq = self.engine.add_sequence(request.prompt_ids, request.sampling, version=lease.version,
                                           cache_salt=request.cache_salt, constraint=request.constraint)
            stream = RequestStream(self, lease, loop)
            batch = request.priority == "batch" or self._quotas.settings.is_batch(tenant, adapter)
            key = self._waiting.key("batch" if batch else "interactive", tenant, adapter)
            entry = _Entry(seq, lease, stream, tenant, key, time.monotonic())
            stream._entry = entry
            was_backlogged = self._waiting.backlogged(tenant)
            self._waiting.push(entry, key)
            if self._pause_below is not None and not was_backlogged and self._owed_before(entry, self._pause_below):
                self._owed = True  # the step in progress pauses at its next layer (_serve_owed)
            self._idle = False
            self._kick()
        return stream

    def engine_facts(self) -> EngineFacts:
        """What the engine serves, for read-outs (ServerInfo, prompt limits); fixed at start-up."""
        engine = self.engine
        return EngineFacts(engine.spec.model_type, engine.spec.vocab_size, engine.max_model_len, engine.num_slots,
                           engine.config.max_rank, engine.cache.block_size, engine.cache.num_blocks,
                           tuple(engine.spec.eos_token_ids))

    def kv_blocks(self) -> tuple[int, int]:
        """(blocks held by sequences, blocks in the pool) of the KV cache, now (any thread; approximate)."""
        cache = self.engine.cache
        return cache.num_blocks - cache.free_blocks, cache.num_blocks

    def prefix_cached_blocks(self) -> int:
        """KV blocks holding a cached prefix, held by sequences or reusable (any thread; approximate)."""
        return self.engine.cache.cached_blocks

    def queues(self) -> Queues:
        """The adapter reference of each running and each waiting request, now (any thread)."""
        with self._lock:
            return Queues([entry.lease.name for entry in self._running], [entry.lease.name for entry in self._waiting])

    def tenant_of(self, key_name: str) -> str:
        """The tenant of the API key named `key_name` under the quotas in force (any thread)."""
        return self._quotas.settings.tenant_of(key_name)

    def set_quotas(self, quotas: QuotaSettings) -> None:
        """Put new tenant and adapter limits in force now (any thread); accepted requests go on."""
        with self._lock:
            self._quotas.replace(quotas)
            self._idle = False
            self._kick()

    def tenant_status(self, tenant: str) -> QuotaStatus:
        """`tenant`'s limits and usage now (any thread)."""
        with self._lock:
            return self._quotas.tenant_status(tenant)

    def quota_statuses(self) -> tuple[list[QuotaStatus], list[QuotaStatus]]:
        """(tenants, adapters): each one's limits and usage now (QuotaBook.statuses; any thread)."""
        with self._lock:
            return self._quotas.statuses()

    @property
    def accepting(self) -> bool:
        """Whether submits are taken (False once the server drains)."""
        return self._accepting

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _cancel(self, entry: _Entry) -> None:
        with self._lock:
            if entry.cancelled or entry.seq.finished:
                return
            entry.cancelled = True
            if self._waiting.remove(entry, entry.key):  # waiting entries hold no KV blocks
                self._retire(entry, None)
            self._idle = False
            self._kick()

    def wake(self) -> None:
        """Run the loop again (any thread): something it waits for may have changed, such as a load ending."""
        with self._lock:
            self._idle = False
            self._kick()

    def start(self) -> None:
        with self._lock:
            self._started = True
            self._kick()

    def stop_accepting(self) -> None:
        """Refuse new submits (ShuttingDown); requests already queued or running go on."""
        with self._lock:
            self._accepting = False

    def close(self) -> None:
        """Stop the loop; requests still queued or running end with ShuttingDown. Closing again does nothing."""
        with self._lock:
            if self._stopping:
                return
            self._accepting = False
            self._stopping = True
            started = self._started
            self._kick()
        if started:
            self._stopped.wait()  # the step in progress, if any, has ended
        self._thread.release()
        with self._lock:
            for entry in [*self._running, *self._waiting]:
                self.engine.release(entry.seq)
                self._retire(entry, ShuttingDown("the server stopped before the request finished"))
            self._running.clear()
            self._waiting.clear()

    # -- engine thread ---------------------------------------------------------------------------

    def _kick(self) -> None:
        """Queue the loop's next iteration on the engine thread unless one is queued (under the lock)."""
        if self._started and not self._iteration_queued and not self._stopped.is_set():
            self._iteration_queued = True
            self._thread.submit(self._iterate).add_done_callback(_log_failure)

    def _iterate(self) -> None:
        """One turn of the loop, on the engine thread: plan a step and run it; queue the next turn while there is
        work (running sequences, or something changed since the last plan), else wait for a `_kick`."""
        with self._lock:
            self._iteration_queued = False
            if self._stopping:
                self._stopped.set()
                return
            if not self._running and self._idle:
                return
            self._reap_cancelled()
            self.adapters.install_warm(self._busy_slots())
            batch = self._plan()
            self._idle = not batch and not self._running
            self._pause_below, self._owed = self._pause_ceiling(batch), False
        try:
            if batch:
                self._execute(batch, pausable=self._pause_below is not None)
        finally:
            with self._lock:
                self._pause_below = None
                if self._running or not self._idle or self._stopping:
                    self._kick()

    def _execute(self, batch: list[tuple[_Entry, int]], pausable: bool) -> None:
        """Run one step over `batch` and route its events; a failed step fails its requests, not the server.
        `pausable`: the step pauses between layers for requests owed service first (`_serve_owed`), whose time
        `on_step` does not count in this step's."""
        began, paused = time.perf_counter(), [0.0]

        def between_layers() -> None:
            if self._owed:
                pause_began = time.perf_counter()
                self._serve_owed()
                paused[0] += time.perf_counter() - pause_began

        try:
            events = self.engine.step([(entry.seq, count) for entry, count in batch],
                                      between_layers if pausable else None)
        except Exception as exc:
            self._fail(batch, exc)
            return
        if self._on_step is not None:
            self._on_step(len(batch), time.perf_counter() - began - paused[0])
        with self._lock:
            self._route(batch, events)

    def _serve_owed(self) -> None:
        """While a step is paused: admit the waiting requests below its pause ceiling (`_pause_ceiling`) and run
        their prompts whole in a step of their own; their first tokens go out before the paused step resumes."""
        with self._lock:
            self._owed = False
            plan = _StepPlan(self.config.max_step_tokens, self.config.max_step_tokens, self._busy_slots())
            ceiling = self._pause_below
            self._admit(plan, None, leading_only=False, stop=lambda entry: not self._owed_before(entry, ceiling))
            self._settle(plan)
        if plan.batch:
            self._execute(plan.batch, pausable=False)

    def _fail(self, batch: list[tuple[_Entry, int]], exc: Exception) -> None:
        """A failed step fails its own requests, not the server."""
        log.exception("engine step failed")
        with self._lock:
            for entry, _ in batch:
                self._running.remove(entry)
                self.engine.release(entry.seq)
                self._retire(entry, exc)

    def _reap_cancelled(self) -> None:
        for entry in [e for e in self._running if e.cancelled]:
            self._running.remove(entry)
            self.engine.release(entry.seq)
            self._retire(entry, None)

    def _blocks_needed(self, seq: SequenceState, count: int) -> int:
        return max(0, self.engine.cache.blocks_needed(seq.num_computed + count) - len(seq.block_table))

    def _plan(self) -> list[tuple[_Entry, int]]:
        plan = _StepPlan(self.config.max_step_tokens, self.config.over_share_prefill_tokens, self._busy_slots())
        leader = self._leader()
        held_back = [e for e in self._running if self._held_back(e, leader)]
        self._schedule_running(plan, [e for e in self._running if e not in held_back], leader)
        self._admit(plan, leader, leading_only=True)
        if not any(count > 1 for _, count in plan.batch):  # no leading prompt waits on this step's length
            plan.over_share_budget = plan.budget  # and one that comes during it pauses it (`_pause_ceiling`)
        self._schedule_running(plan, held_back, leader)
        self._admit(plan, leader, leading_only=False)
        self._settle(plan)
        return plan.batch

    def _settle(self, plan: _StepPlan) -> None:
        """Take back the plan's provisional charges (`_StepPlan.provisional`)."""
        for tenant, tokens in plan.provisional:
            self._waiting.charge(tenant, -tokens)

    def _pause_ceiling(self, batch: list[tuple[_Entry, int]]) -> _PauseCeiling | None:
        """With fairness on, what a request must be below to pause the step (None when fairness is off: nothing
        pauses it): each tenant of the step at its share order once the step has served it."""
        if not self._waiting.fair:
            return None
        tokens: dict[str, int] = {}
        for entry, count in batch:
            tokens[entry.tenant] = tokens.get(entry.tenant, 0) + count
        share_orders: dict[str, tuple[bool, float]] = {}
        for entry, _ in batch:
            batch_class, counter = self._share_order(entry)
            order = batch_class, counter + tokens[entry.tenant] / self._quotas.settings.limits_of(entry.tenant).weight
            share_orders[entry.tenant] = min(order, share_orders.get(entry.tenant, order))
        return _PauseCeiling(share_orders)

    def _owed_before(self, entry: _Entry, ceiling: _PauseCeiling) -> bool:
        """Whether `entry` is owed service before the step in progress: its tenant is no further over its share (its
        priority class, then its counter: `_share_order`) than any other tenant of the step's sequences will be once
        the step has served them (`_pause_ceiling`), when there is one: the step is not to put them further ahead
        while it waits. Its own tenant's sequences in the step do not count: a light tenant's next request does not
        wait on its previous ones' decodes. With one tenant active nothing pauses; a request arriving while its tenant
        already has some waiting does not pause a step either (`submit`): they are admitted in their turn."""
        order = self._share_order(entry)
        others = [share for tenant, share in ceiling.share_orders.items() if tenant != entry.tenant]
        return bool(others) and order <= min(others)

    def _leader(self) -> tuple[bool, float] | None:
        """The share order (`_share_order`) of the request furthest below its share among those running or
        waiting: requests above it are held back to `over_share_prefill_tokens` (None when fairness is off)."""
        if not self._waiting.fair:
            return None
        return min(map(self._share_order, [*self._running, *self._waiting]), default=None)

    def _held_back(self, entry: _Entry, leader: tuple[bool, float] | None) -> bool:
        """Whether `entry`'s prompt goes in chunks of the over-share budget this step (a decode never is)."""
        return leader is not None and entry.seq.num_pending > 1 and self._share_order(entry) > leader

    def _count(self, plan: _StepPlan, entry: _Entry, held_back: bool) -> int:
        """Tokens `entry` may compute in the step being planned."""
        count = min(entry.seq.num_pending, plan.budget)
        return min(count, plan.over_share_budget) if held_back else count

    @staticmethod
    def _take(plan: _StepPlan, entry: _Entry, count: int, need: int, held_back: bool) -> None:
        """Put `count` tokens of `entry` (taking `need` more KV blocks) in the step."""
        if held_back or count > 1:  # the least-served's prefills use up the held-back ones' budget first
            plan.over_share_budget = max(0, plan.over_share_budget - count)
        plan.batch.append((entry, count))
        plan.planned.add(entry)
        plan.reserved += need
        plan.budget -= count

    def _schedule_running(self, plan: _StepPlan, entries: list[_Entry], leader: tuple[bool, float] | None) -> None:
        """Running sequences' next tokens, decodes first (stable), preempting under KV pressure (module docstring)."""
        cache = self.engine.cache
        for entry in sorted(entries, key=lambda e: e.seq.num_pending > 1):
            if entry not in self._running:  # preempted for an older sequence in this plan
                continue
            held_back = self._held_back(entry, leader)
            count = self._count(plan, entry, held_back)
            if count == 0:
                continue
            need = self._blocks_needed(entry.seq, count)
            while need > cache.free_blocks - plan.reserved:
                victim = max((e for e in reversed(self._running) if e not in plan.planned), key=self._share_order)
                self._preempt(victim)  # frees the blocks only it held
                if victim is entry:
                    break
            if entry in self._running:
                self._take(plan, entry, count, need, held_back)

    def _admit(self, plan: _StepPlan, leader: tuple[bool, float] | None, leading_only: bool,
               stop: Callable[[_Entry], bool] | None = None) -> None:
        """Waiting requests in admission order while the limits allow (module docstring); `leading_only`: stop
        at the first one above the leader's share order; `stop`: at the first one it holds for."""
        cache = self.engine.cache
        while plan.budget > 0 and not plan.admission_closed and len(self._running) < self.config.max_running:
            key = next((key for key in self._waiting.candidates() if key.adapter not in plan.skipped), None)
            if key is None:
                return
            entry = self._waiting.head(key)
            if leading_only and leader is not None and self._share_order(entry) > leader:
                return
            if stop is not None and stop(entry):
                return
            slot = self.adapters.resident_slot(entry.lease)
            resident = slot is not None and slot != NO_ADAPTER
            new_slot = slot != NO_ADAPTER and slot not in plan.busy
            if new_slot and len(plan.busy) >= self.max_step_adapters:
                plan.admission_closed = True
                return
            if slot is None:
                if not self.adapters.can_place(plan.busy):
                    plan.admission_closed = True
                    return
                try:
                    slot = self.adapters.slot_for(entry.lease, plan.busy)
                except FailedPrecondition as error:  # its version cannot be loaded: fail it, go on
                    self._waiting.pop(key)
                    self._retire(entry, error)
                    continue
                if slot is None:
                    plan.skipped.add(key.adapter)
                    continue
            cached = self.engine.reuse_prefix(entry.seq)  # holds its cached blocks: out of the free count
            held_back = self._held_back(entry, leader)  # before its admission charges its prompt
            count = self._count(plan, entry, held_back)
            need = self._blocks_needed(entry.seq, count)
            if count == 0 or need > cache.free_blocks - plan.reserved:
                self.engine.release(entry.seq)  # it keeps its turn and holds nothing
                plan.admission_closed = True
                return
            self._waiting.pop(key)
            if entry.cached_tokens is None:  # its first admission: the next ones see its prompt in its share
                plan.provisional.append((entry.tenant, len(entry.seq.prompt_ids)))
                self._waiting.charge(entry.tenant, len(entry.seq.prompt_ids))
            self._admitted(entry, cached)
            if resident:
                self.adapters.count_device_hit()
            entry.seq.slot = slot
            self._running.append(entry)
            if slot != NO_ADAPTER:
                plan.busy.add(slot)
            self._take(plan, entry, count, need, held_back)

    def _admitted(self, entry: _Entry, cached: int) -> None:
        """Account an admission; the first one (not after a preemption) also records what the prefix cache gave
        it."""
        entry.waiting = False
        first = entry.cached_tokens is None
        prompt_tokens = len(entry.seq.prompt_ids)
        self._quotas.admitted(entry.tenant, entry.key.adapter, prompt_tokens if first else None)
        if not first:
            return
        entry.cached_tokens, entry.admitted_at = cached, time.monotonic()
        if self._on_prefix is not None and entry.seq.chain is not None:
            self._on_prefix(entry.lease.name, prompt_tokens, cached)

    def _charge_prompt(self, entry: _Entry) -> None:
        """After a step over `entry`: charge its tenant's share the prompt tokens it now holds (computed, or taken
        from the prefix cache) that were not charged yet. A prompt is charged as it is served and never twice (not
        when recomputed after a preemption): while its request is prefilled its tenant's counter is where it was,
        so neither its own pausing (`_owed_before`) nor its prompt's place in the step (`_leader`) is taken away
        by the service it is being given."""
        held = min(entry.seq.num_computed, len(entry.seq.prompt_ids))
        if held > entry.computed_prompt:
            self._waiting.charge(entry.tenant, held - entry.computed_prompt)
            entry.computed_prompt = held

    def _share_order(self, entry: _Entry) -> tuple[bool, float]:
        """How far `entry` is over its share: batch above interactive, then its tenant's virtual token counter.
        Preempted first: the largest; prefilled whole: the smallest (`_leader`)."""
        return entry.key.priority == "batch", self._waiting.share_order(entry.tenant)

    def _busy_slots(self) -> set[int]:
        """Slots running sequences use (never evicted while they do)."""
        return {entry.seq.slot for entry in self._running} - {NO_ADAPTER}

    def _preempt(self, entry: _Entry) -> None:
        self._running.remove(entry)
        self.engine.release(entry.seq)
        self.stats.preempted += 1
        entry.waiting = True
        self._quotas.requeued(entry.tenant, entry.key.adapter)
        self._waiting.push(entry, entry.key, front=True)

    def _route(self, batch: list[tuple[_Entry, int]], events: list[TokenEvent]) -> None:
        by_seq = {entry.seq.seq_id: entry for entry, _ in batch}
        for entry, _ in batch:
            self._charge_prompt(entry)
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, TokenEvent]]] = {}
        for event in events:
            entry = by_seq[event.seq_id]
            if entry.cancelled:  # cancelled while its step ran: deliver nothing more
                continue
            if event.finish_reason is FinishReason.DEAD_END:  # this request fails, the others go on
                self._running.remove(entry)
                self._retire(entry, InvalidRequest("constraint", "the model's vocabulary cannot continue the "
                                                   "text it allows after the tokens generated so far"))
                continue
            deliveries.setdefault(entry.stream._loop, []).append((entry.stream, event))
            self._waiting.charge(entry.tenant, 1)
            self._quotas.generated(entry.tenant, entry.key.adapter)
            if event.finish_reason is not None:
                self._running.remove(entry)
                self.adapters.release(entry.lease)
                self._quotas.ended(entry.tenant, entry.key.adapter, waiting=False)
        for loop, items in deliveries.items():
            _post(loop, _deliver, items)

    def _retire(self, entry: _Entry, error: BaseException | None) -> None:
        """End an unfinished request: release its adapter and close its stream (with `error`, if any)."""
        self.adapters.release(entry.lease)
        self._quotas.ended(entry.tenant, entry.key.adapter, entry.waiting)
        if entry.cancelled:
            self.stats.cancelled += 1
        _post(entry.stream._loop, entry.stream._put, error)


def _log_failure(loop_done: Future[None]) -> None:
    if not loop_done.cancelled() and loop_done.exception() is not None:
        log.error("a scheduler iteration failed (the next one runs when there is work)", exc_info=loop_done.exception())


def _post(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback(*args)` on `loop`; a closed loop has no reader left, so nothing is lost."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _deliver(deliveries: list[tuple[RequestStream, TokenEvent]]) -> None:
    for stream, event in deliveries:
        stream._put(event)
