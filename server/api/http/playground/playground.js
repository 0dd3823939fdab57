// loraplex playground: the base and up to 4 adapters side by side, over the public HTTP API only
// (GET /v1/models, POST /v1/chat/completions and /v1/completions, GET /v1/admin/adapters).
// The API key lives in this tab's sessionStorage and nowhere else.
"use strict";

const KEY_STORAGE = "loraplex.apiKey";
const MAX_ADAPTERS = 4;
const EVAL_CONCURRENCY = 8; // requests of a held-out run in flight at once (the server batches them)
const $ = (id) => document.getElementById(id);

// ---- the API key and the server's refusals ----

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function requestHeaders() {
  const headers = { "content-type": "application/json" };
  if (apiKey()) headers.authorization = "Bearer " + apiKey();
  return headers;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A refusal in words a person can act on; `said` is the server's own message.
function explained(status, said) {
  if (status === 401) {
    return apiKey()
      ? `401 Unauthorized: the server does not accept this API key (${said}). Paste another one above.`
      : `401 Unauthorized: this server requires an API key. Paste one above and press "Use key". (${said})`;
  }
  if (status === 403) return `403 Forbidden: this API key may not do this (${said}).`;
  return `${status}: ${said}`;
}

async function refusal(response) {
  let said = response.statusText;
  try {
    const body = await response.json();
    said = (body.error && body.error.message) || JSON.stringify(body);
  } catch (ignored) { /* not JSON: keep the status text */ }
  return new ApiError(response.status, explained(response.status, said));
}

async function getJson(path) {
  const response = await fetch(path, { headers: requestHeaders() });
  if (!response.ok) throw await refusal(response);
  return response.json();
}

async function postJson(path, body) {
  const response = await fetch(path, { method: "POST", headers: requestHeaders(), body: JSON.stringify(body) });
  if (!response.ok) throw await refusal(response);
  return response.json();
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// ---- models ----

let models = []; // {id, version, base}: GET /v1/models' entries

async function loadModels() {
  const list = $("model-list");
  try {
    const listed = await getJson("/v1/models");
    models = listed.data.map((m) => ({ id: m.id, version: m.version || "", base: !m.parent }));
    showNotice("");
  } catch (error) {
    models = [];
    showNotice(error.message);
  }
  list.replaceChildren();
  if (!models.length) {
    list.append(muted("no models to show (see the message above)"));
    return;
  }
  for (const model of models) {
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: model.id });
    box.dataset.base = model.base ? "1" : "";
    box.checked = model.base;
    box.addEventListener("change", () => limitAdapters(box));
    const label = document.createElement("label");
    label.append(box, " " + (model.base ? `${model.id} (base)` : model.id));
    if (model.version) label.append(" ", Object.assign(document.createElement("code"),
      { textContent: "@" + model.version.slice(0, 12) }));
    list.append(label);
  }
}

function limitAdapters(box) {
  const adapters = [...document.querySelectorAll("#model-list input:checked")].filter((b) => !b.dataset.base);
  if (adapters.length > MAX_ADAPTERS) {
    box.checked = false;
    showNotice(`Pick at most ${MAX_ADAPTERS} adapters (and the base).`);
  }
}

function chosenModels() {
  const ids = [...document.querySelectorAll("#model-list input:checked")].map((box) => box.value);
  return models.filter((model) => ids.includes(model.id));
}

// "orders@65445874f7cd" for an adapter version, "NAME (base)" for the base model.
function modelLabel(model, version) {
  if (model.base) return `${model.id} (base)`;
  return `${model.id}@${(version || model.version).slice(0, 12)}`;
}

// ---- one request's body ----

function isChat() {
  return $("mode").value === "chat";
}

function samplingFields() {
  const fields = {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  if ($("seed").value.trim() !== "") fields.seed = parseInt($("seed").value, 10);
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (error) {
      throw new Error(`JSON schema: not valid JSON (${error.message})`);
    }
    fields.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
  }
  return fields;
}

