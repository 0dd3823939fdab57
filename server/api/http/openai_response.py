"""The OpenAI protocol's answers: rendered choices (whole messages or streamed deltas), logprobs in the
completions or chat shape, usage, the adapter version that answered, and refusals as
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from loraplex.server.api.http.openai_request import Answer
from loraplex.server.api.http.stops import Piece
from loraplex.server.api.http.tool_calls import rendered_reply
from loraplex.server.core import errors
from loraplex.server.core.calls import GeneratedToken
from loraplex.server.core.errors import AdapterNotFound, InvalidRequest, RequestError

HTTP_ERRORS: dict[type[RequestError], tuple[int, str]] = {
    errors.InvalidRequest: (400, "invalid_request_error"),
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.AdapterNotFound: (404, "not_found_error"),
    errors.TooLarge: (413, "invalid_request_error"),
    errors.Overloaded: (429, "rate_limit_error"),
    errors.ShuttingDown: (503, "service_unavailable"),
    errors.GenerationFailed: (500, "server_error"),
}


def render_choice(answer: Answer, index: int, piece: Piece, final: bool, offset: int = 0) -> dict:
    """One rendered choice: a whole message (`final`, unary answers) or a streamed delta."""
    logprobs = _logprobs(answer, piece, offset) if answer.calls[index].logprobs else None
    if not answer.chat:
        return {"index": index, "text": piece.text, "finish_reason": piece.finish_reason, "logprobs": logprobs}
    reason, fields = piece.finish_reason, {"content": piece.text}
    if answer.tool_use.parse and reason is not None:  # a whole reply (tool_calls.whole when streamed)
        fields, reason = rendered_reply(piece.text, answer.tool_use.tools, reason)
        if not final and "tool_calls" in fields:
            fields["tool_calls"] = [{"index": i, **call} for i, call in enumerate(fields["tool_calls"])]
    content = {"message": {"role": "assistant", **fields}} if final else {"delta": fields if piece.text else {}}
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": reason}


def served_by(piece: Piece) -> dict[str, str]:
    """loraplex's field next to the choices (the OpenAI SDKs keep it as an extra): `adapter_version`, the full
    content digest of the adapter version that generated the choice ("" for the base model), on the piece that
    ends it; absent on the others, when a stop string ended the generation before its last token, and on an
    echoed prompt alone (max_tokens 0: its tokens are the prompt's)."""
    last = piece.tokens[-1] if piece.tokens else None
    if not isinstance(last, GeneratedToken) or last.completion is None:
        return {}
    return {"adapter_version": last.completion.adapter_version}


def _logprobs(answer: Answer, piece: Piece, offset: int) -> dict:
    """The piece's tokens in OpenAI's logprobs shape: completions' parallel lists, or chat's content list."""
    tokens = piece.tokens
    if not answer.chat:  # completions' shape: parallel lists
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token.text)
        top = [{alt.piece: alt.logprob for alt in token.top_logprobs} for token in tokens]
        return {"tokens": [t.piece for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top if answer.calls[0].top_logprobs else None, "text_offset": offsets}

    def entry(piece_text: str, logprob: float) -> dict:
        return {"token": piece_text, "logprob": logprob, "bytes": list(piece_text.encode())}

    return {"content": [{**entry(t.piece, t.logprob), "top_logprobs": [entry(a.piece, a.logprob)
                                                                        for a in t.top_logprobs]}
                        for t in tokens]}


def usage(lasts: Sequence[Piece]) -> dict[str, int | dict[str, int]]:
    """OpenAI's usage of an answer from each choice's last piece: the prompt (and its tokens the prefix cache
    held) counted once, as the first choice saw it; completion tokens summed over the choices."""
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": lasts[0].cached_tokens}}


def error_body(error: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) of a refusal; anything else is 500 without details (the log has them)."""
    status, kind = HTTP_ERRORS.get(type(error), (500, "server_error"))
    message = str(error) if isinstance(error, RequestError) else "internal error (see the server log)"
    param = error.field if isinstance(error, InvalidRequest) else None
    code = "model_not_found" if isinstance(error, AdapterNotFound) else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def error_response(request: HttpRequest, error: Exception) -> Response:
    """The refusal's JSON; an Overloaded one (429) also says when to retry."""
    status, body = error_body(error)
    return JSONResponse(body, status, retry_after(error))


def retry_after(error: Exception) -> dict[str, str] | None:
    """The headers of a refusal: Retry-After (in seconds) for an Overloaded one (429), else none."""
    return {"Retry-After": str(error.retry_after_s)} if isinstance(error, errors.Overloaded) else None
