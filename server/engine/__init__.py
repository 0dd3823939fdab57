"""The engine: one NF4 base model with multi-LoRA slot buffers, a paged KV cache and a sampler.

Nothing in here knows about protobuf, HTTP, tokenization text or files on disk: it takes token
ids and tensors and returns token ids.
"""

from loraplex.server.engine.engine import Engine, EngineConfig
from loraplex.server.engine.sequence import (
    MAX_TOP_LOGPROBS,
    FinishReason,
    InvalidSamplingParameter,
    PromptLogprob,
    SamplingParams,
    SequenceState,
    TokenConstraint,
    TokenEvent,
)
from loraplex.server.engine.spec import ModelSpec

__all__ = [
    "MAX_TOP_LOGPROBS",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "InvalidSamplingParameter",
    "ModelSpec",
    "PromptLogprob",
    "SamplingParams",
    "SequenceState",
    "TokenConstraint",
    "TokenEvent",
]
