"""Adapter cards' serving defaults: the default constraint an adapter's card names (an extractor that always
answers in its schema), read from the stored version's adapter_card.json once per version (content-addressed,
so it never changes) and cached.

The card field is `default_constraint`, one of {"json_schema": {...} or its JSON text}, {"regex": "..."},
{"grammar": "..."} or {"json_object": true} (GenerateRequest.constraint's names). A request's own constraint
overrides it. A malformed field is reported when a request would use it (InvalidRequest "constraint").
"""

from __future__ import annotations

import json

from loraplex.adapters.reference import AdapterReference
from loraplex.adapters.validation import CARD_FILE
from loraplex.server.core.adapter_runtime.leases import BASE_REFERENCE
from loraplex.server.core.adapter_runtime.state import AdapterState
from loraplex.server.core.errors import InvalidRequest

CONSTRAINT_FIELD = "default_constraint"
KINDS = ("json_schema", "regex", "grammar", "json_object")


class CardDefaults(AdapterState):
    """The defaults adapter cards set for requests."""

    def default_constraint(self, reference: AdapterReference) -> tuple[str, str] | None:
        """(kind, value) of the default constraint of the version `reference` names now (value "" for
        json_object; a schema as JSON text); None for the base model or a card without one. Reads the
        stored card on first use of a version (call it off the event loop)."""
        if reference == BASE_REFERENCE:
            return None
        with self._lock:
            digest = self._resolve(reference)
            if digest in self._card_constraints:
                return self._card_constraints[digest]
        card_path = self.store.path(reference.name, digest) / CARD_FILE
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        constraint = _parsed(card.get(CONSTRAINT_FIELD) if isinstance(card, dict) else None, reference.name)
        with self._lock:
            self._card_constraints[digest] = constraint
        return constraint


def _parsed(field: object, name: str) -> tuple[str, str] | None:
    if field is None:
        return None
    if not isinstance(field, dict) or len(field) != 1 or next(iter(field)) not in KINDS:
        raise InvalidRequest("constraint", f"adapter {name!r}: its card's {CONSTRAINT_FIELD} must be one of "
                             f"{{{', '.join(repr(k) for k in KINDS)}: ...}}")
    kind, value = next(iter(field.items()))
    if kind == "json_object":
        return (kind, "") if value is True else None
    if kind == "json_schema" and isinstance(value, dict):
        return kind, json.dumps(value)
    if not isinstance(value, str):
        raise InvalidRequest("constraint", f"adapter {name!r}: its card's {CONSTRAINT_FIELD}.{kind} must be text")
    return kind, value
