"""Logging: text or JSON lines, and the request id that ties a request's log lines to its answer.

Each transport takes the caller's `x-request-id` (HTTP header or gRPC metadata; at most 64 characters of
[A-Za-z0-9._:-]) or makes one up, sets `REQUEST_ID` for the request's task, and returns it to the caller
(HTTP response header `x-request-id`, gRPC trailing metadata `x-request-id`). Every log record gets it as
`request_id`; JSON lines carry it as a field, and a record's `extra={"fields": {...}}` as more fields.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

REQUEST_ID: ContextVar[str | None] = ContextVar("loraplex_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(given: str | None) -> str:
    """`given` if it is a usable request id, else a new random one."""
    return given if given is not None and _VALID_ID.fullmatch(given) else uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id (when set),
    the record's `fields`, and the traceback (`exception`) if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """The root logger at `level`, writing text lines (request id in brackets) or JSON lines to stderr."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""What bitsandbytes logs on import on CPUs with AVX512-BF16 when it cannot fetch a fused CPU 4-bit GEMM from
the Hugging Face kernel hub (the `kernels` package, which downloads code at run time), with the advice to
`pip install kernels`. loraplex never runs that kernel: the server multiplies NF4 weights with its own kernels
and the training sidecar keeps bitsandbytes on its portable path (adapters/bnb_compat.py)."""


def _not_kernel_hub_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BNB_KERNEL_HUB_WARNING)


def filter_bitsandbytes_kernel_hub_warning() -> None:
    """Drop BNB_KERNEL_HUB_WARNING, and only it, from bitsandbytes' CPU backend logger (idempotent). Called by
    the `loraplex.server` and `loraplex.adapters` packages before any of their modules imports bitsandbytes
    (directly, or through peft or transformers)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if _not_kernel_hub_warning not in logger.filters:
        logger.addFilter(_not_kernel_hub_warning)
