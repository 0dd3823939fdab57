"""A seeded fuzz of both wire formats against one real server on the tiny model: mutated OpenAI JSON bodies
(fields dropped, retyped, set to extreme or malformed values; bytes cut or flipped) and mutated gRPC
GenerateRequests (fields set to extreme values; serialized bytes cut, flipped, extended). Every answer must
be a success or a client error (2xx/4xx; never 5xx, UNKNOWN or INTERNAL), and a normal greedy request
afterwards gives the same tokens as before."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
from collections import Counter

import grpc

from loraplex.v1 import generation_pb2 as pb
from serving_support import serving, with_chat_template

SEED, HTTP_CASES, GRPC_CASES = 1234, 250, 250
VALUES = [None, True, False, 0, 1, -1, 2, 7, 17, 2**31, -(2**63), 2**64, 0.5, -0.0, 1e308, -1e308, "", "x",
          "hello world", "\ud800", "a" * 5000, [], [1, 2], [-1], [2**40], ["x"], [None], {}, {"include_usage": 1},
          {"role": "user"}, [{"role": "user", "content": 5}], [{"role": "user", "content": "hi"}]]
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "\"\\ud800\"", "\"\\udfff x\"", "[[[[[]]]]]"]
BODY_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "stop", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "stream",
               "stream_options", "ignore_eos", "unknown_field"]
GOOD = {"completions": {"model": "a_r4_qv", "prompt": "hello world", "max_tokens": 3},
        "chat/completions": {"model": "b_r16_all", "messages": [{"role": "user", "content": "hello"}],
                             "max_tokens": 3}}
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE}


def mutated_body(rng: random.Random, good: dict) -> bytes:
    """`good` with one to three fields dropped, retyped or set to odd values, sometimes as odd raw JSON."""
    body = dict(good)
    raw: dict[str, str] = {}
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(BODY_FIELDS)
        action = rng.random()
        if action < 0.15:
            body.pop(field, None)
        elif action < 0.3:
            raw[field] = rng.choice(RAW_VALUES)
        else:
            body[field] = rng.choice(VALUES)
    text = json.dumps({k: v for k, v in body.items() if k not in raw}, ensure_ascii=rng.random() < 0.5)
    for field, value in raw.items():
        text = text[:-1] + f', "{field}": {value}}}'
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:  # cut or flip bytes
        data = data[:rng.randrange(len(data))] if rng.random() < 0.5 else bytes(
            b ^ 0xFF if rng.random() < 0.02 else b for b in data)
    return data


def mutated_request(rng: random.Random) -> bytes:
    """A valid GenerateRequest with one or two fields set to odd values, its serialized bytes sometimes cut,
    flipped or extended."""
    request = pb.GenerateRequest(adapter="a_r4_qv", token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                 stopping=pb.StoppingCriteria(max_new_tokens=3))
    for _ in range(rng.randint(1, 2)):
        rng.choice(MUTATIONS)(rng, request)
    data = request.SerializeToString()
    action = rng.random()
    if action < 0.15 and data:
        data = data[:rng.randrange(len(data))]
    elif action < 0.3:
        data = bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.1 else b for b in data)
    elif action < 0.4:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return data


def _text(rng: random.Random, request: pb.GenerateRequest) -> None:
    request.text = rng.choice(["", "hello", "x" * 10000, "\u00e9\u65e5"])
    request.chat = rng.random() < 0.3


def _token_ids(rng: random.Random, request: pb.GenerateRequest) -> None:
    request.token_ids.ids[:] = rng.choice([[], [95], [96], [2**32 - 1], list(range(90)) * 3])


def _messages(rng: random.Random, request: pb.GenerateRequest) -> None:
    request.messages.messages.add(role=rng.choice(["user", ""]), content=rng.choice(["", "hi"]))


def _adapter(rng: random.Random, request: pb.GenerateRequest) -> None:
    request.adapter = rng.choice(["", "missing", "a_r4_qv@zz", "a_r4_qv@0123456789", "a" * 300, "../x", "@"])


def _stopping(rng: random.Random, request: pb.GenerateRequest) -> None:
    request.stopping.max_new_tokens = rng.choice([0, 1, 8, 9, 2**31 - 1])
    request.stopping.stop_token_ids.extend(rng.choice([[], [0], [95], [96], [2**32 - 1]]))
    request.stopping.ignore_eos = rng.random() < 0.5


def _logprobs(rng: random.Random, request: pb.GenerateRequest) -> None:
    request.logprobs = rng.random() < 0.5
    request.top_logprobs = rng.choice([0, 1, 20, 21, 2**31 - 1])


def _sampling(rng: random.Random, request: pb.GenerateRequest) -> None:
    name = rng.choice(["temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                       "top_k", "seed"])
    if name == "top_k":
        request.sampling.top_k = rng.choice([0, 1, 2**31 - 1, 2**32 - 1])
    elif name == "seed":
        request.sampling.seed = rng.choice([0, 2**64 - 1])
    else:
        setattr(request.sampling, name, rng.choice([0.0, -1.0, 0.5, 2.0, 1e30, float("nan"), float("inf")]))


MUTATIONS = [_text, _token_ids, _messages, _adapter, _stopping, _logprobs, _sampling]


def post_raw(connection: http.client.HTTPConnection, path: str, data: bytes) -> int:
    connection.request("POST", f"/v1/{path}", data, {"content-type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def greedy(channel: grpc.Channel) -> list[int]:
    generate = channel.unary_unary("/loraplex.v1.Generation/Generate",
                                   response_deserializer=pb.GenerateResponse.FromString)
    request = pb.GenerateRequest(adapter="a_r4_qv", token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                 stopping=pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True))
    return [token.id for token in generate(request.SerializeToString(), timeout=30).tokens]


def fuzz(http_port: int, grpc_port: int) -> tuple[list[int], list[int], list, list, Counter]:
    """(greedy tokens before, after, failing HTTP cases, failing gRPC cases, how many got each answer)."""
    rng = random.Random(SEED)
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        before = greedy(channel)
        answers: Counter = Counter()
        bad_http = []
        for _ in range(HTTP_CASES):
            path = rng.choice(list(GOOD))
            data = mutated_body(rng, GOOD[path])
            try:
                status = post_raw(connection, path, data)
            except (http.client.HTTPException, ConnectionError):  # a cut-off answer is a failure too
                status = 599
                connection.close()
            answers[status] += 1
            if status >= 500:
                bad_http.append((path, data[:300], status))
        bad_grpc = []
        unary = channel.unary_unary("/loraplex.v1.Generation/Generate")
        stream = channel.unary_stream("/loraplex.v1.Generation/GenerateStream")
        for i in range(GRPC_CASES):
            data = mutated_request(rng)
            try:
                if i % 2:
                    list(stream(data, timeout=30))
                else:
                    unary(data, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            answers[code.name] += 1
            if code not in CLIENT_CODES:
                bad_grpc.append((data[:300], code))
        after = greedy(channel)
    connection.close()
    return before, after, bad_http, bad_grpc, answers


async def test_fuzzed_requests_get_only_client_errors(serving_model, tmp_path):
    model = with_chat_template(serving_model, tmp_path / "base")
    async with serving(model, default_max_new_tokens=4, max_new_tokens_limit=8) as (app, _url):
        before, after, bad_http, bad_grpc, answers = await asyncio.to_thread(fuzz, app.http.port, app.port)
    assert bad_http == [], bad_http[:5]
    assert bad_grpc == [], bad_grpc[:5]
    assert len(before) == 8 and after == before
    assert min(answers[200], answers[400], answers["OK"], answers["INVALID_ARGUMENT"]) >= 20, answers  # both kinds
