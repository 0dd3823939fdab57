"""The scheduler's batching limits, fixed at start-up (settings.scheduler)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SchedulerConfig(BaseModel):
    """Batching limits, fixed at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_running: int = Field(default=64, ge=1, le=4096)
    """Most sequences in one engine step (the batch size)."""
    max_waiting: int = Field(default=256, ge=0, le=1_000_000)
    """Most requests waiting for admission; a submit beyond it is refused (RESOURCE_EXHAUSTED)."""
    max_step_tokens: int = Field(default=512, ge=1, le=1_048_576)
    """Token budget of one engine step (decodes plus prefill chunks)."""
    max_step_adapters: int | None = Field(default=None, ge=1, le=4096)
    """Most distinct adapters in one engine step; unset means engine.num_slots (the device slots), and
    it never exceeds them."""
    over_share_prefill_tokens: int = Field(default=64, ge=1, le=1_048_576)
    """With fairness on, most prompt tokens one step prefills in all when it prefills the prompt of a request of
    the tenant furthest below its share (or of an interactive request while batch ones run): that prompt goes
    first, bounded only by max_step_tokens, and the other tenants' prompts get what it leaves of this, so its
    first token waits behind a short step at most. In other steps they are not held back: a request owed service
    that arrives meanwhile pauses the step between layers instead (scheduler.py). With one tenant active (or
    fairness off) nothing is held back."""
    fairness: bool = True
    """Admit by priority class and weighted fair queuing over tenants (core/fairness.py), then round-robin
    across each tenant's adapters; off admits round-robin across adapters alone, whoever sends the requests
    (quotas still refuse what is over a limit)."""

