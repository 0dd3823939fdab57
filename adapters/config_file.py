"""Settings from a YAML or TOML file, as a pydantic-settings source (serve-train's `--config FILE`).

The file holds one mapping whose keys are the settings' field names (`eval_data`, `learning_rate`); a key
that names no setting is refused with the list of those that exist, so a typo never goes unnoticed. Relative
paths in path-typed settings are taken relative to the file's folder, so a config file and its data can move
together. Other sources (flags, environment variables) override what the file says.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsError

SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML"}


class ConfigFileSource(PydanticBaseSettingsSource):
    """The settings `path` holds (nothing when `path` is None); SettingsError says what is wrong with it."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        if self._path is None:
            return {}
        values = read_mapping(self._path)
        fields = self.settings_cls.model_fields
        unknown = [key for key in values if key not in fields]
        if unknown:
            raise SettingsError(f"config file {self._path}: {'; '.join(_unknown_key(key, fields) for key in unknown)}"
                                f" (the settings: {', '.join(fields)})")
        folder = self._path.absolute().parent
        return {key: folder / value if _is_path(fields[key]) and isinstance(value, str) and
                not Path(value).is_absolute() else value for key, value in values.items()}


def read_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML (.yaml, .yml) or TOML (.toml) file."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SettingsError(f"config file {path}: name it .yaml, .yml or .toml (YAML or TOML)")
    try:
        text = path.read_text()
    except OSError as error:
        raise SettingsError(f"config file {path} cannot be read: {error.strerror}") from None
    try:
        values = tomllib.loads(text) if kind == "TOML" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"config file {path} is not valid {kind}: {error}") from None
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise SettingsError(f"config file {path}: expected a mapping of setting names to values, got "
                            f"{type(values).__name__}")
    return values


def _unknown_key(key: object, fields: dict[str, FieldInfo]) -> str:
    close = difflib.get_close_matches(str(key).replace("-", "_"), list(fields), n=1)
    return f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def unwrap_optional(annotation: object) -> tuple[object, bool]:
    """(`X`, True) for `X | None`, else (`annotation`, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0], True
    return annotation, False


def _is_path(field: FieldInfo) -> bool:
    """Whether the field holds a Path (possibly optional)."""
    return unwrap_optional(field.annotation)[0] is Path
