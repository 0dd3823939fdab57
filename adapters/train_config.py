"""serve-train's settings: flags (`--data train.jsonl --name NAME --rank 32`), LORAPLEX_TRAIN_* environment
variables, a YAML or TOML file (`--config FILE`: adapters/config_file.py), then the defaults below (the
guide's: r=16, alpha=32, all linear layers, dropout 0.05), in that priority. Bad values and unknown keys stop
the command before anything loads, with a message naming the setting. docs/serve-train.md lists every setting
(adapters/train_reference.py writes it from this model)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from loraplex.adapters.config_file import ConfigFileSource
from loraplex.adapters.qlora import ALL_LINEAR
from loraplex.adapters.reference import ADAPTER_NAME
from loraplex.server.engine.spec import PROJECTIONS

_config_file: ContextVar[Path | None] = ContextVar("loraplex_train_config_file", default=None)


class TrainSettings(BaseSettings):
    """Everything one serve-train job needs. `--config FILE` (YAML or TOML): any of them, flags override it."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_TRAIN_", extra="forbid", use_attribute_docstrings=True,
                                      cli_implicit_flags=True, cli_prog_name="serve-train", cli_kebab_case=True)

    data: Path
    """Training examples, JSONL: {"prompt", "completion"} or {"messages": [...]} per line."""
    name: str
    """Adapter name to store the result under (and to load it as, with --server)."""
    eval_data: Path | None = None
    """Held-out examples (same format); unset holds out --eval-fraction of --data."""
    model: Path | None = None
    """The server's base model, as `loraplex serve --model` takes it: a Hugging Face folder, or a GGUF file (or a
    folder holding one), converted once into the cache; unset uses the embedded SmolLM2-135M-Instruct."""
    store: Path | None = None
    """The adapter store to write into; unset uses $LORAPLEX_HOME/adapters (the server's default)."""
    work_dir: Path | None = None
    """Where checkpoints go; unset uses $LORAPLEX_HOME/training/NAME."""
    server: str | None = None
    """HOST:PORT of a running loraplex server to load the adapter into when done (admin API)."""
    api_key: str | None = None
    """API key with the "admin" scope for --server (or LORAPLEX_TRAIN_API_KEY)."""
    promote_if_better: bool = False
    """Promote the adapter only if its held-out score beats the base's: with --server, load it into that
    server only then; without, a server starting on (or watching) the store registers it only then."""
    rank: int = Field(default=16, ge=1, le=1024)
    """LoRA rank r."""
    alpha: float = Field(default=32.0, gt=0)
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """LoRA dropout."""
    target_modules: list[str] = Field(default_factory=lambda: [ALL_LINEAR])
    """Projections to adapt: "all-linear", or names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    """Peak learning rate of AdamW (linear warm-up, then linear decay to 0)."""
    warmup_ratio: float = Field(default=0.05, ge=0.0, le=0.5)
    """Fraction of the steps spent warming up."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay of the LoRA weights."""
    epochs: float = Field(default=3.0, gt=0, le=1000)
    """Passes over the training examples (fractions allowed)."""
    batch_size: int = Field(default=8, ge=1, le=4096)
    """Examples per micro-batch, over all processes together (each of N processes takes batch_size / N)."""
    grad_accum: int = Field(default=1, ge=1, le=4096)
    """Micro-batches per optimizer step: the effective batch is batch_size * grad_accum, whatever N is."""
    max_length: int = Field(default=512, ge=8, le=1_000_000)
    """Longest example in tokens; a longer one is a data error (reported with its line)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seeds the LoRA initialization, the held-out split and the data order."""
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of --data held out when no --eval-data is given."""
    eval_batch_size: int = Field(default=16, ge=1, le=4096)
    """Held-out examples per batch when scoring base and adapter."""
    eval_max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Longest greedy answer generated per held-out prompt."""
    scorer: str = "exact_match"
    """Generation metric: "exact_match", or "module:function" taking (prediction, reference) -> [0, 1]."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Optimizer steps between checkpoints (the last two are kept)."""
    resume: bool = False
    """Continue from the latest checkpoint in --work-dir."""
    quantize: bool = True
    """Train on the NF4 base (QLoRA), as served; false trains on the unquantized base (plain LoRA)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" uses CUDA when present (each process takes its local rank's GPU), else the CPU."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError("use letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)")
        return name

    @field_validator("data", "eval_data")
    @classmethod
    def _check_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a file")
        return path

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, targets: list[str]) -> list[str]:
        if targets != [ALL_LINEAR] and (not targets or not set(targets) <= set(PROJECTIONS)):
            raise ValueError(f"use {ALL_LINEAR!r} or names among {list(PROJECTIONS)}")
        return targets

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls, _config_file.get())

    def lora_targets(self) -> tuple[str, ...] | str:
        return ALL_LINEAR if self.target_modules == [ALL_LINEAR] else tuple(self.target_modules)


def parse_settings(args: Sequence[str]) -> TrainSettings:
    """TrainSettings from command-line `args` (`--config FILE` among them names the settings file),
    LORAPLEX_TRAIN_* variables and that file; pydantic.ValidationError or pydantic_settings.SettingsError
    (the file: unreadable, not YAML/TOML, unknown keys) otherwise."""
    config, rest = _config_flag().parse_known_args(list(args))
    token = _config_file.set(config.config)
    try:
        return TrainSettings(_cli_parse_args=rest, _cli_exit_on_error=False)
    finally:
        _config_file.reset(token)


def _config_flag() -> argparse.ArgumentParser:
    """Takes `--config FILE` (or `--config=FILE`) out of the arguments; the settings' parser reads the rest."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=None)
    return parser
