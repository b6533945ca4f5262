#!/usr/bin/env bash
# The quickstart: train a dense GPT and an MoE GPT with equal active parameters on the embedded
# corpus, side by side (one core each), then compare them and sample from both.
# Extra arguments are passed to both runs as overrides (e.g. train.steps=200 for a short try).
# The MoE run shows its progress bar; the dense run, in the background, reports its step every
# QUICKSTART_PROGRESS_S seconds (default 30) from its metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE:-.venv/bin/moe}
PROGRESS_S=${QUICKSTART_PROGRESS_S:-30}
export WANDB_MODE=${WANDB_MODE:-offline}
export PYTHONUNBUFFERED=1  # the runs' lines come as they are printed, also through a pipe
mkdir -p runs

# The dense run's latest logged step, on a line of its own: over the MoE run's progress bar on a
# terminal (it is redrawn on the next line), after it otherwise.
dense_progress() {
  local metrics=runs/quickstart_dense/metrics.jsonl last="" line step total loss
  while sleep "$PROGRESS_S" </dev/null >/dev/null 2>&1; do  # (a sleep left over holds no pipe open)
    line=$(tail -n 1 "$metrics" 2>/dev/null) || continue
    [[ $line =~ \"step\":\ *([0-9]+) ]] || continue
    step=${BASH_REMATCH[1]}
    [ "$step" != "$last" ] || continue
    last=$step
    total=$(sed -n 's/^  steps: *//p' runs/quickstart_dense/config.yaml 2>/dev/null | head -n 1) || total=""
    loss=""
    [[ $line =~ \"loss/train\":\ *([0-9.]+) ]] && loss=", train loss ${BASH_REMATCH[1]:0:6}"
    if [ -t 1 ]; then printf '\r\033[K'; else printf '\n'; fi
    printf '[dense] step %s%s%s (log: runs/quickstart_dense.log)\n' "$step" "${total:+/$total}" "$loss"
  done
}

echo "== training quickstart_dense (background, log: runs/quickstart_dense.log) and quickstart_moe"
$MOE train experiments/quickstart_dense.yaml train.threads=1 logging.progress=false "$@" \
    > runs/quickstart_dense.log 2>&1 &
dense_pid=$!
dense_progress &
progress_pid=$!
trap 'kill $progress_pid 2>/dev/null || true' EXIT
trap 'kill $dense_pid 2>/dev/null || true; exit 130' INT
trap 'kill $dense_pid 2>/dev/null || true; exit 143' TERM
# Only stdout goes through the filter (DeepSpeed's import-time notes); the progress bar is on
# stderr and reaches the terminal unbuffered, carriage-return updates included.
status=0
$MOE train experiments/quickstart_moe.yaml train.threads=1 "$@" \
    | grep --line-buffered -v -e "real_accelerator" -e "shm_comm_op" || status=${PIPESTATUS[0]}
if kill -0 $dense_pid 2>/dev/null; then echo "== waiting for quickstart_dense"; fi
wait $dense_pid || { echo "dense run failed, see runs/quickstart_dense.log"; tail -20 runs/quickstart_dense.log; exit 1; }
kill $progress_pid 2>/dev/null || true
[ "$status" = 0 ] || { echo "MoE run failed"; exit 1; }
grep "^\[moe\]" runs/quickstart_dense.log || true

echo "== comparing"
$MOE compare runs/quickstart_dense runs/quickstart_moe --out runs/quickstart_compare
for run in quickstart_dense quickstart_moe; do
  echo "== sample from $run"
  $MOE generate runs/$run --prompt "def " --max-new-tokens 160 --temperature 0.7 --seed 0
  echo
done
