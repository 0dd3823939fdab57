"""Adapters from the registry to the engine's slots: what the scheduler and the admin API call.

Tiers, nearest first: device slots (`DeviceSlots`, engine.num_slots of them) <- host memory
(`HostCache`, an LRU within a byte budget) <- the store on disk (`AdapterStore`, versions by digest).

One request's adapter, step by step:
  1. `acquire` (at submit): resolve "NAME" or "NAME@VERSION" in the registry and count one use of
     that version; the lease fixes the version, so a later hot-swap of NAME does not change it.
  2. `slot_for` (scheduler thread, when the request is admitted): the slot holding the version; else
     copy it from the host cache into an empty or least recently used idle slot; else start loading it
     from the store on a worker thread and answer None: the request keeps waiting while others run,
     and the scheduler is woken (`wake`) when the load ends.
  3. `release` (when the request ends): one use less. A version no longer registered and no longer
     used leaves every tier and its files are deleted.
Counted uses are what make `unload` refuse (or wait); the busy slots the scheduler passes in are what
keep eviction away from running sequences; pinned names keep their current version in a slot.

The parts, one module each: `state` (the shared bookkeeping and its locks), `leases`, `placement`,
`loader`, `admin` (operations), `status` (read-outs) and `cards` (the cards' serving defaults).
"""

from __future__ import annotations

from loraplex.server.core.adapter_runtime.admin import AdminOperations
from loraplex.server.core.adapter_runtime.cards import CardDefaults
from loraplex.server.core.adapter_runtime.leases import Leases
from loraplex.server.core.adapter_runtime.loader import Loader
from loraplex.server.core.adapter_runtime.placement import Placement
from loraplex.server.core.adapter_runtime.status import StatusReadouts


class AdapterManager(Leases, Placement, Loader, AdminOperations, StatusReadouts, CardDefaults):
    """Names, versions and tiers of the adapters served by one engine (see the module docstring)."""
