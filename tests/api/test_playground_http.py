"""The playground's HTTP side on a real server (loopback, plain HTTP): the page and its assets with their content
types (and nothing when settings.playground is off), GET /v1/admin/adapters (scopes; the same listing as gRPC
ListAdapters) and the `adapter_version` of answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import urllib.error
import urllib.request

from google.protobuf import json_format

from loraplex.client.client import AsyncClient
from loraplex.server.core.auth import ApiKey
from loraplex.server.settings import load_settings
from serving_support import get, post, serving, status_of

ADMIN, USER = "k-admin-5678", "k-user-5678"
KEYS = [ApiKey(name="admin", sha256=hashlib.sha256(ADMIN.encode()).hexdigest(), scopes={"admin", "inference"}),
        ApiKey(name="user", sha256=hashlib.sha256(USER.encode()).hexdigest())]


def fetch(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET url: (status, headers with lowercase names, body)."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def listing_json(response) -> dict:
    """A ListAdaptersResponse as GET /v1/admin/adapters documents it."""
    return json_format.MessageToDict(response, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True, unquote_int64_if_possible=True)


async def test_the_page_and_its_assets_are_served_with_their_content_types(serving_model):
    async with serving(serving_model) as (_app, url):
        root = url.removesuffix("/v1")
        status, headers, page = await asyncio.to_thread(fetch, root + "/")
        assets = re.findall(r'(?:href|src)="(/[^"]+)"', page.decode())
        served = {asset: await asyncio.to_thread(fetch, root + asset) for asset in assets}
        missing = (await asyncio.to_thread(fetch, root + "/playground/nothing.js"))[0]
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert sorted(assets) == ["/playground/playground.css", "/playground/playground.js"]
    kinds = {asset: answer[1]["content-type"] for asset, answer in served.items()}
    assert kinds == {"/playground/playground.css": "text/css; charset=utf-8",
                     "/playground/playground.js": "text/javascript; charset=utf-8"}
    assert all(answer[0] == 200 and answer[2] for answer in served.values())
    assert b"/v1/chat/completions" in served["/playground/playground.js"][2]
    assert missing == 404


async def test_the_playground_setting_off_serves_no_page(serving_model):
    assert load_settings(["--no-playground"]).playground is False and load_settings().playground is True
    async with serving(serving_model, playground=False) as (_app, url):
        root = url.removesuffix("/v1")
        statuses = [await asyncio.to_thread(status_of, root + path)
                    for path in ("/", "/playground/playground.js", "/playground/index.html")]
        models = await asyncio.to_thread(status_of, url + "/models")
    assert statuses == [404, 404, 404] and models == 200


async def test_the_admin_listing_needs_the_admin_scope_and_matches_grpc(serving_model):
    async with serving(serving_model, api_keys=KEYS) as (app, url):
        body = {"model": "a_r4_qv", "prompt": "hello world", "max_tokens": 3}
        served, _ = await asyncio.to_thread(post, f"{url}/completions", body, USER)
        nobody = await asyncio.to_thread(fetch, f"{url}/admin/adapters")
        user = await asyncio.to_thread(fetch, f"{url}/admin/adapters", USER)
        status, headers, body = await asyncio.to_thread(fetch, f"{url}/admin/adapters", ADMIN)
        client = AsyncClient(f"127.0.0.1:{app.port}", api_key=ADMIN)
        grpc_listing = listing_json(await client.list_adapters())
        await client.close()
    assert served == 200
    assert nobody[0] == 401 and json.loads(nobody[2])["error"]["type"] == "authentication_error"
    assert user[0] == 403 and json.loads(user[2])["error"]["type"] == "permission_error"
    listing = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert listing == grpc_listing  # through the http-shim's RemoteBackend: tests/api/test_remote_backend.py
    names = [adapter["name"] for adapter in listing["adapters"]]
    assert names == sorted(serving_model[1])
    first = listing["adapters"][0]
    assert first["requests_total"] == 1 and first["pinned"] is False and first["active_requests"] == 0
    assert first["versions"][0]["rank"] == 4 and first["versions"][0]["tier"].startswith("ADAPTER_TIER_")


async def test_answers_carry_the_adapter_version_that_generated_them(serving_model):
    ask = {"prompt": "hello world", "max_tokens": 3}
    async with serving(serving_model) as (_app, url):
        listed = (await asyncio.to_thread(get, f"{url}/models"))[1]["data"]
        models = {model["id"]: model.get("version", "") for model in listed}
        unary = (await asyncio.to_thread(post, f"{url}/completions", {**ask, "model": "b_r16_all"}))[1]
        base = (await asyncio.to_thread(post, f"{url}/completions", {**ask, "model": ""}))[1]
        request = urllib.request.Request(f"{url}/completions", method="POST", headers={
            "content-type": "application/json"}, data=json.dumps({**ask, "model": "a_r4_qv", "stream": True}).encode())
        raw = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read().decode())
        frames = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert unary["adapter_version"] == models["b_r16_all"] and len(unary["adapter_version"]) == 64
    assert base["adapter_version"] == ""
    versions = [frame.get("adapter_version") for frame in frames]
    assert versions == [None] * (len(frames) - 1) + [models["a_r4_qv"]]
    assert frames[-1]["choices"][0]["finish_reason"] == "length"
