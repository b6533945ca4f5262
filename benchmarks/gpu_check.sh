#!/usr/bin/env bash
# The prepared GPU check for a lent GPU machine: build the CUDA extension with the machine's own
# torch, run the op tests on the card (tests/unit/ops and tests/unit/nn/test_experts.py with
# MOE_TEST_DEVICE=cuda), then check and time everything on the card in one go (benchmarks/gpu_check.py).
# A failing test does not stop the timings, nor a failing stage the next one (a GPU session is short):
# each stage prints as it ends, the summary comes last, then the tests' summary line; the exit status
# is the check's (1 when a stage failed, 124 when it ran out of time).
# Usage there:  bash benchmarks/gpu_check.sh [--json $OUT/gpu_check.json]
# Needs torch, pytest, pyyaml and omegaconf. The lent machines' image lacks omegaconf: fetch its wheel
# here first (it is pure Python) into the git-ignored .whl/ and carry that folder (the device tool's
# `carry: [".whl"]`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl omegaconf==2.4.0
# and this script installs whatever .whl/ holds into /tmp/moe-site when omegaconf is not importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if ! $PY -c "import omegaconf" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moe-site .whl/*.whl
        export PYTHONPATH=/tmp/moe-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "omegaconf is not importable and .whl/ holds no wheels: see the header of $0" >&2
        exit 2
    fi
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
$PY -c "import torch; print('torch CUDA', torch.version.cuda)"; nvcc --version | tail -n 2 || true
# MOE_BUILD_CUDA=1: a CUDA build or none (setup.py then warns and the check runs the reference, saying
# so); the full log goes to $OUT (the device tool's output folder) when set, its tail here on failure
log=${OUT:-/tmp}/moe-build.log
start=$(date +%s)
MOE_BUILD_CUDA=1 $PY setup.py build_ext --inplace >"$log" 2>&1 || true
if grep -q "built moe._C (CUDA)" "$log"; then tail -n 2 "$log"; else tail -n 40 "$log"; fi
echo "extension build: $(( $(date +%s) - start )) s (log: $log)"
$PY -c "from moe import ops; print('dispatch backend:', ops.dispatch_backend('auto'))"
start=$(date +%s)
tests=$(MOE_TEST_DEVICE=cuda timeout 150 $PY -m pytest -q -p no:cacheprovider tests/unit/ops tests/unit/nn/test_experts.py \
        2>&1 | tee /dev/stderr | tail -n 1) || true
echo "op tests on cuda: $(( $(date +%s) - start )) s"
rc=0
timeout 300 $PY -m benchmarks.gpu_check --device cuda --dtype bf16 "$@" || rc=$?
echo "op tests on cuda: ${tests:-no summary (timed out?)}"
exit $rc
