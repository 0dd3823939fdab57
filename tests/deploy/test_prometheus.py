"""Every PromQL expression of deploy/ evaluated by a real Prometheus server scraping a real loraplex server.

Debian's `prometheus` (installed by scripts/install-test-system-deps.sh, which `make test` runs) is started on
a loopback port with deploy/prometheus/prometheus.yml, its scrape target pointed at the server's metrics port
and its intervals shortened; it loads deploy/prometheus/rules.yml as that file says. The server has served base
and adapter requests and refused bad ones. Then each expression of the Grafana dashboard (its variables filled
in as Grafana would), the endpoint picker's metric flags and their successor's `*Spec` settings in
deploy/README.md, and each recording rule and alert of rules.yml goes through /api/v1/query: each returns at
least one series, and Prometheus reports every rule healthy.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from loraplex.server.engine import EngineConfig
from loraplex.server.settings import MetricsSettings
from serving_support import TEST_ENGINE, TOKENIZER_CORPUS, post, serving

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "30s"
"""What Grafana's $__rate_interval stands for here: several scrapes at SCRAPE_INTERVAL."""
ALERT_SHAPE = re.compile(r"(?P<series>.+?)\s*(?P<op>>=|<=|>|<|==|!=)\s*(?P<threshold>[-+]?[\d.]+(?:e[-+]?\d+)?)")
"""An alert's expression: one series compared with a threshold (rules.yml's convention)."""
QUERY_DEADLINE_S = 25.0
"""How long the expressions get to return series once traffic is over (scrapes and rule evaluations)."""


def binaries() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        pytest.skip("Debian's prometheus package is not installed (scripts/install-test-system-deps.sh installs it "
                    "where apt-get can run)")
    return prometheus, promtool


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dashboard_expressions() -> list[str]:
    """Each panel target's expression and each query variable's metric, the variables as Grafana fills them
    with every replica selected (the variable's allValue) and $__rate_interval as RATE_INTERVAL."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = dashboard["templating"]["list"]
    filled = {f"${variable['name']}": variable["allValue"] for variable in variables}
    filled["$__rate_interval"] = RATE_INTERVAL
    pattern = re.compile("|".join(re.escape(name) for name in sorted(filled, key=len, reverse=True)))
    exprs = [pattern.sub(lambda match: filled[match[0]], target["expr"])
             for panel in dashboard["panels"] for target in panel.get("targets", [])]
    metrics = [re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])[1] for variable in variables]
    return exprs + metrics


def endpoint_picker_metrics() -> list[str]:
    """The metric specs the endpoint picker reads: its flags in k8s/epp.yaml and the `*Spec` settings of its
    successor's config in deploy/README.md (both PromQL selectors)."""
    (deployment,) = [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "epp.yaml").read_text())
                     if doc and doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    flags = [arg.split("=", 1)[1] for arg in container["args"] if arg.split("=", 1)[0].endswith("-metric")]
    specs = re.findall(r"^\s+\w+Spec: (\S+)$", (DEPLOY / "README.md").read_text(), re.MULTILINE)
    assert specs, "deploy/README.md shows the picker's engineConfigs"
    return [spec for spec in flags + specs if spec]


def rule_expressions() -> tuple[list[str], list[str]]:
    """(recording rules' expressions and recorded names, alerts as `SERIES OP bool THRESHOLD`)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = [text for rule in rules if "record" in rule for text in (rule["expr"], rule["record"])]
    alerts = []
    for rule in (rule for rule in rules if "alert" in rule):
        shape = ALERT_SHAPE.fullmatch(rule["expr"].strip())
        assert shape, f"alert {rule['alert']}: compare one series with a number ({rule['expr']})"
        alerts.append(f"{shape['series']} {shape['op']} bool {shape['threshold']}")
    return recorded, alerts


def write_config(folder: Path, target: str) -> Path:
    """deploy/prometheus/prometheus.yml scraping `target` every SCRAPE_INTERVAL (rules evaluated as often),
    its rule files as absolute paths of the files next to it."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / name) for name in config["rule_files"]]
    (scrape,) = config["scrape_configs"]
    scrape["static_configs"] = [{"targets": [target]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=60) as response:  # generous: the suite may load both cores
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


def series_count(base: str, expr: str) -> int:
    """Series (or the one scalar) `expr` evaluates to now; AssertionError naming it if Prometheus refuses it."""
    try:
        data = api(base, "query", query=expr)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"Prometheus refused {expr!r}: {error.read().decode()}") from None
    return len(data["result"]) if data["resultType"] in ("vector", "matrix") else 1


@contextmanager
def running_prometheus(binary: str, config: Path, folder: Path) -> Iterator[str]:
    """A Prometheus server on `config` (storage in `folder`) on a free loopback port; yields its base URL once
    it is ready."""
    address = f"127.0.0.1:{free_port()}"
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                f"--web.listen-address={address}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{address}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not get ready in 20 s"
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_promtool_accepts_the_config_and_the_rules():
    _, promtool = binaries()
    for command in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        checked = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def traffic(url: str, adapters: list[str]) -> None:
    """Base and adapter completions (some streamed), and refusals: an unknown model and a bad field."""
    for model in ["base", *adapters]:
        for prompt in TOKENIZER_CORPUS[:2]:
            status, _ = post(f"{url}/completions", {"model": model, "prompt": prompt, "max_tokens": 3})
            assert status == 200
    assert post(f"{url}/completions", {"model": "nope", "prompt": "hello", "max_tokens": 2})[0] == 404
    assert post(f"{url}/completions", {"model": adapters[0], "prompt": "hello", "max_tokens": -1})[0] == 400


async def test_every_promql_expression_in_deploy_returns_series_from_a_real_prometheus(serving_model, tmp_path):
    prometheus, _ = binaries()
    recorded, alerts = rule_expressions()
    exprs = dashboard_expressions() + endpoint_picker_metrics() + recorded + alerts
    settings = dict(metrics=MetricsSettings(port=0), engine=EngineConfig(**TEST_ENGINE))
    async with serving(serving_model, **settings) as (app, url):
        config = write_config(tmp_path, f"127.0.0.1:{app.metrics_server.server_port}")
        with running_prometheus(prometheus, config, tmp_path) as base:
            await asyncio.to_thread(traffic, url, list(serving_model[1]))
            deadline = time.monotonic() + QUERY_DEADLINE_S
            empty = exprs
            while empty and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                empty = [expr for expr in empty if await asyncio.to_thread(series_count, base, expr) == 0]
            rules = [rule for group in (await asyncio.to_thread(api, base, "rules"))["groups"]
                     for rule in group["rules"]]
    assert empty == [], f"no series after {QUERY_DEADLINE_S} s"
    assert {rule["name"] for rule in rules} == {
        rule.get("record") or rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]}
    assert [(rule["name"], rule["lastError"]) for rule in rules if rule["health"] != "ok"] == []
