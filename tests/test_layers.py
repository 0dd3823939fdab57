"""The layers' import rules: every module's imports (module level and inside functions) against one table.

Arrows point down only: transports (api) over the generation core (core) over the engine; the engine
knows nothing above it; the client shares only the wire format (protobuf and its codec) with the server.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"loraplex.server": ROOT / "server", "loraplex.adapters": ROOT / "adapters",
            "loraplex.client": ROOT / "client"}
"""Import name -> folder of the first-party packages whose modules are checked (generated protobuf is not)."""

LAYERS = (
    ("loraplex.v1", "wire"),
    ("loraplex.client.codec", "wire"),
    ("loraplex.client.records", "records"),
    ("loraplex.client.cli", "entry"),
    ("loraplex.client", "client"),
    ("loraplex.adapters", "adapters"),
    ("loraplex.server.engine", "engine"),
    ("loraplex.server.core", "core"),
    ("loraplex.server.api", "api"),
    ("loraplex.server.default_model", "base"),
    ("loraplex.server.gguf_convert", "base"),
    ("loraplex.server.gguf_model", "base"),
    ("loraplex.server.model_files", "base"),
    ("loraplex.server.logs", "base"),
    ("loraplex.server", "entry"),
)
"""(module prefix, layer): a module is in the layer of the first prefix that matches (longer prefixes come
first). "engine_api" is the `loraplex.server.engine` package itself (its public names), as opposed to the
engine's modules."""

EVERY_LAYER = {"records", "wire", "client", "adapters", "engine", "engine_api", "core", "api", "base", "entry"}
ALLOWED: dict[str, set[str]] = {
    "engine": {"engine", "engine_api"},
    "base": {"base", "engine", "engine_api"},
    "records": set(),
    "wire": {"wire", "records"},
    "client": {"client", "wire", "records"},
    "adapters": {"adapters", "engine", "engine_api", "base", "client", "wire", "records"},
    "core": {"core", "adapters", "engine", "engine_api", "base", "records"},
    "api": {"api", "core", "adapters", "engine_api", "base", "client", "wire", "records"},
    "entry": EVERY_LAYER,
}
ALLOWED["engine_api"] = ALLOWED["engine"]  # the engine package's own __init__
"""Layer -> the layers its modules may import: the allowed arrows. `records` (client/records.py: a token,
its candidates, a completion) is plain data that the client, the codec and the server core share. `entry`
is the process and the command line (server.app, server.settings, client.cli), which wire everything
together."""

ENGINE_THIRD_PARTY = {"torch", "numpy", "bitsandbytes", "pydantic", "triton"}
"""What the engine may import besides itself and the standard library (pydantic: EngineConfig; triton: the
CUDA kernels, imported by kernel_choice on CUDA only)."""


def layer_of(module: str) -> str | None:
    """The layer of first-party `module`, or None for a third-party or standard-library one."""
    if module == "loraplex.server.engine":
        return "engine_api"
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def modules() -> dict[str, Path]:
    """Import name -> file of every first-party module checked."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder)
            if relative.parts[0] == "proto":
                continue
            parts = [*relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports anywhere in it (relative imports resolved; `from P import M` is M when M
    is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def test_every_import_follows_an_allowed_arrow() -> None:
    everything = modules()
    known = set(everything)
    wrong = []
    for module, path in sorted(everything.items()):
        layer = layer_of(module)
        for imported in sorted(imports(module, path, known)):
            target = layer_of(imported)
            if target is not None and target not in ALLOWED[layer]:
                wrong.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not wrong, "imports against the layer table:\n" + "\n".join(wrong)


def test_the_engine_imports_only_torch_numpy_and_itself() -> None:
    everything = modules()
    wrong = []
    for module, path in sorted(everything.items()):
        if layer_of(module) not in ("engine", "engine_api"):
            continue
        for imported in imports(module, path, set(everything)):
            top = imported.split(".")[0]
            if layer_of(imported) is None and top not in ENGINE_THIRD_PARTY and top not in sys.stdlib_module_names:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer() -> None:
    assert all(layer_of(module) is not None for module in modules())


def test_the_client_loads_neither_torch_nor_the_server() -> None:
    """Importing the Python client (and its codec) pulls in no torch and no server module."""
    script = ("import sys, loraplex.client.client, loraplex.client.codec\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('loraplex.server')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"
