#!/usr/bin/env bash
# The quickstart: train a dense GPT and an MoE GPT with equal active parameters on the embedded
# corpus, side by side (one core each), then compare them and sample from both.
# Extra arguments are passed to both runs as overrides (e.g. train.steps=200 for a short try).
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE:-.venv/bin/moe}
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p runs
echo "== training quickstart_dense (background, log: runs/quickstart_dense.log) and quickstart_moe"
$MOE train experiments/quickstart_dense.yaml train.threads=1 logging.progress=false "$@" \
    > runs/quickstart_dense.log 2>&1 &
dense_pid=$!
trap 'kill $dense_pid 2>/dev/null || true' INT TERM
status=0
$MOE train experiments/quickstart_moe.yaml train.threads=1 "$@" 2>&1 \
    | grep --line-buffered -v -e "real_accelerator" -e "shm_comm_op" || status=$?
wait $dense_pid || { echo "dense run failed, see runs/quickstart_dense.log"; tail -20 runs/quickstart_dense.log; exit 1; }
[ "$status" = 0 ] || { echo "MoE run failed"; exit 1; }
grep "^\[moe\]" runs/quickstart_dense.log || true

echo "== comparing"
$MOE compare runs/quickstart_dense runs/quickstart_moe --out runs/quickstart_compare
for run in quickstart_dense quickstart_moe; do
  echo "== sample from $run"
  $MOE generate runs/$run --prompt "def " --max-new-tokens 160 --temperature 0.7 --seed 0
  echo
done
