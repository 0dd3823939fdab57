"""Builds one serving process from Settings: engine + adapters + scheduler + gRPC server; runs it until
SIGTERM/SIGINT (SIGHUP reloads the quotas: `reload_quotas`), then drains (`App.stop`: new requests are
refused on every transport at once, in-flight ones get `shutdown_grace_s`, then what remains is cancelled and
the process exits 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import boto3
import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.sources import AdapterSources
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validation import Limits
from loraplex.server.api.admin_service import AdminService
from loraplex.server.api.generation_service import GenerationService
from loraplex.server.api.http.plumbing import EmbeddedServer, bind_http_socket
from loraplex.server.api.http.routes import HttpShim
from loraplex.server.api.interceptor import ErrorInterceptor
from loraplex.server.api.tenant_service import TenantService
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.adapter_runtime.watcher import AdapterWatcher, PromotionWatcher
from loraplex.server.core.auth import Authenticator
from loraplex.server.core.engine_thread import EngineThread
from loraplex.server.core.generation import GenerationCore
from loraplex.server.core.metrics import ServerMetrics
from loraplex.server.core.quota_config import QuotaSettings
from loraplex.server.core.requests import RequestLimits
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.default_model import default_model_path, loraplex_home
from loraplex.server.engine import Engine, cpu_extension
from loraplex.server.gguf_model import served_folder
from loraplex.server.logs import configure_logging
from loraplex.server.model_files import base_digest, iter_weights, model_spec
from loraplex.server.settings import Settings
from loraplex.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc, tenants_pb2, tenants_pb2_grpc

log = logging.getLogger("loraplex")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdapterAdmin"].full_name
TENANT_SERVICE_NAME = tenants_pb2.DESCRIPTOR.services_by_name["TenantAdmin"].full_name
HTTP_CLOSE_S = 2.0
"""After the drain, how long the HTTP server gets to finish its last responses before they are cancelled."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
REGISTRY_FILE = ".registry.json"
"""The registry's state file, inside the store folder (adapter names never start with '.')."""


@dataclass
class App:
    """A started server; `host` and `port` are the bound ones (see Settings.listen_host; settings.port may be 0)."""

    server: grpc.aio.Server
    scheduler: Scheduler
    core: GenerationCore
    health: health_aio.HealthServicer
    host: str
    port: int
    model_name: str
    watcher: AdapterWatcher | None = None
    promotions: PromotionWatcher | None = None
    """Registers what serve-train promotes in the store while serving (None with adapters.watch_store off)."""
    http: EmbeddedServer | None = None
    """The OpenAI-style HTTP server (None with http_port unset); `http.port` is the bound port."""
    http_task: asyncio.Task | None = None
    metrics: ServerMetrics | None = None
    """The server's metrics (None with metrics.enabled off)."""
    metrics_server: WSGIServer | None = None
    """The separate /metrics server (metrics.port); `metrics_server.server_port` is its bound port."""

    async def stop(self, grace_s: float) -> None:
        """Drain and stop within about `grace_s` + HTTP_CLOSE_S seconds, whatever the clients do.

        At once, every transport refuses new generations (ShuttingDown: gRPC UNAVAILABLE, HTTP 503), gRPC
        health says NOT_SERVING and /ready 503, and the gRPC server stops taking calls; the HTTP listener
        keeps answering. In-flight generations of both transports get up to `grace_s` to finish; then the
        scheduler stops (what remains ends with ShuttingDown: gRPC UNAVAILABLE, an SSE error event) and the
        servers close (HTTP responses still open after HTTP_CLOSE_S are cancelled)."""
        self.scheduler.stop_accepting()
        await self.health.enter_graceful_shutdown()
        for watcher in (self.watcher, self.promotions):
            if watcher is not None:
                watcher.stop()
        grpc_stopped = asyncio.create_task(self.server.stop(grace_s))
        await self.core.drain(grace_s)
        self.scheduler.close()
        if self.http is not None:
            self.http.should_exit = True  # closes the listener, then waits timeout_graceful_shutdown at most
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.http_task, HTTP_CLOSE_S + 1.0)  # cancels it past that
        await grpc_stopped
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.core.adapters.close()
        self.core.close()


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has none (then only token-id input is served)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder)