// The body of one example for `model`: chat messages or a completion prompt, with the sampling fields.
function requestBody(model, example, sampling) {
  if (isChat()) {
    const messages = example.messages || [
      ...($("system").value.trim() ? [{ role: "system", content: $("system").value }] : []),
      { role: "user", content: example.prompt },
    ];
    return { model: model.id, messages, ...sampling };
  }
  const prompt = example.prompt !== undefined ? example.prompt : example.messages.map((m) => m.content).join("\n");
  return { model: model.id, prompt, ...sampling };
}

function endpoint() {
  return isChat() ? "/v1/chat/completions" : "/v1/completions";
}

function answerText(choice) {
  return isChat() ? (choice.message.content || "") : choice.text;
}

// ---- compare: one prompt, streamed side by side ----

function muted(text) {
  return Object.assign(document.createElement("span"), { className: "muted", textContent: text });
}

function newColumn(model) {
  const column = Object.assign(document.createElement("div"), { className: "column" });
  column.dataset.model = model.id;
  column.dataset.state = "waiting";
  const head = Object.assign(document.createElement("div"), { className: "column-head" });
  const label = Object.assign(document.createElement("div"), { className: "column-label", textContent: model.id });
  const stats = Object.assign(document.createElement("div"), { className: "column-stats", textContent: "waiting…" });
  const output = Object.assign(document.createElement("pre"), { className: "column-output" });
  head.append(label, stats);
  column.append(head, output);
  return { model, element: column, label, stats, output, text: "" };
}

// TTFT: from sending to the first generated token; tokens/s: tokens after the first over the time after it.
function showStats(column, sentAt, firstAt, lastAt, tokens) {
  const parts = [];
  if (firstAt !== null) parts.push(`TTFT ${Math.round(firstAt - sentAt)} ms`);
  parts.push(`${tokens} tokens`);
  if (tokens > 1 && lastAt > firstAt) parts.push(`${((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(1)} tok/s`);
  column.stats.textContent = parts.join(" · ");
}

function setVersion(column, version) {
  column.element.dataset.version = version;
  column.label.textContent = modelLabel(column.model, version);
}

