"""The playground page in a real browser: Debian's Chromium, headless, driven by selenium through the system
chromedriver (no Selenium Manager, no download), against a real server on a loopback port with API keys on
and two adapters. The page's answers are compared with what the `openai` SDK gets for the same requests;
the adapters view, the key handling, the schema box and the held-out JSONL run (its table and its downloaded
CSV) are read back from the page. The side-by-side screenshot is written to docs/playground.png."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from loraplex.server.core.auth import ApiKey
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import AdapterSettings
from serving_support import TEST_ENGINE, serving, with_chat_template

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
ADAPTERS = ("a_r4_qv", "b_r16_all")
ADMIN_KEY, USER_KEY = "k-admin-playground", "k-user-playground"
KEYS = [ApiKey(name="admin", sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), scopes={"admin", "inference"}),
        ApiKey(name="user", sha256=hashlib.sha256(USER_KEY.encode()).hexdigest())]
WAIT_S = 60
PROMPT = "hello world"
MAX_TOKENS = 8


class ServerThread:
    """An in-process server (serving_support.serving) on its own event loop in a background thread, so that
    the synchronous selenium and SDK calls of these tests run against it."""

    def __init__(self, model: tuple[Path, dict[str, Path]], **overrides) -> None:
        self._model, self._overrides = model, overrides
        self._ready, self._error = threading.Event(), None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(WAIT_S) or self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with serving(self._model, **self._overrides) as (_app, url):
                self.url = url.removesuffix("/v1")
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:  # reported by __enter__
            self._error = error
            self._ready.set()


@pytest.fixture(scope="module")
def server(serving_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    base, adapters = with_chat_template(serving_model, root / "tiny-llama")
    with ServerThread((base, {name: adapters[name] for name in ADAPTERS}), api_keys=KEYS,
                      adapters=AdapterSettings(store=root / "store"), engine=EngineConfig(**TEST_ENGINE)) as running:
        yield running


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "scripts/install-test-system-deps.sh installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    offline = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # selenium never reaches for the network (both paths are given anyway)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,900", "--disable-extensions"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()
        if offline is None:
            os.environ.pop("SE_OFFLINE")
        else:
            os.environ["SE_OFFLINE"] = offline


def sdk(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def wait_for(condition, what: str, timeout_s: float = WAIT_S):
    """Poll `condition()` until it returns something truthy (returned); fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(browser, selector: str) -> str:
    """textContent of the first element matching `selector` (exact characters, unlike WebElement.text)."""
    return browser.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                                  selector)


