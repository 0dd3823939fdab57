"""The serving process: engine, model files, (later) scheduler, transports, metrics, config."""

from loraplex.server.logs import filter_bitsandbytes_kernel_hub_warning

filter_bitsandbytes_kernel_hub_warning()  # before any server module imports bitsandbytes
