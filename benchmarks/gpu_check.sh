#!/usr/bin/env bash
# The device check, for a session that has a CUDA machine: parity tests on CUDA, then the engine
# benchmark with the NF4 base resident in GPU memory, then QLoRA vs LoRA training on the GPU. Run from the repository root; writes the
# figures to benchmarks/results/ (and to $OUT when set, as the device tool expects).
set -euo pipefail
export PYTHONUNBUFFERED=1
make setup >/dev/null
.venv/bin/python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -q -m gpu tests/engine/test_parity.py 2>&1 | tail -n 15
.venv/bin/python benchmarks/engine_throughput.py --device cuda \
  --output benchmarks/results/engine_throughput_cuda.json 2>&1 | grep -v Warning | tail -n 20
.venv/bin/python benchmarks/training.py --device cuda \
  --output benchmarks/results/training_cuda.json 2>&1 | grep -v Warning | tail -n 12
if [ -n "${OUT:-}" ]; then cp benchmarks/results/engine_throughput_cuda.json benchmarks/results/training_cuda.json "$OUT/"; fi
