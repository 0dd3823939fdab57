"""Regenerate the checked-in protobuf/gRPC code from protos/ (a development tool; needs grpcio-tools).

`python -m loraplex.client.protogen` rewrites client/proto/; tests/client/test_protogen.py generates into a
temporary folder and fails when the result differs from what is checked in.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_ROOT = REPO_ROOT / "client" / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpc_tools) on every protos/loraplex/v1/*.proto into `out_dir`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "loraplex" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return sorted(p for p in out_dir.rglob("*") if p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    for path in generate(GENERATED_ROOT):
        print(path.relative_to(REPO_ROOT))
