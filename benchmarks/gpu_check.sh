#!/usr/bin/env bash
# The device check (issue 21), unattended on a bare CUDA machine without network, within 8 minutes:
#   1. installs what that machine's Python lacks from .gpu-wheels/ (made by benchmarks/gpu_wheels.sh where a
#      package registry is reachable, and carried along), then loraplex itself (a copy of this checkout), all
#      without the network, into a temporary folder put on PYTHONPATH;
#   2. runs the Triton kernel tests compiled on the GPU (float32 and bfloat16), the kernel-choice table, the
#      CUDA-graph decode tests (captured graphs vs eager steps), and the CUDA parity tests (every family, NF4
#      and dense, mixed-adapter batch vs transformers + PEFT);
#   3. runs `engine_throughput.py --device cuda`: random-weight SmolLM2- and Llama-3-8B-shaped models, eager
#      and with CUDA graphs.
# JSON goes to $OUT when set (the device tool's folder), else benchmarks/results/. Exits non-zero, after
# running everything it can, when CUDA is missing, a test fails, or any test was skipped.
#
#     bash benchmarks/gpu_wheels.sh                       # here, once (needs a package registry)
#     bash benchmarks/gpu_check.sh                        # there, from the repository root, .gpu-wheels/ beside it
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
WHEELS=.gpu-wheels
mkdir -p "$RESULTS"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: no wheels in $WHEELS/: run benchmarks/gpu_wheels.sh where pip reaches a registry, carry $WHEELS" >&2
  exit 1
fi
"$PYTHON" -c '
import torch, triton
assert torch.cuda.is_available(), "gpu_check: CUDA is not available on this machine"
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'

# Into a folder of its own on PYTHONPATH, as the machine's Python environment may be read-only.
SITE=$(mktemp -d)
PIP=("$PYTHON" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$SITE")
"${PIP[@]}" --no-compile "$WHEELS"/*.whl
"${PIP[@]}" --no-build-isolation .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import loraplex.server.engine, bitsandbytes, pydantic; print("loraplex from", loraplex.server.engine.__file__)'
LORAPLEX_HOME=$(mktemp -d)  # compiled CPU kernels (the table test builds a CPU engine) and model caches
export LORAPLEX_HOME

status=0
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -rs --junitxml="$RESULTS/gpu_tests.xml" \
  tests/engine/test_triton_kernels.py tests/engine/test_kernel_choice.py tests/engine/test_cuda_graphs.py \
  tests/engine/test_parity.py::test_mixed_batch_matches_peft_on_cuda || status=$?
"$PYTHON" - "$RESULTS/gpu_tests.xml" <<'EOF' || status=1
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
print("gpu_check tests:", counts)
if counts["skipped"] or not counts["tests"]:
    sys.exit(f"gpu_check: {counts['skipped']} of {counts['tests']} tests skipped on a CUDA machine (see -rs above)")
EOF

timeout 200 "$PYTHON" benchmarks/engine_throughput.py --device cuda \
  --output "$RESULTS/engine_throughput_cuda.json" 2>&1 | grep -v Warning || status=1
ls "$RESULTS"
if [ "$status" -ne 0 ]; then echo "gpu_check: FAILED (status $status)" >&2; fi
exit "$status"