def use_key(browser, key: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    browser.find_element(By.ID, "key-save").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#model-list input"), "the model list")


def open_page(browser, server: ServerThread) -> None:
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(server.url + "/")


def choose(browser, models: list[str]) -> None:
    from selenium.webdriver.common.by import By

    for box in browser.find_elements(By.CSS_SELECTOR, "#model-list input"):
        if box.is_selected() != (box.get_attribute("value") in models):
            box.click()


def set_field(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def chat_answer(client: openai.OpenAI, model: str, content: str) -> openai.types.chat.ChatCompletion:
    """What the SDK gets for the page's request (chat mode, greedy, MAX_TOKENS)."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=MAX_TOKENS, temperature=0, top_p=1)


def test_without_a_key_the_page_shows_the_401_message(server, browser):
    open_page(browser, server)
    notice = wait_for(lambda: browser.execute_script(
        "const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent;"), "the 401 notice")
    assert notice.startswith("401 Unauthorized: this server requires an API key"), notice
    assert "paste one above" in notice.lower()
    assert "no models to show" in text_of(browser, "#model-list")


def test_base_and_two_adapters_side_by_side_match_the_openai_sdk(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    use_key(browser, USER_KEY)
    base = server_base_name(server)
    choose(browser, [base, *ADAPTERS])
    set_field(browser, "prompt", PROMPT)
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: browser.execute_script(
        "const c = [...document.querySelectorAll('.column')];"
        "return c.length === 3 && c.every(e => e.dataset.state === 'done');"), "three finished columns")
    columns = browser.execute_script(
        "return [...document.querySelectorAll('.column')].map(c => ({model: c.dataset.model,"
        " label: c.querySelector('.column-label').textContent, stats: c.querySelector('.column-stats').textContent,"
        " text: c.querySelector('.column-output').textContent}));")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    client = sdk(server, USER_KEY)
    listed = {model.id: getattr(model, "version", "") for model in client.models.list().data}
    answers = {model: chat_answer(client, model, PROMPT) for model in (base, *ADAPTERS)}
    assert [column["model"] for column in columns] == [base, *ADAPTERS]
    for column in columns:
        answer = answers[column["model"]]
        assert column["text"] == answer.choices[0].message.content
        assert "TTFT" in column["stats"] and f"{answer.usage.completion_tokens} tokens" in column["stats"]
    version = {model: answers[model].model_extra["adapter_version"] for model in ADAPTERS}
    assert answers[base].model_extra["adapter_version"] == ""
    assert [column["label"] for column in columns] == [
        f"{base} (base)", *(f"{model}@{version[model][:12]}" for model in ADAPTERS)]
    assert all(version[model] == listed[model] and len(version[model]) == 64 for model in ADAPTERS)
    assert len({column["text"] for column in columns}) > 1, "the adapters change the answers"
    assert SCREENSHOT.stat().st_size > 10_000


def server_base_name(server: ServerThread) -> str:
    return next(model.id for model in sdk(server, USER_KEY).models.list().data if not getattr(model, "parent", None))


def test_the_adapters_view_needs_the_admin_scope_and_lists_both_adapters(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    use_key(browser, USER_KEY)
    browser.find_element(By.CSS_SELECTOR, ".tab[data-view='adapters']").click()
    refused = wait_for(lambda: "scope" in (text_of(browser, "#adapters-status") or "")
                       and text_of(browser, "#adapters-status"), "the permission message")
    assert refused == 'This API key lacks the "admin" scope: the adapters view needs a key with scope "admin".'
    assert not browser.find_elements(By.CSS_SELECTOR, "#adapters-table tr")

    use_key(browser, ADMIN_KEY)
    browser.find_element(By.ID, "adapters-reload").click()
    wait_for(lambda: text_of(browser, "#adapters-status") == "2 adapters", "the adapters table")
    rows = browser.execute_script("return [...document.querySelectorAll('#adapters-table tbody tr')]"
                                  ".map(r => [...r.cells].map(c => c.textContent));")
    request = urllib.request.Request(f"{server.url}/v1/admin/adapters",
                                     headers={"authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        listing = json.loads(response.read())["adapters"]
    expected = []
    for adapter in listing:
        current = next(v for v in adapter["versions"] if v["digest"] == adapter["current_version"])
        expected.append([adapter["name"], adapter["current_version"][:12], "1", str(current["rank"]),
                         ", ".join(current["targets"]), current["tier"].removeprefix("ADAPTER_TIER_").lower(),
                         "no", "0", str(adapter["requests_total"])])
    assert rows == expected
    assert [row[0] for row in rows] == list(ADAPTERS) and [row[3] for row in rows] == ["4", "16"]
    assert all(row[5] in ("device", "host", "store") for row in rows)


def test_a_heldout_jsonl_is_scored_per_model_and_downloads_as_csv(server, browser, tmp_path, downloads):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    use_key(browser, USER_KEY)
    base = server_base_name(server)
    models = [base, *ADAPTERS]
    choose(browser, models)
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    browser.find_element(By.CSS_SELECTOR, ".tab[data-view='evaluate']").click()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello world", "expected": "x"}\nnot json\n')
    browser.find_element(By.ID, "eval-file").send_keys(str(bad))
    wait_for(lambda: "line 2: not JSON" in (text_of(browser, "#eval-status") or ""), "the bad line's message")
    assert not browser.find_element(By.ID, "eval-run").is_enabled()

    client = sdk(server, USER_KEY)
    prompts = ["hello world", "the quick brown fox", "adapters share one base model"]
    answers = {(p, m): chat_answer(client, m, p).choices[0].message.content for p in prompts for m in models}
    # an exact hit for the base, a part of the first adapter's answer, and a string no model writes
    expected = [answers[(prompts[0], base)], answers[(prompts[1], ADAPTERS[0])].strip()[:3], "\u2603 nowhere \u2603"]
    lines = [{"prompt": prompts[0], "expected": expected[0]},
             {"messages": [{"role": "user", "content": prompts[1]}], "expected": expected[1]},
             {"prompt": prompts[2], "expected": expected[2]}]
    examples = tmp_path / "heldout.jsonl"
    examples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    browser.find_element(By.ID, "eval-file").send_keys(str(examples))
    wait_for(lambda: text_of(browser, "#eval-status") == "3 examples in heldout.jsonl", "the examples to load")
    browser.find_element(By.ID, "eval-run").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#eval-table tfoot td"), "the results table")

    def scores(prompt: str, model: str, want: str) -> tuple[bool, bool]:
        got = answers[(prompt, model)].strip()
        return got == want.strip(), want.strip() in got

    table = browser.execute_script("return [...document.querySelectorAll('#eval-table tr')]"
                                   ".map(r => [...r.cells].map(c => c.textContent));")
    listed = {model.id: getattr(model, "version", "") for model in client.models.list().data}
    labels = table[0][3::3]
    assert labels == [f"{base} (base)", *(f"{model}@{listed[model][:12]}" for model in ADAPTERS)]
    for index, (prompt, want) in enumerate(zip(prompts, expected, strict=True)):
        row = table[1 + index]
        assert row[:3] == [str(index + 1), prompt, want]
        for column, model in enumerate(models):
            exact, contains = scores(prompt, model, want)
            assert row[3 + 3 * column:6 + 3 * column] == [answers[(prompt, model)], "yes" if exact else "no",
                                                          "yes" if contains else "no"]
    hits = {model: [sum(scores(p, model, w)[k] for p, w in zip(prompts, expected, strict=True)) for k in (0, 1)]
            for model in models}
    footer = table[-1]
    for column, model in enumerate(models):
        exact, contains = hits[model]
        assert footer[4 + 3 * column:6 + 3 * column] == [f"{exact}/3 ({round(100 * exact / 3)}%)",
                                                         f"{contains}/3 ({round(100 * contains / 3)}%)"]
    assert hits[base][0] >= 1 and hits[ADAPTERS[0]][1] >= 1 and not any(
        scores(prompts[2], m, expected[2])[1] for m in models)

    browser.find_element(By.ID, "eval-csv").click()
    saved = wait_for(lambda: [f for f in downloads.glob("*.csv")], "the CSV download")[0]
    wait_for(lambda: saved.stat().st_size > 0, "the CSV to be written")
    with saved.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["index", "prompt", "expected",
                       *(f"{label} {part}" for label in labels for part in ("answer", "exact", "contains"))]
    for index, (prompt, want) in enumerate(zip(prompts, expected, strict=True)):
        assert rows[1 + index][:3] == [str(index + 1), prompt, want]
        for column, model in enumerate(models):
            exact, contains = scores(prompt, model, want)
            assert rows[1 + index][3 + 3 * column:6 + 3 * column] == [answers[(prompt, model)], str(int(exact)),
                                                                      str(int(contains))]
    assert rows[4] == ["score", "", "", *(cell for model in models for cell in
                                          ("", f"{hits[model][0]}/3", f"{hits[model][1]}/3"))]
    assert len(rows) == 5


def test_the_schema_box_constrains_the_answer_as_response_format_does(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    use_key(browser, USER_KEY)
    choose(browser, [ADAPTERS[1]])
    set_field(browser, "prompt", PROMPT)
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    set_field(browser, "schema", '{"type": "object"')
    browser.find_element(By.ID, "send").click()
    notice = wait_for(lambda: text_of(browser, "#notice"), "the schema's message")
    assert notice.startswith("JSON schema: not valid JSON")

    # the tiny test tokenizer cannot spell JSON, so the schema sent is one the server refuses while checking
    # the request (before anything is queued): the column shows the refusal the SDK gets for the same body
    schema = {"type": "no-such-type"}
    set_field(browser, "schema", json.dumps(schema))
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: browser.execute_script("const c = document.querySelector('.column');"
                                            "return c && c.dataset.state === 'error';"), "the refusal")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(server, USER_KEY).chat.completions.create(
            model=ADAPTERS[1], messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
            temperature=0, top_p=1,
            response_format={"type": "json_schema", "json_schema": {"name": "playground", "schema": schema}})
    assert refused.value.body["param"] == "response_format"
    assert text_of(browser, ".column-error") == f"400: {refused.value.body['message']}"
    set_field(browser, "schema", "")
