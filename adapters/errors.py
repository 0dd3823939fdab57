"""Why an adapter folder is refused: one class per kind of problem, each message saying what to change.

Every class is an `AdapterFormatError`, so a caller that only needs "refused, and why" catches that;
the admin API maps them all to INVALID_ARGUMENT / FAILED_PRECONDITION and shows the message as is.
"""

from __future__ import annotations

MAX_SHOWN_CHARS = 64
"""Most characters of a caller's value that an error message echoes (see `shown`)."""


def shown(value: str) -> str:
    """A caller's value as an error message echoes it: quoted (repr), cut to MAX_SHOWN_CHARS characters with
    an ellipsis, so that no message grows with the input (gRPC carries messages in size-limited metadata).
    Every refusal that echoes a caller's string goes through here."""
    return repr(value if len(value) <= MAX_SHOWN_CHARS else value[:MAX_SHOWN_CHARS] + "\u2026")


class AdapterFormatError(ValueError):
    """The folder is not a LoRA adapter loraplex can serve; the message says what to change."""


class UnsupportedFeature(AdapterFormatError):
    """A PEFT feature the engine does not apply (DoRA, bias, modules_to_save, non-LoRA types, pickles)."""


class CorruptAdapter(AdapterFormatError):
    """A file is unreadable: invalid JSON, or a corrupt or truncated safetensors file."""


class UnknownTargetModule(AdapterFormatError):
    """The adapter targets modules that are not LoRA-able projections of a Llama-family decoder."""


class TensorShapeError(AdapterFormatError):
    """A LoRA tensor is not a matrix, lacks its other half, or its rank disagrees with its pair."""


class NonFiniteWeights(AdapterFormatError):
    """A tensor holds NaN or infinity (a diverged training run)."""


class TensorDtypeError(AdapterFormatError):
    """A tensor is not float32, float16 or bfloat16, or the tensors mix dtypes."""


class BaseModelMismatch(AdapterFormatError):
    """The adapter was trained for another base model (layers, projection shapes, or base digest)."""


class RankTooHigh(AdapterFormatError):
    """A LoRA rank is above the server's configured maximum."""


class AdapterTooLarge(AdapterFormatError):
    """The adapter's files are larger than the configured limit."""
