#!/usr/bin/env bash
# .ci/slurm.sh - start the single-node test SLURM that `pytest -m slurm` needs.
#
#   bash .ci/slurm.sh [start|status|stop]     (default: start; root only)
#
# Wraps ../shared/ci/start-slurm.sh (path relative to the repository's parent) and then
# checks what the emflow SLURM tests rely on: partition `debug` is up, sbatch/squeue/scancel
# are on PATH, and a trivial job runs. Idempotent; about 8 s from scratch.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
START="$HERE/../shared/ci/start-slurm.sh"
[ -f "$START" ] || { echo ".ci/slurm.sh: ERROR: $START not found" >&2; exit 1; }
CMD="${1:-start}"
bash "$START" "$CMD"
[ "$CMD" = start ] || exit 0
export PATH="$PATH:/usr/sbin:/sbin"
for b in sbatch squeue scancel sinfo; do
    command -v "$b" >/dev/null || { echo ".ci/slurm.sh: ERROR: $b not on PATH" >&2; exit 1; }
done
# smoke test: one tiny job must run and leave the queue
out=$(sbatch --parsable -p "${EMFLOW_SLURM_PARTITION:-debug}" -J emflow-ci-smoke -t 1 \
      -o /dev/null --wrap "true") || { echo ".ci/slurm.sh: ERROR: sbatch failed" >&2; exit 1; }
for _ in $(seq 1 60); do
    [ -z "$(squeue -h -j "$out" 2>/dev/null)" ] && { echo ".ci/slurm.sh: SLURM ready (smoke job $out ran)"; exit 0; }
    sleep 0.5
done
scancel "$out" 2>/dev/null || true
echo ".ci/slurm.sh: ERROR: smoke job $out did not finish within 30 s" >&2; exit 1
