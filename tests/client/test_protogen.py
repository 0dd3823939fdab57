"""The checked-in generated code is exactly what protoc makes from protos/ (no manual step, no drift)."""

from __future__ import annotations

from pathlib import Path

from loraplex.client.protogen import GENERATED_ROOT, generate


def test_regenerating_the_protos_gives_no_diff(tmp_path: Path):
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate(tmp_path)}
    checked_in = {p.relative_to(GENERATED_ROOT): p.read_bytes()
                  for p in GENERATED_ROOT.rglob("*") if p.suffix in (".py", ".pyi") and p.name != "__init__.py"}
    assert fresh, "protoc generated nothing"
    assert sorted(fresh) == sorted(checked_in), "generated file set differs: run python -m loraplex.client.protogen"
    stale = [str(name) for name, data in fresh.items() if checked_in[name] != data]
    assert not stale, f"stale generated code {stale}: run python -m loraplex.client.protogen"
