"""Adapters from the registry to the engine's slots, for the scheduler and the admin API."""
