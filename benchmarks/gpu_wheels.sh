#!/usr/bin/env bash
# Wheels the GPU check machine lacks, fetched here (it has no network): cp312 manylinux x86_64 wheels into
# .gpu-wheels/ (git-ignored), which the device call carries and benchmarks/gpu_check.sh installs with
# `pip install --no-index --no-deps`.
#
# That machine's Python 3.12 already has torch 2.11 (CUDA 13.0), triton 3.6, transformers, peft,
# accelerate, safetensors, tokenizers, grpcio, protobuf, prometheus-client, numpy, pytest, anyio, h11,
# click, pyyaml, tqdm, typing-extensions; what loraplex imports beyond those is listed below, at the
# versions this project's venv resolves. bitsandbytes is repacked with only its CUDA 13 library
# (libbitsandbytes_cuda130.so, 3.9 MB of the wheel's 43 MB). Prints the folder's size; fails above 40 MB.
#
#     bash benchmarks/gpu_wheels.sh          # run from the repository root, on any machine with pip
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
LIMIT_BYTES=$((40 * 1000 * 1000))
PYTHON=${PYTHON:-python3}
WHEELS=(
  bitsandbytes==0.50.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pydantic-settings==2.16.3 python-dotenv==1.2.4
  starlette==1.10.0 uvicorn==0.54.0
  gguf==0.19.0
  grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
  xgrammar==0.2.9
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf "$DEST" && mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

# bitsandbytes without the CPU and other CUDA versions' libraries (RECORD rewritten to match).
"$PYTHON" - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path

KEEP = "libbitsandbytes_cuda130.so"
(wheel,) = Path(sys.argv[1]).glob("bitsandbytes-*.whl")
trimmed = wheel.with_suffix(".trimmed")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
    dropped = {n for n in source.namelist() if n.endswith(".so") and not n.endswith("/" + KEEP)}
    if not any(n.endswith("/" + KEEP) for n in source.namelist()):
        sys.exit(f"{wheel.name} holds no {KEEP}")
    for item in source.infolist():
        if item.filename in dropped:
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
        target.writestr(item, data)
trimmed.replace(wheel)
print(f"{wheel.name}: dropped {len(dropped)} libraries, kept {KEEP}")
EOF

ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
echo "total: $total bytes in $(ls "$DEST"/*.whl | wc -l) wheels"
if [ "$total" -gt "$LIMIT_BYTES" ]; then echo "over the $LIMIT_BYTES-byte budget" >&2; exit 1; fi
