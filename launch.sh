#!/usr/bin/env bash
# sbatch script: one task per device through srun, preemptible and requeued into the same run.
#   make slurm RECIPE=<name> NODES=<n> GPUS=<g> ARGS="key=value ..."
# or directly:
#   sbatch --nodes=1 --gres=gpu:4 --ntasks-per-node=4 launch.sh <recipe> [key=value ...]
#SBATCH --job-name=lm-recipes
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out
#SBATCH --time=04:00:00
# Note: --signal=SIGUSR1@120 (not B:USR1) sends the signal to the srun tasks, where Lightning's SLURM
# plugin handles it; B: would signal only this batch shell, which would die.
set -euo pipefail
RECIPE=${1:?usage: launch.sh <recipe> [key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
PY=${PY:-.venv/bin/python}
NODES=${SLURM_JOB_NUM_NODES:-1}
# Lightning checks ntasks-per-node == devices: derive devices from the allocation so they agree.
DEVICES=${SLURM_NTASKS_PER_NODE:-1}
RUN_ID="slurm-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}"
RUN_ROOT=${RUN_ROOT:-runs}  # where run directories live (run.root); every segment must agree on it
RUN_DIR="${RUN_ROOT}/${RECIPE}/${RUN_ID}"
if [ -f "${RUN_DIR}/config.yaml" ]; then
  echo "[launch.sh] $(date -Is) requeued segment ${SLURM_RESTART_COUNT:-0}: resuming ${RUN_DIR}"
  exec srun --kill-on-bad-exit=1 "$PY" -m recipes resume "$RUN_DIR" "$@"
else
  echo "[launch.sh] $(date -Is) new run ${RUN_DIR}"
  exec srun --kill-on-bad-exit=1 "$PY" -m recipes train "$RECIPE" "run.run_id=${RUN_ID}" "run.root=${RUN_ROOT}" \
    "trainer.num_nodes=${NODES}" "trainer.devices=${DEVICES}" "$@"
fi
