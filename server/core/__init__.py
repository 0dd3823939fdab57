"""The generation core (auth, limits, tokenizing, detokenizing, per-request metrics), the scheduler (the
engine's only owner) and the adapter runtime (leases, slot placement, loading, admin operations)."""
