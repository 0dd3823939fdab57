"""Everything about adapters: format, validation, registry, store, cache tiers, sources, training."""

from loraplex.server.logs import filter_bitsandbytes_kernel_hub_warning

filter_bitsandbytes_kernel_hub_warning()  # before peft, transformers or bnb_compat import bitsandbytes
