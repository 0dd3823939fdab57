"""The OpenAI-style HTTP API: routes, the OpenAI protocol, stop strings, and the HTTP server plumbing."""
