"""Transports: the gRPC services and their interceptor, the OpenAI-style HTTP shim, the remote backend.

Each decodes its wire format into the core's neutral calls and encodes what comes back; no tensors."""
