#!/usr/bin/env bash
# The prepared GPU check for a lent GPU machine: build the CUDA extension with the machine's own
# torch, then check and time everything on the card in one go (see benchmarks/gpu_check.py).
# Usage there:  bash benchmarks/gpu_check.sh [--json $OUT/gpu_check.json]
# (needs omegaconf, pyyaml and safetensors importable; carry them as wheels if the machine lacks them)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
start=$(date +%s)
$PY setup.py build_ext --inplace 2>&1 | tail -n 3
echo "extension build: $(( $(date +%s) - start )) s"
$PY -c "from moe import ops; print('dispatch backend:', ops.dispatch_backend('auto'))"
timeout 420 $PY -m benchmarks.gpu_check --device cuda --dtype bf16 "$@"