async function streamColumn(column, body) {
  const sentAt = performance.now();
  let firstAt = null, lastAt = null, tokens = 0;
  column.element.dataset.state = "streaming";
  const response = await fetch(endpoint(), {
    method: "POST", headers: requestHeaders(),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await refusal(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const frame = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const data = frame.split("\n").filter((line) => line.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(0, `the answer failed: ${event.error.message}`);
      if (event.adapter_version !== undefined) setVersion(column, event.adapter_version);
      if (event.usage) tokens = event.usage.completion_tokens;
      const choice = event.choices && event.choices[0];
      if (!choice || (choice.delta && choice.delta.role)) continue; // the usage chunk, or chat's role frame
      const now = performance.now();
      if (firstAt === null) firstAt = now;
      lastAt = now;
      tokens += 1;
      column.text += isChat() ? (choice.delta.content || "") : choice.text;
      column.output.textContent = column.text;
      showStats(column, sentAt, firstAt, lastAt, tokens);
    }
  }
  showStats(column, sentAt, firstAt, lastAt, tokens);
  column.element.dataset.state = "done";
}

async function send() {
  const chosen = chosenModels();
  if (!chosen.length) return showNotice("Pick at least one model.");
  let sampling;
  try {
    sampling = samplingFields();
  } catch (error) {
    return showNotice(error.message);
  }
  showNotice("");
  const columns = chosen.map(newColumn);
  $("columns").replaceChildren(...columns.map((column) => column.element));
  $("send").disabled = true;
  const example = { prompt: $("prompt").value };
  // every column's request at once: the server runs them in the same batched forward passes
  await Promise.all(columns.map(async (column) => {
    try {
      await streamColumn(column, requestBody(column.model, example, sampling));
    } catch (error) {
      column.element.dataset.state = "error";
      column.element.append(Object.assign(document.createElement("div"),
        { className: "column-error", textContent: error.message }));
      if (error.status === 401) showNotice(error.message);
    }
  }));
  $("send").disabled = false;
}

// ---- held-out set: a JSONL file, scored per model, as a table and a CSV ----

let examples = [];

// The examples of a JSONL text; Error naming the first bad line.
function parseExamples(text) {
  const parsed = [];
  text.split(/\r?\n/).forEach((line, index) => {
    if (!line.trim()) return;
    let example;
    try {
      example = JSON.parse(line);
    } catch (error) {
      throw new Error(`line ${index + 1}: not JSON (${error.message})`);
    }
    const prompt = example && example.prompt, messages = example && example.messages;
    if (typeof prompt !== "string" && !(Array.isArray(messages) && messages.length)) {
      throw new Error(`line ${index + 1}: needs "prompt" (a string) or "messages" (a list of {role, content})`);
    }
    if (typeof example.expected !== "string") throw new Error(`line ${index + 1}: needs "expected" (a string)`);
    parsed.push(typeof prompt === "string" ? { prompt, expected: example.expected }
      : { messages, expected: example.expected });
  });
  if (!parsed.length) throw new Error("the file holds no examples");
  return parsed;
}

function readExamples(file) {
  const reader = new FileReader();
  reader.onload = () => {
    try {
      examples = parseExamples(reader.result);
      $("eval-status").textContent = `${examples.length} examples in ${file.name}`;
      $("eval-run").disabled = false;
    } catch (error) {
      examples = [];
      $("eval-status").textContent = `${file.name}: ${error.message}`;
      $("eval-run").disabled = true;
    }
  };
  reader.readAsText(file);
}

function score(answer, expected) {
  const got = answer.trim(), want = expected.trim();
  return { exact: got === want, contains: got.includes(want) };
}

function shownPrompt(example) {
  return example.prompt !== undefined ? example.prompt : example.messages[example.messages.length - 1].content;
}

// Run `tasks` (async functions) with at most `limit` in flight.
async function pooled(tasks, limit) {
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) await tasks[next++]();
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
}

async function runExamples() {
  const chosen = chosenModels();
  if (!chosen.length) return showNotice("Pick at least one model.");
  let sampling;
  try {
    sampling = samplingFields();
  } catch (error) {
    return showNotice(error.message);
  }
  showNotice("");
  $("eval-run").disabled = true;
  $("eval-csv").hidden = true;
  const results = examples.map(() => chosen.map(() => null)); // [example][model] = {answer, exact, contains}
  const versions = chosen.map((model) => model.version);
  let done = 0;
  const tasks = [];
  examples.forEach((example, row) => chosen.forEach((model, col) => tasks.push(async () => {
    let answer;
    try {
      const reply = await postJson(endpoint(), requestBody(model, example, sampling));
      if (reply.adapter_version !== undefined) versions[col] = reply.adapter_version;
      answer = answerText(reply.choices[0]);
      results[row][col] = { answer, ...score(answer, example.expected) };
    } catch (error) {
      results[row][col] = { answer: `error: ${error.message}`, exact: false, contains: false };
      if (error.status === 401) showNotice(error.message);
    }
    done += 1;
    $("eval-status").textContent = `${done} / ${tasks.length} answers`;
  })));
  await pooled(tasks, EVAL_CONCURRENCY);
  const labels = chosen.map((model, col) => modelLabel(model, versions[col]));
  renderResults(labels, results);
  offerCsv(labels, results);
  $("eval-run").disabled = false;
}

function cell(tag, text, className) {
  return Object.assign(document.createElement(tag), { textContent: text, className: className || "" });
}

function scoreText(results, col, key) {
  const hits = results.filter((row) => row[col][key]).length;
  return `${hits}/${results.length} (${Math.round((100 * hits) / results.length)}%)`;
}

function renderResults(labels, results) {
  const table = $("eval-table");
  const head = document.createElement("tr");
  head.append(cell("th", "#"), cell("th", "prompt"), cell("th", "expected"));
  labels.forEach((label) => head.append(cell("th", label), cell("th", "exact"), cell("th", "contains")));
  const body = document.createElement("tbody");
  results.forEach((row, index) => {
    const tr = document.createElement("tr");
    tr.append(cell("td", String(index + 1)), cell("td", shownPrompt(examples[index])),
      cell("td", examples[index].expected));
    row.forEach((result) => tr.append(cell("td", result.answer, "answer"),
      cell("td", result.exact ? "yes" : "no", result.exact ? "hit" : "miss"),
      cell("td", result.contains ? "yes" : "no", result.contains ? "hit" : "miss")));
    body.append(tr);
  });
  const foot = document.createElement("tr");
  foot.append(cell("td", "score"), cell("td", ""), cell("td", ""));
  labels.forEach((label, col) => foot.append(cell("td", ""), cell("td", scoreText(results, col, "exact")),
    cell("td", scoreText(results, col, "contains"))));
  table.replaceChildren(document.createElement("thead"), body, document.createElement("tfoot"));
  table.tHead.append(head);
  table.tFoot.append(foot);
}

function csvField(value) {
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The table as CSV: one row per example, then a "score" row (hits/examples per model).
function resultsCsv(labels, results) {
  const header = ["index", "prompt", "expected", ...labels.flatMap((l) => [`${l} answer`, `${l} exact`,
    `${l} contains`])];
  const rows = results.map((row, index) => [index + 1, shownPrompt(examples[index]), examples[index].expected,
    ...row.flatMap((r) => [r.answer, r.exact ? 1 : 0, r.contains ? 1 : 0])]);
  const count = (col, key) => results.filter((row) => row[col][key]).length;
  const scores = ["score", "", "", ...labels.flatMap((l, col) => ["", `${count(col, "exact")}/${results.length}`,
    `${count(col, "contains")}/${results.length}`])];
  return [header, ...rows, scores].map((fields) => fields.map(csvField).join(",")).join("\r\n") + "\r\n";
}

function offerCsv(labels, results) {
  const link = $("eval-csv");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([resultsCsv(labels, results)], { type: "text/csv" }));
  link.hidden = false;
}

// ---- adapters view (GET /v1/admin/adapters, scope "admin") ----

const TIER_NAMES = { ADAPTER_TIER_DEVICE: "device", ADAPTER_TIER_HOST: "host", ADAPTER_TIER_STORE: "store" };

async function loadAdapters() {
  const status = $("adapters-status"), table = $("adapters-table");
  status.textContent = "loading…";
  let listing;
  try {
    listing = await getJson("/v1/admin/adapters");
  } catch (error) {
    table.replaceChildren();
    status.textContent = error.status === 403
      ? 'This API key lacks the "admin" scope: the adapters view needs a key with scope "admin".'
      : error.status === 404 ? "This server does not serve the admin listing (/v1/admin/adapters)." : error.message;
    return;
  }
  const head = document.createElement("tr");
  for (const name of ["adapter", "version", "versions", "rank", "targets", "tier", "pinned", "active",
    "requests served"]) head.append(cell("th", name));
  const rows = listing.adapters.map((adapter) => {
    const current = adapter.versions.find((v) => v.digest === adapter.current_version) || {};
    const tr = document.createElement("tr");
    tr.dataset.adapter = adapter.name;
    tr.append(cell("td", adapter.name), cell("td", adapter.current_version.slice(0, 12)),
      cell("td", String(adapter.versions.length)), cell("td", current.rank ? String(current.rank) : "-"),
      cell("td", (current.targets || []).join(", ") || "-"), cell("td", TIER_NAMES[current.tier] || "-"),
      cell("td", adapter.pinned ? "yes" : "no"), cell("td", String(adapter.active_requests)),
      cell("td", String(adapter.requests_total)));
    return tr;
  });
  table.replaceChildren(document.createElement("thead"), document.createElement("tbody"));
  table.tHead.append(head);
  table.tBodies[0].append(...rows);
  status.textContent = `${rows.length} adapters`;
}

// ---- wiring ----

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  $("setup").hidden = name === "adapters";
  if (name === "adapters") loadAdapters();
}

function showMode() {
  for (const element of document.querySelectorAll(".chat-only")) element.hidden = !isChat();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModels();
  });
  $("key-clear").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    loadModels();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("models-reload").addEventListener("click", loadModels);
  $("mode").addEventListener("change", showMode);
  $("send").addEventListener("click", send);
  $("eval-file").addEventListener("change", () => $("eval-file").files[0] && readExamples($("eval-file").files[0]));
  $("eval-run").addEventListener("click", runExamples);
  $("adapters-reload").addEventListener("click", loadAdapters);
  showMode();
  loadModels();
});
