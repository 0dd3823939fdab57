"""Everything about adapters: format, validation, registry, store, cache tiers, sources, training."""
