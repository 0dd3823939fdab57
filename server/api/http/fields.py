"""Reading one field of a decoded JSON body by its JSON type; each refusal is an InvalidRequest naming the
field, as every HTTP protocol (OpenAI's, Anthropic's, the admin bodies) reports it."""

from __future__ import annotations

from loraplex.server.core.errors import InvalidRequest


def string_field(values: dict, name: str) -> str:
    """values[name]: a non-empty string."""
    value = values.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(name, "must be a non-empty string")
    return value


def flag(values: dict, name: str) -> bool:
    """values[name]: true or false; False when absent."""
    value = values.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(name, "must be true or false")
    return value


def integer(value: object, name: str) -> int:
    """`value` as the integer field `name` (a JSON boolean is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, "must be an integer")
    return value


def optional_int(values: dict, name: str, low: int, high: int) -> int | None:
    """values[name] when set (an integer in [low, high]), else None."""
    value = values.get(name)
    if value is None:
        return None
    if not low <= integer(value, name) <= high:
        raise InvalidRequest(name, f"must lie in [{low}, {high}]")
    return value


def number(values: dict, name: str, default: float) -> float:
    """values[name] as a float (a JSON integer or fraction); `default` when absent or null."""
    value = values.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, "must be a number")
    return float(value)