async def start(settings: Settings, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> App:
    """Bind the port, load the model and adapters, start the scheduler thread and the gRPC server.

    `interceptors` (tests, metrics) see each call before the error interceptor does."""
    server = grpc.aio.server(interceptors=[*interceptors, ErrorInterceptor()], options=[
        ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", settings.grpc_max_message_bytes)])
    host = settings.listen_host()
    if host != settings.host:
        log.warning("no api_keys are configured: listening on %s instead of %s (configure api_keys, or set "
                    "allow_unauthenticated_remote to serve other machines without authentication)", host, settings.host)
    port = _bind(server, host, settings.port, _server_credentials(settings))
    http_socket = bind_http_socket(host, settings.http_port) if settings.http_port is not None else None
    folder = served_folder(settings.model) if settings.model is not None else default_model_path()
    metrics = (ServerMetrics(settings.metrics.max_adapter_labels, settings.metrics.max_tenant_labels)
               if settings.metrics.enabled else None)
    cpu_extension.set_build_root(loraplex_home() / "torch_extensions")
    digest = base_digest(folder)
    engine_thread = EngineThread.acquire()  # the engine is built where its steps run (core/engine_thread.py)
    try:
        engine = await engine_thread.run(Engine, model_spec(folder), iter_weights(folder), settings.engine, digest)
        adapters = adapter_manager(engine, settings, digest, metrics.observe_load if metrics else None)
        scheduler = Scheduler(engine, adapters, settings.scheduler, metrics.observe_step if metrics else None,
                              metrics.observe_prefix if metrics else None, settings.read_quotas())
    finally:
        engine_thread.release()  # the scheduler holds it from now on
    auth = Authenticator(settings.api_keys)
    tokenizer = load_tokenizer(folder)
    limits = RequestLimits(settings.default_max_new_tokens, settings.max_new_tokens_limit)
    core = GenerationCore(scheduler, adapters, tokenizer, auth, limits, folder.name, metrics, settings.log_prompts)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationService(core), server)
    admin = AdminService(adapters, auth)
    admin_pb2_grpc.add_AdapterAdminServicer_to_server(admin, server)
    tenants_pb2_grpc.add_TenantAdminServicer_to_server(
        TenantService(scheduler, auth, lambda: reload_quotas(scheduler, settings)), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((SERVICE_NAME, ADMIN_SERVICE_NAME, TENANT_SERVICE_NAME, health_name,
                                             reflection.SERVICE_NAME),
                                            server)
    watch_dir = settings.adapters.watch_dir
    watcher = AdapterWatcher(adapters, watch_dir, settings.adapters.watch_interval_s) if watch_dir else None
    promotions = PromotionWatcher(adapters, settings.adapters.watch_interval_s) if settings.adapters.watch_store \
        else None
    scheduler.start()
    for started in (watcher, promotions):
        if started is not None:
            started.start()
    await server.start()
    for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME, TENANT_SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    app = App(server, scheduler, core, health, host, port, folder.name, watcher, promotions, metrics=metrics)
    if metrics is not None:
        metrics.watch(scheduler, adapters, adapters.store.root)
        if settings.metrics.port is not None:
            app.metrics_server, _ = start_http_server(settings.metrics.port, host.strip("[]"), metrics.registry)
    if http_socket is not None:
        shim = HttpShim(core, core if metrics is not None else None, settings.http_max_body_bytes, admin,
                        settings.playground)
        app.http = EmbeddedServer(uvicorn.Config(shim.app, log_level="warning", lifespan="off",
                                                 timeout_graceful_shutdown=HTTP_CLOSE_S))
        app.http_task = asyncio.create_task(app.http.serve(sockets=[http_socket]))
        while not app.http.started and not app.http_task.done():
            await asyncio.sleep(0.01)
    return app


def adapter_manager(engine: Engine, settings: Settings, base: str,
                    on_load_phase: Callable[[str, float], None] | None = None) -> AdapterManager:
    """The store, registry and tiers of `settings.adapters` on `engine` (base digest `base`), with the
    start-up `settings.adapter` folders registered and warmed (they and the watch folder count as allowed
    roots), then the versions serve-train promoted in the store registered under their names
    (`register_promoted`); `on_load_phase` hears load-phase durations (metrics)."""
    config = settings.adapters
    root = config.store or loraplex_home() / "adapters"
    limits = Limits(max_rank=engine.config.max_rank, max_bytes=config.max_adapter_bytes)
    allowed = [*config.allowed_roots, *([config.watch_dir] if config.watch_dir else []),
               *(folder.resolve() for folder in settings.adapter.values())]
    store = AdapterStore(root, engine.spec, limits, allowed, base)
    sources = AdapterSources(store, lambda: boto3.client("s3", endpoint_url=config.s3_endpoint_url,
                                                         region_name=config.s3_region))
    manager = AdapterManager(engine, AdapterRegistry(store.root / REGISTRY_FILE), sources, config.host_cache_bytes,
                             config.load_workers, config.max_versions, on_load_phase)
    for name, folder in settings.adapter.items():
        manager.load(str(folder.resolve()), name, warm=True)
    manager.register_promoted(skip=settings.adapter.keys())
    return manager


def reload_quotas(scheduler: Scheduler, settings: Settings) -> QuotaSettings:
    """Read the quotas again (Settings.read_quotas: quotas_file, validated as at start-up) and put them in force
    on `scheduler`; ValueError saying what is wrong leaves the quotas in force as they are."""
    quotas = settings.read_quotas()
    scheduler.set_quotas(quotas)
    log.info("quotas reloaded: %d tenants, %d adapters with limits", len(quotas.tenants), len(quotas.adapters))
    return quotas


async def _reload_on_signal(scheduler: Scheduler, settings: Settings) -> None:
    """SIGHUP: `reload_quotas` off the event loop; a bad file is logged and changes nothing."""
    try:
        await asyncio.to_thread(reload_quotas, scheduler, settings)
    except ValueError as error:
        log.error("SIGHUP: quotas not reloaded (the previous ones stay in force): %s", error)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured certificate and key, or None (plaintext)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])


def _bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on host:port before anything slow happens, so a taken port fails at once (no SO_REUSEPORT)."""
    address = f"{host}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {host}:{port}: the port is taken or the address is invalid") from error


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return (the process then exits 0)."""
    configure_logging(settings.log_level, settings.log_format)
    app = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_on_signal(app.scheduler, settings)))
    adapters = ", ".join(status.name for status in app.core.adapters.statuses()) or "none"
    tls = " with TLS" if settings.tls_cert_file else ""
    http = f" (OpenAI-style HTTP on {app.host}:{app.http.port})" if app.http is not None else ""
    if app.metrics_server is not None:
        http += f" (metrics on {app.host}:{app.metrics_server.server_port})"
    print(f"loraplex serving {app.model_name} (adapters: {adapters}){tls}{http} on {app.host}:{app.port}", flush=True)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", settings.shutdown_grace_s)
    await app.stop(settings.shutdown_grace_s)
    log.info("stopped")
