"""`client.codec`: the one wire codec of the client and the server (requests, tokens, completions, the
structured INVALID_ARGUMENT metadata)."""

from __future__ import annotations

from loraplex.client.codec import (
    PRIORITY_OF,
    RETRY_AFTER_KEY,
    decode_completion,
    decode_token,
    encode_completion,
    encode_request,
    encode_token,
    invalid_argument,
    invalid_argument_metadata,
    retry_after,
)
from loraplex.client.records import Completion, FinishReason, Token, TokenLogprob
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import tenants_pb2


def test_a_request_sets_only_the_sampling_fields_given() -> None:
    request = encode_request("hi", "support@3f2a9c01", max_new_tokens=4, sampling={"temperature": 0.5, "seed": 7})
    assert request.WhichOneof("input") == "text" and request.adapter == "support@3f2a9c01"
    assert request.sampling.HasField("temperature") and request.sampling.seed == 7
    assert not request.sampling.HasField("top_p") and request.stopping.max_new_tokens == 4
    assert not encode_request([1, 2]).stopping.HasField("max_new_tokens")


def test_each_prompt_kind_has_its_oneof() -> None:
    assert list(encode_request([5, 6]).token_ids.ids) == [5, 6]
    messages = encode_request([{"role": "user", "content": "hello"}]).messages.messages
    assert [(m.role, m.content) for m in messages] == [("user", "hello")]


def test_a_token_survives_the_wire_and_logprob_stays_optional() -> None:
    token = Token(7, "a", -0.25, "a", (TokenLogprob(7, "a", -0.25), TokenLogprob(8, "b", -2.0)))
    assert decode_token(pb.Token.FromString(encode_token(token).SerializeToString())) == token
    assert decode_token(encode_token(Token(3, "", None))).logprob is None


def test_a_completion_survives_the_wire() -> None:
    completion = Completion(FinishReason.LENGTH, 3, 2, "support", "f" * 64, cached_tokens=2)
    encoded = encode_completion(completion)
    assert encoded.finish_reason == pb.FINISH_REASON_LENGTH and decode_completion(encoded) == completion
    assert encode_completion(None) is None


def test_priority_is_unset_unless_asked_and_retry_after_reads_whole_seconds() -> None:
    assert encode_request("hi").priority == tenants_pb2.PRIORITY_UNSPECIFIED
    assert encode_request("hi", priority="batch").priority == tenants_pb2.PRIORITY_BATCH
    assert PRIORITY_OF[encode_request("hi", priority="interactive").priority] == "interactive"
    assert retry_after((("x-request-id", "abc"), (RETRY_AFTER_KEY, "3"))) == 3
    assert retry_after((("x-request-id", "abc"),)) is None and retry_after(((RETRY_AFTER_KEY, "soon"),)) is None


def test_invalid_argument_metadata_round_trips_and_is_absent_otherwise() -> None:
    metadata = (("x-request-id", "abc"), *invalid_argument_metadata("sampling.top_p", "must lie in (0, 1] \u2014 1.5"))
    assert invalid_argument(metadata) == ("sampling.top_p", "must lie in (0, 1] \u2014 1.5")
    assert invalid_argument((("x-request-id", "abc"),)) is None
    assert invalid_argument(None) is None
