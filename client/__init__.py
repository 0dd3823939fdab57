"""Python client (sync + asyncio, streaming) and the `loraplex` CLI."""
