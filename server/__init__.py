"""The serving process: engine, model files, (later) scheduler, transports, metrics, config."""
